"""A token's text as each place shows it: one function, one rule per target.

Every target first reads the token as text (labels.language.clean_token): SentencePiece's '▁'
becomes a space, a byte token like '<0x0A>' its character (a lone byte >= 0x80 nothing), U+FFFD
nothing. Then:

=========================  =====================  =====================  =====================
                           prompt                 terminal               html
=========================  =====================  =====================  =====================
byte-level BPE Ġ / Ċ       kept as they are       space / newline        space / newline
newline (\\n; \\r\\n, \\r)     ↵ (lone \\r: dropped)   ↵                      ↵
tab                        a space                ⇥                      ⇥
other control characters   kept as they are       \\xNN (\\uNNNN)          \\xNN (\\uNNNN)
format characters (Cf)     kept                   \\uNNNN                 kept, but bidi controls
                                                                         as \\uNNNN
<< and >>                  ‹‹ and ›› with         kept                   kept
                           escape_markers=True
=========================  =====================  =====================  =====================

prompt: what the explainer and scorer prompts show (explainer.snippet, scorers' shown_text and
simulation). Prompts are hashed into the LLM cache key and the scores rest on them, so this rule
is frozen: it is the one the prompts were built with, byte for byte (no Ġ/Ċ rule, no escapes).
terminal: `records show`, `human annotate`, the evidence line of a label. Nothing a terminal would
act on (escape sequences, bidi overrides, zero-width characters) reaches it.
html: the report's context windows and lineage tokens. Plain text: HTML escaping is jinja2's
(autoescape), so '<b>' comes back as '<b>'. Format characters other than bidi controls (e.g. the
zero-width joiner inside an emoji) are left to the browser; bidi controls would reorder the page.

The Ġ/Ċ rule assumes the token is a raw byte-level BPE piece (records imported from such a
tokenizer); this project's own records hold decoded text, where the rule is a no-op unless the
text itself has Ġ or Ċ (Maltese).
"""

from __future__ import annotations

import re
import unicodedata
from typing import Literal

from autointerp.labels.language import clean_token

Target = Literal["prompt", "terminal", "html"]

_NEWLINE = re.compile(r"\r\n?|\n")
_BIDI = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def _escape(ch: str) -> str:
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def _visible(text: str, keep_format: bool) -> str:
    """The terminal/html rule after clean_token: Ġ/Ċ, newline ↵, tab ⇥, other controls escaped."""
    text = _NEWLINE.sub("↵", text.replace("Ġ", " ").replace("Ċ", "\n")).replace("\t", "⇥")
    out = []
    for ch in text:
        cat = unicodedata.category(ch)
        if cat[0] == "C" and not (keep_format and cat == "Cf" and ch not in _BIDI):
            ch = _escape(ch)
        out.append(ch)
    return "".join(out)


def shown(token: str, target: Target, *, escape_markers: bool = False) -> str:
    """`token` as `target` shows it (the table in this module's docstring).

    escape_markers: << and >> inside the token become ‹‹ and ›› (before the newline rule). The
    explainer's snippets ask for it (a token's own << would read as a highlight); the scorers'
    prompts have always shown such tokens as they are, and escaping there would change their
    prompts, so their cached answers and scores."""
    text = clean_token(token)
    if escape_markers:
        text = text.replace("<<", "‹‹").replace(">>", "››")
    if target == "prompt":
        return text.replace("\r", "").replace("\n", "↵").replace("\t", " ")
    if target == "terminal":
        return _visible(text, keep_format=False)
    if target == "html":
        return _visible(text, keep_format=True)
    raise ValueError(f"unknown display target {target!r}: prompt, terminal or html")
