"""Token facts: a max token's normalised form, script, dominant character class, and what
counts as "the same max token" (token_key). No optional library; every lookup is cached."""

from __future__ import annotations

import unicodedata
from collections import Counter
from functools import lru_cache
from typing import NamedTuple

from autointerp.labels import language


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
