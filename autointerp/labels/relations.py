"""How two max tokens of a latent relate: spelling / inflection variants (no library), and the
same meaning across scripts through the optional sources (JMdict glosses both ways, loanword
source spellings, shared translations, UniDic lemmas); and the text that shows such a link
(`JMdict: また = once more` / `loanword: ダーク = dark`)."""

from __future__ import annotations

import difflib
from functools import lru_cache

from autointerp.labels import language
from autointerp.labels.dictionary import (english_glosses, gloss_words, japanese_headwords, japanese_lemma,
                                          jmdict, lookup_form, source_spelling, unidic)

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
        word = lookup_form(en)
        hit = next((i for i, g in enumerate(glosses) if word in gloss_words(g)), None)
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
            pair = en_ja(a, b)
            if pair and (link := link_text(*pair)):
                return language.clean_token(pair[0]), language.clean_token(pair[1]), link
    en = next((t for t in top if language.token_script(t) == "en"), None)
    ja = next((t for t in top if language.token_script(t) == "ja"), None)
    return (language.clean_token(en) if en else None), (language.clean_token(ja) if ja else None), None
