"""How two max tokens of a latent relate: spelling / inflection variants (no library); forms of
one word (same_word: English lemmas from lemminflect, Japanese lemmas from UniDic); the same
meaning in two words through the optional sources (JMdict glosses both ways, loanword source
spellings, shared JMdict senses or KANJIDIC meanings), between content words only; a latent's
synonym link (synonym_link: the words of the top token's meaning and the share of the contexts
they cover); and the text that shows a link (`JMdict: また = once more` / `loanword: ダーク = dark`)."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from functools import lru_cache

from autointerp.labels import language
from autointerp.labels.dictionary import (english_glosses, english_lemmas, gloss_words, is_function_word,
                                          japanese_headwords, japanese_lemma, japanese_senses, jmdict, kanji_meanings,
                                          lookup_form, source_spelling, unidic)

LINK_SOURCES = ("gloss_ja_en", "gloss_en_ja", "loanword")  # cross-script links a group is named after


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


def en_ja(a: str, b: str) -> tuple[str, str] | None:
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
    """Are normalised tokens a and b the same meaning via `source`? Content words only: a function
    word (dictionary.is_function_word: ' the', が, です) links nothing, or JMdict's rare senses of
    them link anything (が = 'the self'). The cross-script sources link one English and one
    Japanese token; gloss_same_script links two Japanese words that share a whole JMdict sense
    (発売 ~ リリース: 'release'). Two English words are not linked: JMdict's English glosses
    put near-synonyms in one sense (command ~ control, process ~ sequence), and a shared
    headword links still more (search ~ depends)."""
    if is_function_word(a) or is_function_word(b):
        return False
    if source == "gloss_same_script":
        if a == b:
            return False
        sa, sb = language.token_script(a), language.token_script(b)
        if sa == sb == "ja":
            return bool((japanese_senses(a) & japanese_senses(b)) - _GLOSS_STOPWORDS)
        return False
    pair = en_ja(a, b)
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


@lru_cache(maxsize=1 << 16)
def same_word(a: str, b: str) -> bool:
    """Are two normalised tokens forms or spellings of one word (run / running, recognised /
    recognized, full / fully, http / https, configure / configuration, 後の / 後に)? English:
    a shared lemma (lemminflect), one word the start of the other (4 letters or more), or a
    shared start of 6 letters; Japanese: one is the other with kana after it (使 / 使い, 重要 /
    重要な) or UniDic's lemma. Without the libraries, the spelling rules only. A different word
    of the same meaning is not the same word."""
    if a == b:
        return True
    sa, sb = language.token_script(a), language.token_script(b)
    if sa == sb == "en":
        x, y = sorted((lookup_form(a), lookup_form(b)), key=len)
        if (len(x) >= 4 and y.startswith(x)) or (len(x) >= 6 and x[:6] == y[:6]):
            return True
        return bool(english_lemmas(a) & english_lemmas(b))
    if sa == sb == "ja":
        x, y = sorted((lookup_form(a), lookup_form(b)), key=len)
        if x and y.startswith(x) and all("\u3040" <= ch <= "\u309f" for ch in y[len(x):]):
            return True  # okurigana or a particle after the same stem
        return unidic() is not None and japanese_lemma(a) == japanese_lemma(b)
    return False


def meaning_linked(a: str, b: str) -> str | None:
    """The source that links two different words of one meaning (content words), else None."""
    for source in (*LINK_SOURCES, "gloss_same_script"):
        if linked(a, b, source):
            return source
    return None


def related(a: str, b: str) -> bool:
    """Are two different normalised max tokens forms of one meaning? (inflection, spelling, translation)"""
    if string_related(a, b):
        return True
    if language.token_script(a) == language.token_script(b) == "ja" and a != b:
        return japanese_lemma(a) == japanese_lemma(b) and unidic() is not None
    return any(linked(a, b, s) for s in LINK_SOURCES)


# ---- showing a link ------------------------------------------------------------------------------

def link_text(en: str, ja: str) -> str | None:
    """'JMdict: また = once more, once again' / 'loanword: ダーク = dark' for a linked pair, else None."""
    if linked(en, ja, "gloss_ja_en") or linked(en, ja, "gloss_en_ja"):
        glosses = jmdict().glosses(lookup_form(ja)) if jmdict() else []
        name = "JMdict"
        if not glosses and (glosses := kanji_meanings(lookup_form(ja))):
            name = "KANJIDIC"
        word = lookup_form(en)
        hit = next((i for i, g in enumerate(glosses) if word in gloss_words(g)), None)
        shown = glosses[hit:hit + 2] if hit is not None else [word]
        return f"{name}: {lookup_form(ja)} = {', '.join(dict.fromkeys(shown))}"
    if linked(en, ja, "loanword"):
        return f"loanword: {lookup_form(ja)} = {source_spelling(ja)}"
    return None


# ---- a latent's synonym link ---------------------------------------------------------------------

@dataclass
class SynonymLink:
    """The words of the top max token's meaning among a latent's max tokens: the top word (its
    forms), the words linked to it (partners, each with its forms), what links the first partner
    (`JMdict: ネットワーク = network`), and how many firing contexts they cover together."""

    top: list[tuple[str, int]]  # the top word's forms (normalised token, contexts)
    partners: list[list[tuple[str, int]]]  # each linked word's forms, most contexts first
    source: str | None  # what links the first partner (a LINK_SOURCES name or gloss_same_script)
    text: str | None  # the first partner's link as text
    n: int  # firing contexts

    @property
    def top_count(self) -> int:
        return sum(k for _, k in self.top)

    @property
    def partner_count(self) -> int:
        return sum(k for word in self.partners for _, k in word)

    @property
    def covered(self) -> int:
        """Firing contexts whose max token is a word of the meaning (0 without a partner)."""
        return self.top_count + self.partner_count if self.partners else 0

    def to_dict(self) -> dict:
        """What a label keeps (evidence["link"]): the report reads it, never recomputes it."""
        first = self.partners[0][0][0] if self.partners else None
        pair = en_ja(self.top[0][0], first) if first else None
        return {"words": [[t, k] for t, k in self.top], "partners": [[[t, k] for t, k in w] for w in self.partners],
                "source": self.source, "text": self.text, "covered": self.covered, "of": self.n,
                "en": language.clean_token(pair[0]) if pair else None,
                "ja": language.clean_token(pair[1]) if pair else None}


def synonym_link(counts: list[tuple[str, int]], n: int, look: int = 12,
                 fragments: dict[str, float] | None = None) -> SynonymLink:
    """The top token's word and the words of its meaning among the `look` most common max tokens
    (normalised, most common first; n firing contexts). A partner is a different word linked to a
    form of the top word by a dictionary, loanword or shared-sense link between content words;
    each partner takes its own forms along. Forms and spellings of one word are never a partner:
    run / running / creation is one word. `fragments`: each token's share of its contexts in which
    it is a piece of a longer word (evidence.fragment_shares); a token that is one in most of them
    is no partner (プレ of プレス is not "pre")."""
    if not counts:
        return SynonymLink([], [], None, None, n)
    tokens = counts[:look]
    forms = [tokens[0]]
    rest = []
    for t, k in tokens[1:]:  # a form of any form joins (create ~ creating ~ creation)
        (forms if any(same_word(f, t) for f, _ in forms) else rest).append((t, k))
    fragments = fragments or {}
    rest = [(t, k) for t, k in rest if fragments.get(t, 0.0) <= 0.5]
    found: list[tuple[list[tuple[str, int]], str, str | None]] = []  # (word's forms, source, text)
    taken: set[str] = set()
    for t, _ in rest:  # linked to a form of the top word itself: a chain (事 ~ 場合 ~ 例) drifts
        if t in taken:
            continue
        hit = next(((f, s) for f, _ in forms if (s := meaning_linked(f, t))), None)
        if hit is None:
            continue
        word = [(u, j) for u, j in rest if u not in taken and same_word(t, u)]
        taken.update(u for u, _ in word)
        pair = en_ja(hit[0], t)
        found.append((word, hit[1], link_text(*pair) if pair else _same_script_text(hit[0], t)))
    found.sort(key=lambda w: -sum(k for _, k in w[0]))
    return SynonymLink(forms, [w for w, _, _ in found], found[0][1] if found else None,
                       found[0][2] if found else None, n)


def _same_script_text(a: str, b: str) -> str | None:
    """'JMdict: 発売 ~ リリース = release' for two Japanese words that share a sense."""
    shared = sorted(japanese_senses(a) & japanese_senses(b) - _GLOSS_STOPWORDS)
    return f"JMdict: {lookup_form(a)} ~ {lookup_form(b)} = {', '.join(shared[:2])}" if shared else None
