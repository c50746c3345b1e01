"""Fast record decoders: what reads many records but only part of each.

msgspec decodes a records line straight into typed objects and skips what a reader does not
need (negatives, extras), and a context's tokens are decoded once however many latents show
it; `record_key` reads a line's Key from its first bytes. The result is the same FeatureRecord
the general reader (records.read) gives.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterator

import msgspec

from autointerp.errors import UserError
from autointerp.jsonl import OnError, iter_lines
from autointerp.schema import SCHEMA_VERSION, Context, FeatureRecord, Key, layer_or_none


class _LeanContext(msgspec.Struct):
    tokens: msgspec.Raw  # decoded through _tokens(): a whole SAE's contexts repeat across latents
    levels: list[int]
    activations: list[float] | None = None


class _LeanRecord(msgspec.Struct, kw_only=True):
    """What a label reads of a record: msgspec decodes it straight into typed objects and skips
    the rest (negatives, extras) unparsed, ~3x faster than json.loads + FeatureRecord.from_dict."""

    model: str = ""
    layer: int = -1
    checkpoint_step: int | None = None
    feature: int
    contexts: list[_LeanContext] = []
    density: float | None = None
    max_activation: float | None = None
    schema_version: int = SCHEMA_VERSION


_decode_lean = msgspec.json.Decoder(_LeanRecord).decode
_decode_tokens = msgspec.json.Decoder(list[str]).decode
_TOKENS: dict[bytes, list[str]] = {}  # a context's tokens as JSON -> the decoded list, shared by its latents
_TOKENS_LIMIT = 1 << 14  # contexts (~5 KB each with their strings): ~80 MB at most per process


def _tokens(raw: msgspec.Raw) -> list[str]:
    """A context's tokens, decoded once per distinct context (the same list object is shared:
    contexts are never changed once read)."""
    key = bytes(raw)
    tokens = _TOKENS.get(key)
    if tokens is None:
        tokens = _decode_tokens(key)
        if len(_TOKENS) >= _TOKENS_LIMIT:
            _TOKENS.clear()
        _TOKENS[key] = tokens
    return tokens


def lean_record(line: str | bytes) -> FeatureRecord:
    """A record without negatives or extras, for what reads only the top contexts (statistical
    labels, the report). A line msgspec's strict types refuse
    (a null model, levels written as 3.0, a length mismatch, another schema version) goes the
    general way, which converts it, or raises the error every reader gives."""
    try:
        r = _decode_lean(line)
        tokens = [_tokens(c.tokens) for c in r.contexts]
    except msgspec.DecodeError:  # msgspec.ValidationError included
        r = None
    if r is not None and r.schema_version == SCHEMA_VERSION:
        levels, activations = [c.levels for c in r.contexts], [c.activations for c in r.contexts]
        if _lengths_agree(tokens, levels, activations):
            return FeatureRecord(r.model, r.layer, r.checkpoint_step, r.feature,
                                 list(map(Context, tokens, levels, activations)),
                                 density=r.density, max_activation=r.max_activation)
    d = json.loads(line)
    d["negatives"] = []
    return FeatureRecord.from_dict(d)


def _lengths_agree(tokens: list[list], levels: list[list], activations: list[list | None]) -> bool:
    """Each context has as many levels (and activations, where it has them) as tokens."""
    lengths = list(map(len, tokens))
    if lengths != list(map(len, levels)):
        return False
    if None in activations:  # (contexts written without activations)
        return all(a is None or len(a) == n for a, n in zip(activations, lengths))
    return list(map(len, activations)) == lengths


def stream_lean_records(path: str | Path, on_error: OnError = "fail", warn=None) -> Iterator[FeatureRecord]:
    """stream_records without negatives or extras (lean_record), with the same error handling."""
    for lineno, line in iter_lines(path, binary=True):
        try:
            yield lean_record(line)
        except UserError:
            raise
        except (ValueError, KeyError, TypeError) as exc:
            message = f"{path}:{lineno}: malformed line ({type(exc).__name__}: {exc})"
            if on_error == "fail":
                raise UserError(message) from None
            if warn:
                warn(message)


class _RecordKey(msgspec.Struct, kw_only=True):
    layer: int | None = None
    checkpoint_step: int | None = None
    feature: int
    contexts: msgspec.Raw = msgspec.Raw()  # skipped unparsed: only whether it is empty matters


_decode_key = msgspec.json.Decoder(_RecordKey).decode
# The fields as this project writes them, near the start of a line (before the contexts); a line
# written otherwise (another key order) is decoded whole.
_KEY_FIELD = re.compile(rb'(?<!\\)"(layer|checkpoint_step|feature|contexts)"\s*:\s*(null|-?\d+|\[\s*\]?)')


def record_key(line: bytes | str) -> tuple[Key, bool]:
    """(Key, live) of one records line, live = it has contexts; reads only the line's first
    bytes when it starts as written here."""
    raw = line.encode() if isinstance(line, str) else line
    found = {m.group(1): m.group(2) for m in _KEY_FIELD.finditer(raw, 0, 1024)}
    if len(found) == 4 and found[b"feature"] not in (b"null",) and not found[b"feature"].startswith(b"[") \
            and not found[b"layer"].startswith(b"["):
        step, layer = found[b"checkpoint_step"], found[b"layer"]
        key = Key(None if step == b"null" else int(step), None if layer == b"null" else layer_or_none(int(layer)),
                  int(found[b"feature"]))
        return key, found[b"contexts"].rstrip() == b"["
    key = _decode_key(raw)
    return Key(key.checkpoint_step, layer_or_none(key.layer), key.feature), bytes(key.contexts).strip() not in (b"", b"null", b"[]")


def scan_records(path: str | Path) -> Iterator[tuple[Key, bool, bytes]]:
    """(Key, live, line) of every line of a records file, decoding only
    the key: a 150 MB file in well under a second, so a command can pick latents (a sample, a
    resume point) before it parses the few it shows (lean_record(line))."""
    for lineno, line in iter_lines(path, binary=True):
        try:
            key, live = record_key(line)
        except (ValueError, msgspec.DecodeError) as exc:
            raise UserError(f"{path}:{lineno}: malformed line ({type(exc).__name__}: {exc})") from None
        yield key, live, line
