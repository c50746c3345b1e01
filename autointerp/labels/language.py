"""Language profile of a latent: which languages its contexts and max-activating tokens are in.

Two detectors, because they see different things:
- langdetect over each context's text (seeded: langdetect is random unless DetectorFactory.seed
  is set). Knows ~55 languages; too noisy on one token. It runs once per distinct text (a cache:
  a whole SAE's contexts repeat across latents), over many texts at once through
  langdetect_batch (the same answers, bit for bit: on the dev file's texts ~0.15 ms a text
  against ~2 ms for one langdetect call a text).
- a script detector for the max-activating token: kana/kanji -> "ja", Latin letters -> "en",
  anything else (digits, punctuation, whitespace, byte fragments) -> "other".
The paper's own rule (llm-jp-sae) is coarser: a max token is "en" when it is ASCII, else "ja",
and a latent is en / ja when more than 90% of its contexts agree, else mix. `paper_token_language`
is the variant that reproduces the human file best (see docs/score.md).
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from functools import lru_cache
from typing import Any, Iterable, Sequence

from langdetect import DetectorFactory, detect_langs
from langdetect.lang_detect_exception import LangDetectException

from autointerp.schema import Context, FeatureRecord

DetectorFactory.seed = 0  # langdetect samples n-grams at random; the seed makes it repeatable

TREND_THRESHOLD = 0.9  # the paper: a language trend needs > 90% of contexts to agree

_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_JA = re.compile(r"[\u3040-\u30ff\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff66-\uff9f]")
_DIGIT = re.compile(r"[0-9]")


def _is_latin_letter(ch: str) -> bool:
    return ch.isalpha() and "LATIN" in unicodedata.name(ch, "")


@lru_cache(maxsize=1 << 18)
def clean_token(token: str) -> str:
    """A token as text: SentencePiece's '▁' as a space, byte tokens like '<0x0A>' as their char."""
    token = token.replace("▁", " ")

    def byte(m: re.Match) -> str:
        value = int(m.group(0)[3:5], 16)
        return chr(value) if value < 0x80 else ""  # a lone UTF-8 continuation byte is no text

    return _BYTE_TOKEN.sub(byte, token).replace("\ufffd", "")


@lru_cache(maxsize=1 << 18)
def normalize_token(token: str) -> str:
    """The form two max tokens are compared in: text, NFKC, stripped, lowercased."""
    return unicodedata.normalize("NFKC", clean_token(token)).strip().lower()


@lru_cache(maxsize=1 << 18)
def token_script(token: str) -> str:
    """Script of one token: 'ja' (kana/kanji), 'en' (Latin letters), else 'other'."""
    text = normalize_token(token)
    if _JA.search(text):
        return "ja"
    if any(_is_latin_letter(ch) for ch in text):
        return "en"
    return "other"


@lru_cache(maxsize=1 << 18)
def paper_token_language(token: str) -> str:
    """The paper's max-token rule: 'en' for an ASCII token, else 'ja'.

    Tokens with digits count as 'ja' and the raw token (byte tokens like '<0x0A>' included) is
    tested: this variant reproduces the dev file's language counts best (docs/score.md).
    """
    return "en" if token.isascii() and not _DIGIT.search(token) else "ja"


def trend_from_counts(counts: dict[str, int], threshold: float = TREND_THRESHOLD) -> str:
    """The language more than `threshold` of the counted contexts agree on (en, ja, ...), else mix."""
    total = sum(counts.values())
    for lang, count in counts.items():
        if total and lang != "unknown" and count / total > threshold:
            return lang
    return "mix"


# id(tokens) -> (tokens, text): records read by records.lean.lean_record share one tokens list per
# distinct context, so a whole SAE joins each context once, and its text is one str object whose
# hash is computed once (the language cache looks it up for every latent that shows it). The
# list is kept in the entry, so its id cannot be reused while the entry lives.
_TEXT_BY_TOKENS: dict[int, tuple[list[str], str]] = {}
_TEXT_LIMIT = 1 << 14  # as records.lean's token cache: the same lists, so little more memory


def context_text(context: Context) -> str:
    """The context's tokens as one text (clean_token on each)."""
    tokens = context.tokens
    hit = _TEXT_BY_TOKENS.get(id(tokens))
    if hit is not None and hit[0] is tokens:
        return hit[1]
    text = "".join(tokens)
    if "<0x" in text:  # a byte token, maybe: token by token
        text = "".join(map(clean_token, tokens))
    else:  # clean_token only replaces chars (the same in the joined text)
        text = text.replace("\u2581", " ").replace("\ufffd", "")
    if len(_TEXT_BY_TOKENS) >= _TEXT_LIMIT:
        _TEXT_BY_TOKENS.clear()
    _TEXT_BY_TOKENS[id(tokens)] = (tokens, text)
    return text


def context_texts(record: FeatureRecord) -> list[str]:
    """The texts langdetect reads for a latent: its (non-empty) top contexts."""
    return [context_text(c) for c in record.contexts if c.tokens]


def detect_records(records: Sequence[FeatureRecord]) -> list[list[str]]:
    """Detect the context languages of many latents in one batch (profile() then finds them
    cached); returns each record's context_texts."""
    texts = [context_texts(r) for r in records]
    detect_languages(t for ts in texts for t in ts)
    return texts


def langdetect_language(text: str) -> str:
    """langdetect's best language code for one text, one library call ('unknown' when it has no
    letters). The reference that detect_languages reproduces; no cache."""
    try:
        found = detect_langs(text)
    except LangDetectException:
        return "unknown"
    return found[0].lang if found else "unknown"


_KANA = re.compile(r"[\u3041-\u3096\u30a1-\u30fa]")  # hiragana and katakana letters
_KANJI = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_ASCII_LETTER = re.compile(r"[A-z]")  # langdetect counts 'A'..'z' as Latin
_NON_LATIN = re.compile(r"[^\x00-\u02ff\u1e00-\u1eff]")  # what langdetect weighs Latin letters against
# a letter of neither English nor Japanese (Hangul, Cyrillic, accented Latin, full-width Latin, ...)
_FOREIGN_LETTER = re.compile(r"[^\W\d_A-Za-z\u3041-\u3096\u309d\u309e\u30a1-\u30fa\u30fc-\u30fe\u3005\u3006"
                             r"\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
KANA_SHARE, MIN_KANA = 0.5, 3  # see script_language


def script_language(text: str) -> str | None:
    """'ja' for a text whose script settles what langdetect answers, else None (ask langdetect).

    Settled: at least MIN_KANA kana and at least KANA_SHARE of its kana + kanji are kana (kana are
    Japanese only; a kanji-heavy text can come out zh or ko), its Latin letters are fewer than
    half its other characters (langdetect then drops them), and no letter of a third script.
    Measured against langdetect itself (tests/test_scale.py; docs): no disagreement on the dev
    file's, the demo's and the demo corpus's texts and ~200k random spans of them; a share of 0.4
    or a single kana already disagree on short spans."""
    if not _KANA.search(text):
        return None
    kana = len(_KANA.findall(text))
    if kana < MIN_KANA or kana < KANA_SHARE * (kana + len(_KANJI.findall(text))):
        return None
    if len(_ASCII_LETTER.findall(text)) * 2 >= len(_NON_LATIN.findall(text)) or _FOREIGN_LETTER.search(text):
        return None
    return "ja"


LANGUAGE_CACHE: dict[str, str] = {}  # context text -> language; a whole SAE's contexts repeat
_CACHE_LIMIT = 1 << 18  # texts (~0.5 KB each with the key): ~130 MB at most per process


@lru_cache(maxsize=1)
def batch_detector():
    from autointerp.labels.langdetect_batch import BatchDetector

    try:
        return BatchDetector()
    except RuntimeError:  # a Python whose random.choice draws differently: one call a text
        return None


def detect_languages(texts: Iterable[str], batch: int = 16384) -> list[str]:
    """langdetect's best language per text: each distinct text is detected once (cached), the new
    ones `batch` at a time, except those whose script settles it (script_language)."""
    texts = list(texts)
    cache = LANGUAGE_CACHE
    try:  # the usual case in a whole SAE: every text seen before
        return list(map(cache.__getitem__, texts))
    except KeyError:
        pass
    todo = list(dict.fromkeys(t for t in texts if t not in cache))
    new: dict[str, str] = {}
    for t in todo:
        if (lang := script_language(t)) is not None:
            new[t] = lang
    if len(new) < len(todo):
        todo = [t for t in todo if t not in new]
    detector = batch_detector() if todo else None
    for i in range(0, len(todo), batch):
        part = todo[i:i + batch]
        new.update(zip(part, detector.detect(part) if detector else map(langdetect_language, part)))
    result = [new[t] if t in new else cache[t] for t in texts]
    if len(cache) + len(new) > _CACHE_LIMIT:
        cache.clear()
    cache.update(new)
    return result


def detect_language(text: str) -> str:
    """langdetect's best language code for a text ('unknown' when it has no letters)."""
    return detect_languages([text])[0]


def max_token(context: Context) -> str | None:
    """The max-activating token of a context; None when nothing in it activates."""
    i = context.max_index
    if i < 0:
        return None
    values = context.activations if context.activations is not None else context.levels
    if values[i] <= 0:
        return None
    return context.tokens[i]


def max_tokens(record: FeatureRecord) -> list[str]:
    """The max-activating token of each context that activates, in context order."""
    return [t for t in map(max_token, record.contexts) if t is not None]


def _shares(counter: Counter) -> dict[str, float]:
    total = sum(counter.values())
    return {k: round(v / total, 4) for k, v in counter.most_common()} if total else {}


def entropy(counter: Counter) -> float:
    """Shannon entropy in bits of a count distribution."""
    total = sum(counter.values())
    return -sum(v / total * math.log2(v / total) for v in counter.values() if v) if total else 0.0


def trend(record: FeatureRecord) -> str:
    """The paper's language trend of a latent alone (profile()["trend"], without langdetect)."""
    tokens = max_tokens(record)
    return trend_from_counts(Counter(paper_token_language(t) for t in tokens))


def profile(record: FeatureRecord, bilingual_min_share: float = 0.1,
            texts: Sequence[str] | None = None, tokens: list[str] | None = None) -> dict[str, Any]:
    """A JSON-able language profile of one latent.

    trend is the paper's rule (by `paper_token_language` on max tokens); trend_langdetect is the
    same >90% rule over langdetect's context languages. bilingual_firing: both English and
    Japanese max tokens, each in at least `bilingual_min_share` of the activating contexts (not
    the paper's "cross-lingual", which Label.cross_lingual keeps: a concept joining words of the
    same meaning across the languages). `texts`, `tokens`: context_texts(record) and
    max_tokens(record), when the caller has them already.
    """
    tokens = max_tokens(record) if tokens is None else tokens
    context_langs = Counter(detect_languages(context_texts(record) if texts is None else texts))
    scripts = Counter(map(token_script, tokens))
    paper_counts = Counter(map(paper_token_language, tokens))
    n = len(tokens)
    en_share = scripts.get("en", 0) / n if n else 0.0
    ja_share = scripts.get("ja", 0) / n if n else 0.0
    return {
        "n_contexts": len(record.contexts),
        "n_activating": n,
        "trend": trend_from_counts(paper_counts),
        "trend_langdetect": trend_from_counts(context_langs),
        "paper_counts": {"en": paper_counts.get("en", 0), "ja": paper_counts.get("ja", 0)},
        "context_languages": _shares(context_langs),
        "max_token_scripts": _shares(scripts),
        "context_entropy": round(entropy(context_langs), 4),
        "max_token_script_entropy": round(entropy(scripts), 4),
        "bilingual_firing": min(en_share, ja_share) >= bilingual_min_share and n > 0,
    }
