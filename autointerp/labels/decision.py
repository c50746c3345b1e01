"""The granularity decision: token / concept-synonym / concept-semantic / uninterpretable.

A multinomial logistic regression over a latent's own evidence (its max-activating tokens, how
they are related, its contexts and activation pattern, and, when present, the explainer's vote
and the simulator's scores), shipped as JSON in autointerp/data/granularity_model.json
(coefficients, standardisation, fitted input range, the evidence groups it uses, library
versions and its nested-CV numbers: no pickle; the estimator is rebuilt with numpy). It is fitted
by autointerp/granularity_fit.py (`make eval` / evals/eval_granularity.py --save). Never an
input: the checkpoint step or feature id.

Evidence comes in groups (EVIDENCE_GROUPS). `core` and `context` need no library; the others
need the `ja` extra and are simply absent without it (`evidence_sources()` says which are there;
the decision then falls back to a model fitted without them):
- gloss: JMdict (jamdict-data's SQLite database) links a Japanese and an English max token of
  the same meaning (犬 ~ dog), looked up in both directions; gloss_same_script links two English
  (in ~ at) or two Japanese (本名 ~ 通称) max tokens through a shared translation;
- loanword: a katakana max token's source spelling (UniDic via cutlet: ソフトウェア -> software,
  else Hepburn romaji) links it to an English max token;
- lemma: Japanese inflected forms (UniDic lemmas via fugashi: される / した -> 為る) count as one.
Every per-token lookup is cached (lru_cache), so labelling a whole SAE costs one lookup per
distinct token, not per context.
"""

from __future__ import annotations

import difflib

import json
import math
import sqlite3
import threading
import unicodedata
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache, partial
from itertools import chain, islice
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Iterator, NamedTuple

import numpy as np

from autointerp.labels import language
from autointerp.schema import GRANULARITIES, Explanation, FeatureRecord, Label, Scores

MODEL_PATH = Path(__file__).resolve().parents[1] / "data" / "granularity_model.json"
MODEL_FORMAT_VERSION = 2

# Feature names per evidence group. `core` is always used; the fitting chooses among the others
# inside cross-validation folds (granularity_fit.py). The model file lists what it was fitted on.
EVIDENCE_GROUPS: dict[str, list[str]] = {
    "core": [
        "top1_share", "top2_share", "variant_share", "family_share", "cross_script_variant_share",
        "distinct_ratio", "entropy_norm", "en_share", "ja_share", "other_share", "script_mix",
        "junk_share", "digit_share", "katakana_share", "kanji_share", "char_class_entropy",
        "frac_active", "mean_active_level", "high_tokens_per_context", "n_contexts_norm",
        "activating_ratio", "log_density", "has_density",
        "top2_related", "variant_types_ratio", "prev_top_share", "max_position_mean",
    ],
    # JMdict both ways: Japanese -> English glosses, and English -> Japanese headwords
    "gloss": ["gloss_ja_en_share", "gloss_ja_en_top2", "gloss_ja_en_any",
              "gloss_en_ja_share", "gloss_en_ja_top2", "gloss_en_ja_any"],
    "loanword": ["loanword_share", "loanword_top2", "loanword_any"],
    "lemma": ["lemma_top1_share", "lemma_distinct_ratio"],
    "gloss_same_script": ["gloss_same_script_share", "gloss_same_script_top2"],
    "context": ["ctx_cohesion", "ctx_top_df", "next_top_share", "cohesion_x_diverse", "top1_x_incoherent"],
}
LLM_FEATURES = [*(f"vote_{g}" for g in GRANULARITIES), "vote_missing", "llm_confidence", "llm_cross_lingual"]
SCORE_FEATURES = ["simulation", "detection", "fuzzing", "scores_missing"]
STAT_FEATURES = [n for names in EVIDENCE_GROUPS.values() for n in names]
# Which evidence source (optional library) each group needs.
GROUP_SOURCES = {"gloss": "jmdict", "gloss_same_script": "jmdict",
                 "loanword": "unidic", "lemma": "unidic"}
LINK_SOURCES = ("gloss_ja_en", "gloss_en_ja", "loanword")  # cross-script links a group is named after


# ---- optional evidence sources -------------------------------------------------------------------

@lru_cache(maxsize=None)
def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


class _JMdict:
    """Read-only queries on jamdict-data's SQLite JMdict (jamdict's own lookup builds Python
    objects per entry and is ~100x slower; we only need gloss text and headwords)."""

    JA_EN = ("SELECT g.text FROM Sense s JOIN SenseGloss g INDEXED BY SenseGloss_sid ON g.sid = s.ID "
             "WHERE s.idseq IN (SELECT idseq FROM Kanji WHERE text = ? UNION SELECT idseq FROM Kana WHERE text = ?) "
             "AND g.lang = 'eng' ORDER BY s.ID")
    EN_JA = ("SELECT text FROM Kanji WHERE idseq IN ({ids}) UNION SELECT text FROM Kana WHERE idseq IN ({ids})")
    EN_IDS = ("SELECT s.idseq FROM SenseGloss g INDEXED BY SenseGloss_text JOIN Sense s ON s.ID = g.sid WHERE g.text IN ({words}) "
              "AND g.lang = 'eng'")

    def __init__(self, path: str):
        self.db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
        self.lock = threading.Lock()

    def glosses(self, ja: str) -> list[str]:
        with self.lock:
            return [r[0] for r in self.db.execute(self.JA_EN, (ja, ja))]

    def headwords(self, en_words: list[str]) -> list[str]:
        with self.lock:
            ids = sorted({r[0] for r in self.db.execute(self.EN_IDS.format(words=",".join("?" * len(en_words))),
                                                        en_words)})
            if not ids:
                return []
            marks = ",".join("?" * len(ids))
            return [r[0] for r in self.db.execute(self.EN_JA.format(ids=marks), ids + ids)]


@lru_cache(maxsize=1)
def _jmdict() -> _JMdict | None:
    try:
        import jamdict_data
        jm = _JMdict(jamdict_data.JAMDICT_DB_PATH)
        jm.glosses("犬")  # the database is there and readable
        return jm
    except Exception:  # the `ja` extra is not installed, or its database is missing
        return None


@lru_cache(maxsize=1)
def _unidic():
    """(fugashi tagger, cutlet romaniser) over UniDic, or None without the `ja` extra."""
    try:
        import cutlet
        import fugashi
        tagger = fugashi.Tagger()
        tagger("犬")
        return tagger, cutlet.Cutlet(use_foreign_spelling=True)
    except Exception:
        return None


def lexicon_available() -> bool:
    return _jmdict() is not None


def evidence_sources() -> dict[str, dict[str, Any]]:
    """Which optional evidence sources are present, with library versions (for `label` to print
    and for the model file). A group whose source is absent is left out of the decision."""
    return {
        "jmdict": {"available": _jmdict() is not None, "library": "jamdict-data",
                   "version": _version("jamdict-data"), "groups": ["gloss", "gloss_same_script"]},
        "unidic": {"available": _unidic() is not None, "library": "fugashi+unidic-lite+cutlet",
                   "version": "/".join(str(_version(d)) for d in ("fugashi", "unidic-lite", "cutlet")),
                   "groups": ["loanword", "lemma"]},
    }


def describe_sources() -> str:
    """One line for a CLI: which optional evidence sources this run has (`label` prints it)."""
    parts = [f"{name} ({s['library']} {s['version']}): {'on' if s['available'] else 'off'}"
             for name, s in evidence_sources().items()]
    missing = not all(s["available"] for s in evidence_sources().values())
    return "evidence sources: " + "; ".join(parts) + (
        " (pip install 'autointerp[ja]' for the rest; meanwhile a model fitted without them decides)"
        if missing else "")


def available_groups() -> set[str]:
    sources = {name for name, s in evidence_sources().items() if s["available"]}
    return {g for g in EVIDENCE_GROUPS if GROUP_SOURCES.get(g) in (None, *sources)}


_EDGE_PUNCT = " 、。，,.!?！？・「」『』()（）[]\"'：:;；"


def lookup_form(norm: str) -> str:
    """The form looked up in a dictionary: without edge punctuation ('だが、' -> 'だが')."""
    return norm.strip(_EDGE_PUNCT)


def _gloss_words(gloss: str) -> set[str]:
    """'dog (Canis (lupus) familiaris)' -> {'dog'}; 'to eat' -> {'to eat', 'eat'}; plus words > 2 chars."""
    text = gloss.lower().split("(")[0].strip()
    words = {text} if text else set()
    if text.startswith("to "):
        words.add(text[3:])
    words.update(w for w in text.split() if len(w) > 2)
    return words


@lru_cache(maxsize=65536)
def english_glosses(ja_token: str) -> frozenset[str]:
    """Lowercased English gloss words of a Japanese token from JMdict; empty without it."""
    jm = _jmdict()
    form = lookup_form(ja_token)
    if jm is None or not form:
        return frozenset()
    words: set[str] = set()
    for gloss in jm.glosses(form)[:40]:
        words |= _gloss_words(gloss)
    return frozenset(words)


@lru_cache(maxsize=65536)
def japanese_headwords(en_token: str) -> frozenset[str]:
    """Japanese headwords (kanji and kana) whose JMdict gloss is this English word; empty without it."""
    jm = _jmdict()
    word = lookup_form(en_token)
    if jm is None or len(word) < 2:
        return frozenset()
    forms = [word, f"to {word}"]
    if len(word) > 3 and word.endswith("s"):
        forms.append(word[:-1])
    return frozenset(jm.headwords(forms))


@lru_cache(maxsize=65536)
def source_spelling(ja_token: str) -> str:
    """A katakana token's source word in Latin letters (UniDic's foreign spelling: ダーク -> dark),
    else its Hepburn romaji; '' for other tokens or without the `ja` extra."""
    tools = _unidic()
    form = lookup_form(ja_token)
    if tools is None or not form or token_class(form) != "katakana":
        return ""
    try:
        return tools[1].romaji(form).lower().replace(" ", "")
    except Exception:
        return ""


_FUNCTION_POS = {"助詞", "助動詞", "補助記号", "記号", "空白"}


@lru_cache(maxsize=65536)
def japanese_lemma(ja_token: str) -> str:
    """The lemma of a Japanese token's first content word (される / した -> 為る, 後の -> 後);
    the token itself when it has none or without the `ja` extra."""
    tools = _unidic()
    form = lookup_form(ja_token) or ja_token
    if tools is None or language.token_script(form) != "ja":
        return ja_token
    try:
        words = tools[0](form)
    except Exception:
        return ja_token
    for w in words:
        if w.feature.pos1 not in _FUNCTION_POS and w.feature.lemma:
            return str(w.feature.lemma).split("-")[0]
    return str(words[0].feature.lemma or form).split("-")[0] if words else ja_token


# ---- per-token evidence --------------------------------------------------------------------------

def _char_class(ch: str) -> str:
    if "\u30a0" <= ch <= "\u30ff" or "\uff66" <= ch <= "\uff9f":
        return "katakana"
    if "\u3040" <= ch <= "\u309f":
        return "hiragana"
    if "\u3400" <= ch <= "\u9fff" or "\uf900" <= ch <= "\ufaff":
        return "kanji"
    if ch.isdigit():
        return "digit"
    if ch.isalpha():
        return "letter"
    return "punct"


def token_class(norm: str) -> str:
    """The dominant character class of a normalised token ('junk' when it has no visible text)."""
    if not norm:
        return "junk"
    classes = Counter(_char_class(ch) for ch in norm)
    return classes.most_common(1)[0][0]


class TokenInfo(NamedTuple):
    key: str  # what counts as "the same max token"
    norm: str  # normalised text ('' for whitespace / byte fragments)
    script: str  # en / ja / other
    cls: str  # dominant character class
    content: bool  # a word that can carry a topic (for context cohesion)


@lru_cache(maxsize=1 << 18)
def token_info(raw: str) -> TokenInfo:
    norm = language.normalize_token(raw)
    script = language.token_script(norm) if norm else "other"
    cls = token_class(norm)
    content = (script == "ja" and (cls in ("kanji", "katakana") or len(norm) >= 3)) or \
              (script == "en" and len(norm) >= 4)
    return TokenInfo(norm or unicodedata.normalize("NFKC", raw), norm, script, cls, content)


def token_key(token: str) -> str:
    """What counts as "the same max token": the normalised text, or for a token with no visible
    text (newline byte, space) its raw NFKC form, so a latent firing on every newline is one token."""
    return token_info(token).key


def _latin_stem(word: str) -> str:
    return word[:5] if len(word) >= 5 else word


_NUMBER_WORDS = {"1": ("one", "first"), "2": ("two", "second"), "3": ("three", "third"),
                 "4": ("four", "fourth"), "5": ("five", "fifth"), "6": ("six",), "7": ("seven",),
                 "8": ("eight",), "9": ("nine",), "10": ("ten",)}


@lru_cache(maxsize=1 << 16)
def string_related(a: str, b: str) -> bool:
    """Two different normalised tokens are spelling / inflection forms of one word (no library)."""
    if not a or not b or a == b:
        return a == b and bool(a)
    sa, sb = language.token_script(a), language.token_script(b)
    if sa == sb == "en":
        if len(a) >= 3 and len(b) >= 3 and (a in b or b in a):
            return True
        if len(a) >= 5 and len(b) >= 5 and _latin_stem(a) == _latin_stem(b):
            return True
        if min(len(a), len(b)) < 4 or 5 * min(len(a), len(b)) < 2 * (len(a) + len(b)):
            return False  # (the ratio is at most 2 * min length / total length)
        matcher = difflib.SequenceMatcher(None, a, b)
        return matcher.quick_ratio() >= 0.8 and matcher.ratio() >= 0.8  # quick_ratio bounds ratio from above
    if sa == sb == "ja":
        return bool(set(a) & set(b) - set("のにをはがとでもへや、。"))  # a shared content character
    if {sa, sb} == {"en", "other"}:  # '1' ~ 'one' style: digits and their English number words
        digit, word = (a, b) if sa == "other" else (b, a)
        return digit.isdigit() and word in _NUMBER_WORDS.get(digit, ())
    return False


def _en_ja(a: str, b: str) -> tuple[str, str] | None:
    """(english, japanese) when one of the two tokens is English and the other Japanese."""
    sa, sb = language.token_script(a), language.token_script(b)
    if sa == "en":
        return (a, b) if sb == "ja" else None
    return (b, a) if sa == "ja" and sb == "en" else None


@lru_cache(maxsize=65536)
def _glosses_less_s(ja: str) -> frozenset[str]:
    """english_glosses(ja) without a final s (dogs -> dog), for _gloss_match's lookups."""
    return frozenset(w.rstrip("s") for w in english_glosses(ja))


def _gloss_match(en: str, ja: str) -> bool:
    """The English token is one of the Japanese token's gloss words, either with or without a final s."""
    en = lookup_form(en)
    glosses = english_glosses(ja)
    return en in glosses or en in _glosses_less_s(ja) or en.rstrip("s") in glosses


_GLOSS_STOPWORDS = frozenset("the and for with from that this one something someone thing etc".split())


@lru_cache(maxsize=1 << 16)
def linked(a: str, b: str, source: str) -> bool:
    """Are normalised tokens a and b the same meaning via `source`? The cross-script sources link
    one English and one Japanese token; gloss_same_script links two English tokens that share a
    Japanese headword (in ~ at: に) or two Japanese tokens that share an English gloss."""
    if source == "gloss_same_script":
        if a == b:
            return False
        sa, sb = language.token_script(a), language.token_script(b)
        if sa == sb == "en" and min(len(lookup_form(a)), len(lookup_form(b))) >= 2:
            return bool(japanese_headwords(a) & japanese_headwords(b))
        if sa == sb == "ja":
            return bool((english_glosses(a) & english_glosses(b)) - _GLOSS_STOPWORDS)
        return False
    pair = _en_ja(a, b)
    if pair is None:
        return False
    en, ja = pair
    if source == "gloss_ja_en":
        return _gloss_match(en, ja)
    if source == "gloss_en_ja":
        heads = japanese_headwords(en)
        return lookup_form(ja) in heads or japanese_lemma(ja) in heads
    if source == "loanword":
        spelled, word = source_spelling(ja), lookup_form(en)
        if not spelled or len(word) < 2:
            return False
        if spelled == word or (len(word) >= 3 and word in spelled) or (len(spelled) >= 3 and spelled in word):
            return True
        shorter = min(len(word), len(spelled))  # the ratio is at most 2 * shorter / total length
        if shorter < 4 or 8 * shorter < 3 * (len(word) + len(spelled)):
            return False
        matcher = difflib.SequenceMatcher(None, word, spelled)
        return matcher.quick_ratio() >= 0.75 and matcher.ratio() >= 0.75  # quick_ratio bounds ratio from above
    raise ValueError(f"unknown link source {source!r}")


def related(a: str, b: str) -> bool:
    """Are two different normalised max tokens forms of one meaning? (inflection, spelling, translation)"""
    if string_related(a, b):
        return True
    if language.token_script(a) == language.token_script(b) == "ja" and a != b:
        return japanese_lemma(a) == japanese_lemma(b) and _unidic() is not None
    return any(linked(a, b, s) for s in LINK_SOURCES)


# ---- features ------------------------------------------------------------------------------------

Z_CLIP = 3.0


@dataclass
class Evidence:
    """A latent's feature vector and what it is built from (kept in Label.evidence)."""

    features: dict[str, float]
    top_tokens: list[tuple[str, int]]
    problem: str | None  # why the record cannot be labelled (then: uninterpretable)


def _level_counts(contexts: list) -> dict[int, int]:
    """How many tokens of the contexts are at each level (0..10)."""
    try:  # levels are 0..10: as bytes, eleven C-speed counts (a Counter costs ~50 ns a token)
        data = b"".join(map(bytes, (c.levels for c in contexts)))
        counts = {k: data.count(k) for k in range(11)}
        if sum(counts.values()) == len(data):
            return counts
    except (ValueError, TypeError):  # a level outside 0..255
        pass
    return Counter(chain.from_iterable(c.levels for c in contexts))


def stat_features(record: FeatureRecord, groups: Iterable[str] | None = None) -> Evidence:
    """Features from the record's own contexts only (never its step or feature id).

    `core` and the optional `groups` (default: all) are computed; a group whose library is absent
    comes out as zeros (the decision then uses a model fitted without it)."""
    groups = set(EVIDENCE_GROUPS) if groups is None else set(groups)
    n_ctx = len(record.contexts)
    if n_ctx == 0:
        return Evidence({}, [], "no contexts")
    firing: list[tuple[int, Any]] = []  # (max index, context)
    for c in record.contexts:
        i = c.max_index  # cached on the context: the language profile reads it too
        if i >= 0 and (c.activations if c.activations is not None else c.levels)[i] > 0:
            firing.append((i, c))
    n = len(firing)
    if n == 0:
        return Evidence({}, [], "no activating token in any context")
    keys, norms, token_scripts, token_classes, _ = zip(*map(token_info, [c.tokens[i] for i, c in firing]))
    counts = Counter(keys)
    top = counts.most_common()
    top_token, top_count = top[0]
    junk = norms.count("")
    if junk == n and top_count / n < 0.8:
        return Evidence({}, top[:10], "max tokens are only whitespace or byte fragments")
    classes = Counter(token_classes)
    scripts = Counter(token_scripts)  # each context's max token
    # Only tokens of a script that can relate to the top one are looked at (string_related and
    # linked are False for any other pair): a diffuse latent has ~50 distinct max tokens.
    script_of = {t: language.token_script(t) for t in counts}
    top_script = script_of[top_token]
    same_script = [t for t in counts if script_of[t] == top_script and t != top_token] if top_script != "other" else []
    other_script = {"en": "ja", "ja": "en"}.get(top_script)
    cross_script = [t for t in counts if script_of[t] == other_script]  # en <-> ja
    spelled = same_script + [t for t in counts if (script_of[t], top_script) in (("other", "en"), ("en", "other"))]
    related = set(filter(partial(string_related, top_token), spelled))
    variants = [t for t in counts if t in related]
    variant_count = sum(counts[t] for t in variants)
    cross_variant = sum(counts[t] for t in variants if script_of[t] != top_script)
    second = top[1][0] if len(top) > 1 else ""
    level_counts = _level_counts(record.contexts)
    n_levels = sum(level_counts.values())
    n_active = n_levels - level_counts.get(0, 0)
    sum_active = sum(level * k for level, k in level_counts.items() if level > 0)
    high_per_ctx = sum(k for level, k in level_counts.items() if level >= 5) / n_ctx
    ent = language.entropy(counts)
    f = {
        "top1_share": top_count / n,
        "top2_share": (top[1][1] / n) if len(top) > 1 else 0.0,
        "variant_share": variant_count / n,
        "family_share": (top_count + variant_count) / n,
        "cross_script_variant_share": cross_variant / n,
        "distinct_ratio": len(counts) / n,
        "entropy_norm": ent / math.log2(n) if n > 1 else 0.0,
        "en_share": scripts.get("en", 0) / n,
        "ja_share": scripts.get("ja", 0) / n,
        "other_share": scripts.get("other", 0) / n,
        "script_mix": min(scripts.get("en", 0), scripts.get("ja", 0)) / n,
        "junk_share": classes.get("junk", 0) / n,
        "digit_share": classes.get("digit", 0) / n,
        "katakana_share": classes.get("katakana", 0) / n,
        "kanji_share": classes.get("kanji", 0) / n,
        "char_class_entropy": language.entropy(classes) / math.log2(7),
        "frac_active": n_active / n_levels if n_levels else 0.0,
        "mean_active_level": (sum_active / n_active / 10.0) if n_active else 0.0,
        "high_tokens_per_context": min(high_per_ctx, 10.0) / 10.0,
        "n_contexts_norm": min(n_ctx, 50) / 50.0,
        "activating_ratio": n / n_ctx,
        "log_density": math.log10(max(record.density, 1e-7)) / 7.0 + 1.0 if record.density else 0.0,
        "has_density": 1.0 if record.density else 0.0,
        # the runner-up max token is another form of the top one (synonymy)
        "top2_related": float(bool(second) and second in variants),
        "variant_types_ratio": len(variants) / len(counts),
        # context, not token: fires after one token (e.g. after "(") / at one place in the text
        "prev_top_share": max(Counter(token_info(c.tokens[i - 1]).key if i > 0 else "<start>"
                                      for i, c in firing).values()) / n,
        "max_position_mean": sum(i / max(len(c.tokens) - 1, 1) for i, c in firing) / n,
    }
    # Cross-script links to the top token, one pair of features per dictionary source.
    sources = [*(LINK_SOURCES[:2] if "gloss" in groups else ()),
               *(("loanword",) if "loanword" in groups else ()),
               *(("gloss_same_script",) if "gloss_same_script" in groups else ())]
    for source in sources:
        share = sum(counts[t] for t in (same_script if source == "gloss_same_script" else cross_script)
                    if linked(top_token, t, source)) / n
        f[f"{source}_share"] = share
        f[f"{source}_top2"] = float(bool(second) and linked(top_token, second, source))
        f[f"{source}_any"] = float(share > 0)  # a link at all (rare, so a share alone weighs little)
    if "lemma" in groups:  # inflected Japanese forms count as one token
        lemmas = Counter()
        for t, k in counts.items():
            lemmas[japanese_lemma(t) if language.token_script(t) == "ja" else t] += k
        f["lemma_top1_share"] = lemmas.most_common(1)[0][1] / n
        f["lemma_distinct_ratio"] = len(lemmas) / n
    if "context" in groups:
        f.update(_context_features(firing, f["top1_share"], f["distinct_ratio"]))
    return Evidence(f, top[:10], None)


_CONTENT_KEY: dict[str, str] = {}  # raw token -> its key if a content word, else '' (bounded by the vocabulary)


def _context_features(firing: list[tuple[int, Any]], top1_share: float, distinct_ratio: float) -> dict[str, float]:
    """Beyond the max token: do the contexts share a topic (content words recurring across
    contexts) while their max tokens differ (concept-semantic), or does one token fire in
    unrelated contexts (token)?"""
    n = len(firing)
    max_keys = Counter(token_info(c.tokens[i]).key for i, c in firing)
    per_ctx: list[set[str]] = []
    for i, c in firing:
        distinct = set(c.tokens)
        try:  # C-speed lookups once every token has been seen
            words = set(map(_CONTENT_KEY.__getitem__, distinct))
        except KeyError:
            for raw in distinct:
                if raw not in _CONTENT_KEY:
                    info = token_info(raw)
                    _CONTENT_KEY[raw] = info.key if info.content else ""
            words = set(map(_CONTENT_KEY.__getitem__, distinct))
        words.discard("")
        words.discard(token_info(c.tokens[i]).key)
        per_ctx.append(words)
    df = Counter(chain.from_iterable(per_ctx))
    # how often a context's content words recur in the other contexts (0: unrelated texts)
    cohesion = 0.0
    if n > 1:
        cohesion = sum((sum(map(df.__getitem__, words)) - len(words)) / len(words)
                       for words in per_ctx if words) / n / (n - 1)
    shared = [k for k, _ in df.most_common(3) if k not in max_keys]
    nexts = Counter(token_info(c.tokens[i + 1]).key if i + 1 < len(c.tokens) else "<end>" for i, c in firing)
    return {
        "ctx_cohesion": cohesion,
        "ctx_top_df": (df[shared[0]] / n) if shared else 0.0,
        "next_top_share": nexts.most_common(1)[0][1] / n,
        "cohesion_x_diverse": cohesion * distinct_ratio,
        "top1_x_incoherent": top1_share * (1.0 - min(cohesion * 10.0, 1.0)),
    }


def llm_features(explanation: Explanation | None, scores: Scores | None) -> dict[str, float]:
    f = {name: 0.0 for name in [*LLM_FEATURES, *SCORE_FEATURES]}
    if explanation is None or explanation.error or explanation.granularity not in GRANULARITIES:
        f["vote_missing"] = 1.0
    else:
        f[f"vote_{explanation.granularity}"] = 1.0
        f["llm_confidence"] = float(min(max(explanation.confidence or 0.0, 0.0), 1.0))
        f["llm_cross_lingual"] = 1.0 if explanation.cross_lingual else 0.0
    values = [getattr(scores, k, None) if scores else None for k in ("simulation", "detection", "fuzzing")]
    if all(v is None for v in values):
        f["scores_missing"] = 1.0
    for key, v in zip(("simulation", "detection", "fuzzing"), values):
        f[key] = 0.0 if v is None or not math.isfinite(v) else float(v)
    return f


def feature_vector(record: FeatureRecord, explanation: Explanation | None = None,
                   scores: Scores | None = None, groups: Iterable[str] | None = None) -> Evidence:
    ev = stat_features(record, groups)
    if ev.problem is None:
        ev.features.update(llm_features(explanation, scores))
    return ev


# ---- a one-line statement of the evidence --------------------------------------------------------

def _show(raw: str) -> str:
    text = language.clean_token(raw).replace("\n", "\\n")
    return f"“{text}”"


def _link_text(en: str, ja: str) -> str | None:
    """'JMdict: また = once more, once again' / 'loanword: ダーク = dark' for a linked pair, else None."""
    if linked(en, ja, "gloss_ja_en") or linked(en, ja, "gloss_en_ja"):
        glosses = _jmdict().glosses(lookup_form(ja)) if _jmdict() else []
        word = lookup_form(en)
        hit = next((i for i, g in enumerate(glosses) if word in _gloss_words(g)), None)
        shown = glosses[hit:hit + 2] if hit is not None else [word]
        return f"JMdict: {lookup_form(ja)} = {', '.join(dict.fromkeys(shown))}"
    if linked(en, ja, "loanword"):
        return f"loanword: {lookup_form(ja)} = {source_spelling(ja)}"
    return None


def en_ja_pair(top_tokens: list[str], look: int = 8) -> tuple[str | None, str | None, str | None]:
    """(English, Japanese, link text) for a latent's top max tokens (most common first): the
    first English-Japanese pair among the top `look` that a dictionary or loanword links, else
    the most common English and the most common Japanese token with no link text."""
    top = top_tokens[:look]
    for a in top:
        for b in top:
            pair = _en_ja(a, b)
            if pair and (link := _link_text(*pair)):
                return language.clean_token(pair[0]), language.clean_token(pair[1]), link
    en = next((t for t in top if language.token_script(t) == "en"), None)
    ja = next((t for t in top if language.token_script(t) == "ja"), None)
    return (language.clean_token(en) if en else None), (language.clean_token(ja) if ja else None), None


def evidence_summary(record: FeatureRecord, top_n: int = 3, tokens: list[str] | None = None) -> str:
    """A deterministic line from the decision's own evidence: the top max tokens with counts,
    the dictionary link between an English and a Japanese max token where there is one, and the
    max tokens' languages, e.g. `“ more” 10/50 · “また” 7/50 (JMdict: また = more, again) · en+ja`.
    `tokens`: language.max_tokens(record), when the caller has them."""
    n_ctx = len(record.contexts)
    raws = language.max_tokens(record) if tokens is None else tokens
    if not raws:
        return f"no activating token in {n_ctx} contexts"
    raw_counts = Counter(raws)
    key_of = {t: token_info(t).key for t in raw_counts}  # each distinct raw token's key, once
    counts = Counter(map(key_of.__getitem__, raws))
    common = [k for k, _ in counts.most_common()[:max(top_n, 8)]]
    top = common[:top_n]
    spelling: dict[str, str] = {}  # key -> its most common raw spelling
    for t, _ in raw_counts.most_common():
        spelling.setdefault(key_of[t], t)
    parts = {k: f"{_show(spelling[k])} {counts[k]}/{n_ctx}" for k in top}
    extra = []
    script = {k: language.token_script(k) for k in common[:8]}
    for a in top:  # the first English-Japanese pair among the top tokens (and the next few) that links
        pair = next(((p, b) for b in common[:8] if script[a] != script[b] and (p := _en_ja(a, b)) and _link_text(*p)),
                    None)
        if pair:
            (en, ja), b = pair
            note = f"({_link_text(en, ja)})"
            if b in parts:
                later = max(top.index(a), top.index(b))
                parts[top[later]] += f" {note}"
            else:
                extra.append(f"{_show(spelling[b])} {counts[b]}/{n_ctx} {note}")
            break
    scripts = Counter(token_info(t).script for t in raws)
    langs = "+".join(s for s in ("en", "ja") if scripts.get(s, 0) / len(raws) >= 0.1) or "other"
    return " · ".join([*(parts[k] for k in top), *extra, langs])


# ---- the model (JSON, rebuilt with numpy) --------------------------------------------------------

@dataclass
class GranularityModel:
    """Standardise -> clip -> linear + class offsets -> softmax(/temperature)."""

    feature_names: list[str]
    classes: list[str]
    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray  # [n_classes, n_features]
    intercept: np.ndarray  # [n_classes]
    temperature: float = 1.0
    info: dict[str, Any] | None = None
    bias: np.ndarray | None = None  # [n_classes] logit offsets that calibrate class shares
    groups: list[str] | None = None  # the evidence groups it was fitted on
    lo: np.ndarray | None = None  # the fitted range of each feature (inputs are clipped to it)
    hi: np.ndarray | None = None

    def logits(self, X: np.ndarray) -> np.ndarray:
        # Clip inputs to the fitted range: a linear model must not extrapolate on features far
        # outside the training data (a tiny model's dense latents). The range is the training
        # min..max (a rare but strong signal, e.g. a 30% cross-lingual share, keeps its weight);
        # models without one clip at +-Z_CLIP sd.
        if self.lo is not None and self.hi is not None:
            standardised = (np.clip(X, self.lo, self.hi) - self.mean) / self.scale
        else:
            standardised = np.clip((X - self.mean) / self.scale, -Z_CLIP, Z_CLIP)
        z = standardised @ self.coef.T + self.intercept
        return z if self.bias is None else z + self.bias

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        z = self.logits(X) / self.temperature
        z = z - z.max(axis=1, keepdims=True)
        p = np.exp(z)
        return p / p.sum(axis=1, keepdims=True)

    def requires(self) -> set[str]:
        """The optional evidence sources this model's groups need."""
        return {GROUP_SOURCES[g] for g in self.groups or [] if g in GROUP_SOURCES}

    def vector(self, features: dict[str, float]) -> np.ndarray:
        return np.array([features.get(k, 0.0) for k in self.feature_names], dtype=np.float64)

    def to_dict(self) -> dict[str, Any]:
        return {"feature_names": self.feature_names, "classes": self.classes, "mean": self.mean.tolist(),
                "scale": self.scale.tolist(), "coef": self.coef.tolist(), "intercept": self.intercept.tolist(),
                "temperature": self.temperature, "info": self.info or {},
                "bias": None if self.bias is None else self.bias.tolist(), "groups": self.groups,
                "lo": None if self.lo is None else self.lo.tolist(), "hi": None if self.hi is None else self.hi.tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GranularityModel":
        return cls(feature_names=list(d["feature_names"]), classes=list(d["classes"]),
                   mean=np.asarray(d["mean"], dtype=np.float64), scale=np.asarray(d["scale"], dtype=np.float64),
                   coef=np.asarray(d["coef"], dtype=np.float64),
                   intercept=np.asarray(d["intercept"], dtype=np.float64),
                   temperature=float(d.get("temperature", 1.0)), info=d.get("info") or {},
                   bias=None if d.get("bias") is None else np.asarray(d["bias"], dtype=np.float64),
                   groups=d.get("groups"),
                   lo=None if d.get("lo") is None else np.asarray(d["lo"], dtype=np.float64),
                   hi=None if d.get("hi") is None else np.asarray(d["hi"], dtype=np.float64))


def fit_model(X: np.ndarray, y: list[str], feature_names: list[str], C: float = 1.0,
              class_weight: str | dict | None = None, seed: int = 0) -> GranularityModel:
    """Fit standardise + multinomial logistic regression with scikit-learn; keep only the numbers."""
    from sklearn.linear_model import LogisticRegression

    mean = X.mean(axis=0)
    sd = X.std(axis=0)
    scale = np.where(sd > 0, sd, 1.0)
    lr = LogisticRegression(C=C, class_weight=class_weight, max_iter=5000, random_state=seed)
    lr.fit((X - mean) / scale, y)
    coef, intercept, classes = lr.coef_, lr.intercept_, [str(c) for c in lr.classes_]
    if len(classes) == 2:  # binary sklearn models keep one row; make it two-class softmax
        coef = np.vstack([-coef[0] / 2, coef[0] / 2])
        intercept = np.array([-intercept[0] / 2, intercept[0] / 2])
    return GranularityModel(feature_names=list(feature_names), classes=classes, mean=mean,
                            scale=scale, coef=coef, intercept=intercept, lo=X.min(axis=0), hi=X.max(axis=0))


def save_models(models: dict[str, GranularityModel], path: Path = MODEL_PATH, info: dict | None = None) -> None:
    payload = {"format_version": MODEL_FORMAT_VERSION, "info": info or {},
               "models": {name: m.to_dict() for name, m in models.items()}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, ensure_ascii=False))


@lru_cache(maxsize=4)
def load_models(path: Path = MODEL_PATH) -> dict[str, GranularityModel]:
    """The shipped models by name: 'stats' (the chosen evidence, no LLM input), 'stats-fallback'
    (only evidence that needs no optional library), 'both' (stats + LLM vote + scores) if shipped."""
    d = json.loads(Path(path).read_text())
    if d.get("format_version") != MODEL_FORMAT_VERSION:
        raise ValueError(f"{path}: granularity model format {d.get('format_version')} "
                         f"(this autointerp reads {MODEL_FORMAT_VERSION})")
    return {name: GranularityModel.from_dict(m) for name, m in d["models"].items()}


# ---- labels --------------------------------------------------------------------------------------

def _has_llm_evidence(explanation: Explanation | None, scores: Scores | None) -> bool:
    return (explanation is not None and not explanation.error and explanation.granularity in GRANULARITIES) \
        or (scores is not None and any(getattr(scores, k) is not None for k in ("simulation", "detection", "fuzzing")))


def choose_model(models: dict[str, GranularityModel], llm: bool = False) -> str:
    """The first shipped model whose evidence sources are all present here."""
    present = {name for name, s in evidence_sources().items() if s["available"]}
    order = (["both"] if llm else []) + ["stats", "stats-fallback"]
    for name in order:
        if name in models and models[name].requires() <= present:
            return name
    return "stats" if "stats" in models else next(iter(models))


def decide(record: FeatureRecord, explanation: Explanation | None = None, scores: Scores | None = None,
           models: dict[str, GranularityModel] | None = None) -> tuple[str, float, dict[str, Any]]:
    """(granularity, confidence, evidence) for one latent."""
    models = models if models is not None else load_models()
    name = choose_model(models, _has_llm_evidence(explanation, scores))
    model = models[name]
    ev = feature_vector(record, explanation, scores, model.groups)  # only the evidence it uses
    if ev.problem is not None:
        return "uninterpretable", 1.0, {"reason": ev.problem, "top_tokens": ev.top_tokens}
    x = model.vector(ev.features)[None, :]
    used = set(model.feature_names)
    proba = model.predict_proba(x)[0]
    best = int(np.argmax(proba))
    evidence = {"model": name, "model_version": (model.info or {}).get("version"),
                "evidence_groups": model.groups,
                "probabilities": {c: round(float(p), 4) for c, p in zip(model.classes, proba)},
                "features": {k: round(float(v), 4) for k, v in ev.features.items() if k in used},
                "top_tokens": ev.top_tokens, "lexicon": lexicon_available()}
    if explanation is not None:
        evidence["explainer_vote"] = explanation.granularity
        evidence["explainer_confidence"] = explanation.confidence
    return model.classes[best], float(proba[best]), evidence


METHODS = ("simulation", "detection", "fuzzing")


def label_scores(sc: Scores | None) -> dict[str, Any]:
    """A Label's `scores`: each method's value, its bootstrap ci95 and AUC where computed, and n,
    the examples it rests on (answered ones for detection/fuzzing, windows for simulation); {}
    without scores."""
    if sc is None:
        return {}
    out: dict[str, Any] = {m: getattr(sc, m) for m in METHODS}
    out["ci95"] = dict(sc.ci95 or {})
    out["auc"] = dict(sc.auc or {})
    n = {}
    for m in METHODS:
        info = (sc.simulator or {}).get(m) or {}
        count = info.get("answered", (info.get("n_activating") or 0) + (info.get("n_non_activating") or 0))
        if getattr(sc, m) is not None and count:
            n[m] = int(count)
    out["n"] = n
    return out


def label_record(record: FeatureRecord, expl: Explanation | None = None, sc: Scores | None = None,
                 models: dict[str, GranularityModel] | None = None, texts: list[str] | None = None, *,
                 sampled: bool = False, scores_noise: bool = False) -> Label:
    """The Label of one latent: calibrated granularity, language trend + profile, evidence summary,
    scores, explainer. `texts`: its language.context_texts, when the caller has them.
    `scores_noise`: the run's control found no signal, so the scores are kept on the label but do
    not enter the decision. `sampled`: the latent is in the LLM sample."""
    try:
        granularity, confidence, evidence = decide(record, expl, None if scores_noise else sc, models)
        error = evidence.get("reason")
    except Exception as exc:  # never lose a latent: label it and say why
        granularity, confidence, evidence = "uninterpretable", 0.0, {}
        error = f"granularity decision failed: {type(exc).__name__}: {exc}"
    try:
        tokens = language.max_tokens(record)  # read by both below
        profile = language.profile(record, texts=texts, tokens=tokens)
    except Exception as exc:
        tokens = None
        profile, error = {"trend": "mix", "bilingual_firing": False}, error or f"language profile failed: {exc}"
    try:
        summary = evidence_summary(record, tokens=tokens)
    except Exception as exc:
        summary, error = "", error or f"evidence summary failed: {exc}"
    features = evidence.get("features", {})
    # the paper's cross-lingual: a concept-synonym latent whose English and Japanese words are linked
    cross = granularity == "concept-synonym" and (
        features.get("cross_script_variant_share", 0.0) > 0
        or any(features.get(f"{s}_share", 0.0) > 0 for s in LINK_SOURCES))
    return Label(
        checkpoint_step=record.checkpoint_step, feature=record.feature,
        description=expl.description if expl else "",
        granularity=granularity, cross_lingual=cross, language=profile.get("trend", "mix"),
        language_profile=profile, scores=label_scores(sc),
        confidence=round(confidence, 4), explainer=expl.explainer if expl else {},
        error=error or (expl.error if expl else None), evidence=evidence,
        evidence_summary=summary, bilingual_firing=bool(profile.get("bilingual_firing")), sampled=sampled,
        scores_noise=bool(scores_noise and sc is not None), layer=record.key.layer)


def iter_labels(records: Iterable[FeatureRecord], explanations: Iterable[Explanation] | None = None,
                scores: Iterable[Scores] | None = None, models: dict[str, GranularityModel] | None = None,
                chunk: int = 256) -> Iterator[Label]:
    """build_labels over a stream: one Label per record, in order, holding `chunk` records at a
    time (their context languages are detected together, in one langdetect batch)."""
    by_expl = {e.key: e for e in explanations or []}
    by_score = {s.key: s for s in scores or []}
    models = models if models is not None else load_models()
    it = iter(records)
    while batch := list(islice(it, chunk)):
        try:
            texts = language.detect_records(batch)
        except Exception:  # a text langdetect chokes on: each latent's profile reports its own error
            texts = [None] * len(batch)
        for record, record_texts in zip(batch, texts):
            yield label_record(record, by_expl.get(record.key), by_score.get(record.key), models, record_texts)


def build_labels(records: Iterable[FeatureRecord], explanations: Iterable[Explanation] | None = None,
                 scores: Iterable[Scores] | None = None,
                 models: dict[str, GranularityModel] | None = None) -> list[Label]:
    """One Label per record: calibrated granularity, language trend + profile, scores, explainer.

    With explanations None (no server reachable) the statistical model decides alone.
    """
    return list(iter_labels(records, explanations, scores, models))
