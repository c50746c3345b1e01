"""The data contract between stages: feature records and labels (docs/design.md).

Every stage reads and writes these dataclasses through `iter_jsonl` / `write_jsonl`,
so a file written by one stage is the input of the next.

Files are JSONL, plain or compressed: `.gz` (gzip) or `.zst` (zstandard) by the name when
writing, by the first bytes when reading (so every reader takes every form). Records are stored
as `records.jsonl.zst`: the same JSONL bytes, so the exchange format is exact by construction
(`zstd -d` gives the plain file), at ~1/8-1/20 of the bytes, since contexts repeat across a
SAE's latents and zstd's long-distance window finds them.
"""

from __future__ import annotations

import gzip
import io
import json
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, NamedTuple, TypeVar

import msgspec

from autointerp.errors import UserError

SCHEMA_VERSION = 1
GRANULARITIES = ("token", "concept-synonym", "concept-semantic", "uninterpretable")
LANGUAGE_TRENDS = ("en", "ja", "mix")
# llm-jp-sae's demo data codes its human labels 1-4 (its docs/main.js).
LLMJP_GRANULARITY_CODES = {1: "uninterpretable", 2: "concept-semantic", 3: "concept-synonym", 4: "token"}
Granularity = Literal["token", "concept-synonym", "concept-semantic", "uninterpretable"]


class Key(NamedTuple):
    """Which latent a line is about: the SAE's site (training checkpoint and layer) and the
    latent's index. Every stage joins its rows to the records on it."""

    checkpoint_step: int | None
    layer: int | None
    feature: int

    def sort_key(self) -> tuple[int, int, int]:
        return (self.checkpoint_step or 0, self.layer if self.layer is not None else -1, self.feature)


def _layer(value: Any) -> int | None:
    """A layer as stored: records write -1 where it is not known."""
    return None if value is None or int(value) < 0 else int(value)


def row_key(d: dict[str, Any]) -> Key:
    """The Key of a parsed JSONL line of any stage."""
    step = d.get("checkpoint_step")
    return Key(None if step is None else int(step), _layer(d.get("layer")), int(d["feature"]))


def three_way(granularity: str | None) -> str | None:
    """Token / concept / uninterpretable: the card's coarser view of the four classes."""
    if granularity is None:
        return None
    return "concept" if granularity.startswith("concept") else granularity


class _cached:
    """functools.cached_property without its lock (Python 3.11 takes a lock on every first access,
    and a whole SAE's labels read the max position of millions of contexts once each)."""

    def __init__(self, fn):
        self.fn, self.name = fn, fn.__name__
        self.__doc__ = fn.__doc__

    def __get__(self, obj, owner=None):
        if obj is None:
            return self
        value = obj.__dict__[self.name] = self.fn(obj)  # later reads find the instance's own attribute
        return value


@dataclass
class Context:
    """One context window: tokens as strings, levels 0..10 against the latent's max."""

    tokens: list[str]
    levels: list[int]
    activations: list[float] | None = None

    @_cached  # contexts are not changed once built; stat features ask for it many times
    def max_index(self) -> int:
        """The first position of the largest activation (of the largest level without activations)."""
        values = self.activations if self.activations is not None else self.levels
        return values.index(max(values)) if values else -1

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"tokens": self.tokens, "levels": self.levels}
        if self.activations is not None:
            out["activations"] = self.activations
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Context":
        tokens, levels = d["tokens"], d["levels"]
        if len(tokens) != len(levels):
            raise ValueError(f"context has {len(tokens)} tokens but {len(levels)} levels")
        acts = d.get("activations")
        if acts is not None and len(acts) != len(tokens):
            raise ValueError(f"context has {len(tokens)} tokens but {len(acts)} activations")
        # map() over the C builtins: a whole SAE's records hold millions of these values
        return cls(tokens=list(map(str, tokens)), levels=list(map(int, levels)),
                   activations=None if acts is None else list(map(float, acts)))


@dataclass
class FeatureRecord:
    """One latent's evidence. `extra` keeps fields this version does not know (e.g. human labels)."""

    model: str
    layer: int
    checkpoint_step: int | None
    feature: int
    contexts: list[Context]
    negatives: list[Context] = field(default_factory=list)
    density: float | None = None
    max_activation: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> Key:
        return Key(self.checkpoint_step, _layer(self.layer), self.feature)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "model": self.model, "layer": self.layer, "checkpoint_step": self.checkpoint_step,
            "feature": self.feature, "contexts": [c.to_dict() for c in self.contexts],
            "negatives": [c.to_dict() for c in self.negatives],
            "density": self.density, "max_activation": self.max_activation,
        }
        out.update(self.extra)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FeatureRecord":
        _check_version(d)
        known = {f.name for f in fields(cls)} - {"extra"}
        return cls(
            model=str(d.get("model", "")), layer=int(d.get("layer", -1)),
            checkpoint_step=None if d.get("checkpoint_step") is None else int(d["checkpoint_step"]),
            feature=int(d["feature"]),
            contexts=[Context.from_dict(c) for c in d.get("contexts") or []],
            negatives=[Context.from_dict(c) for c in d.get("negatives") or []],
            density=None if d.get("density") is None else float(d["density"]),
            max_activation=None if d.get("max_activation") is None else float(d["max_activation"]),
            extra={k: v for k, v in d.items() if k not in known},
        )


class LatentRow:
    """One latent's line in a stage's JSONL output, joined across stages on its Key."""

    checkpoint_step: int | None
    feature: int
    layer: int | None

    @property
    def key(self) -> Key:
        return Key(self.checkpoint_step, self.layer, self.feature)

    def to_dict(self) -> dict[str, Any]:
        # shallow (asdict deep-copies every nested dict: a third of writing a whole SAE's labels)
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class Explanation(LatentRow):
    """What the explainer LLM said about one latent (the `explain` stage's output)."""

    checkpoint_step: int | None
    feature: int
    description: str  # one line; "" when the explainer gave no valid answer (then `error` says why)
    # An LLM vote on granularity and the cross-lingual flag, with its confidence: files written
    # before the explainer stopped voting carry them; the explainer writes None now.
    granularity: str | None = None
    cross_lingual: bool | None = None
    confidence: float | None = None
    explainer: dict[str, Any] = field(default_factory=dict)  # {"model", "prompt_sha256", "engine", "form"}
    error: str | None = None
    layer: int | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Explanation":
        out = {f.name: d.get(f.name) for f in fields(cls)}
        out["explainer"] = out["explainer"] or {}
        out["layer"] = _layer(out["layer"])
        out["description"] = out["description"] or ""
        return cls(**out)


@dataclass
class Scores(LatentRow):
    """Simulator scores for one latent (the `score` stage's output). None = not computed."""

    checkpoint_step: int | None
    feature: int
    simulation: float | None = None
    detection: float | None = None  # balanced accuracy
    fuzzing: float | None = None  # balanced accuracy
    simulator: dict[str, Any] = field(default_factory=dict)  # model, examples shown, metric details
    error: str | None = None
    ci95: dict[str, list[float]] = field(default_factory=dict)  # method -> [lo, hi], seeded bootstrap
    auc: dict[str, float] = field(default_factory=dict)  # detection/fuzzing AUC where logprobs came back
    layer: int | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Scores":
        out = {f.name: d.get(f.name) for f in fields(cls) if f.name in d or f.name in ("checkpoint_step", "feature")}
        out["layer"] = _layer(out.get("layer"))
        for name in ("simulator", "ci95", "auc"):
            if out.get(name) is None:
                out.pop(name, None)
        return cls(**out)


@dataclass
class Label(LatentRow):
    """The final label of one latent (the label schema of docs/design.md).

    `label` writes one for every live latent: the statistical decision, language and evidence.
    Latents in the LLM sample (`sampled`) also carry the explainer's `description` and the
    scorers' `scores`; the others have "" and {}."""

    checkpoint_step: int | None
    feature: int
    description: str
    granularity: str | None
    cross_lingual: bool  # the paper's meaning: a concept-synonym latent joining English and Japanese words
    language: str  # en | ja | mix (the paper's trend rule)
    language_profile: dict[str, Any]
    # {"simulation", "detection", "fuzzing": float | None, "ci95": {method: [lo, hi]},
    #  "auc": {method: float}, "n": {method: int}}; {} for a latent outside the LLM sample
    scores: dict[str, Any]
    confidence: float
    explainer: dict[str, Any]
    error: str | None = None
    evidence: dict[str, Any] = field(default_factory=dict)  # what the decision rested on
    evidence_summary: str = ""  # granularity.evidence_summary: top max tokens, dictionary link, scripts
    bilingual_firing: bool = False  # English and Japanese max tokens, each >= 10% of the activating contexts
    sampled: bool = False  # in the LLM sample (explained and scored)
    scores_noise: bool = False  # the run's control found no signal in the scores: they stay out of the decision
    layer: int | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Label":
        out = {f.name: d.get(f.name) for f in fields(cls)}
        out["evidence"] = out["evidence"] or {}
        out["scores"] = out["scores"] or {}
        out["language_profile"] = out["language_profile"] or {}
        out["explainer"] = out["explainer"] or {}
        out["layer"] = _layer(out["layer"])
        out["confidence"] = float(out["confidence"] or 0.0)
        out["evidence_summary"] = out["evidence_summary"] or ""
        out["description"] = out["description"] or ""
        for name in ("sampled", "scores_noise"):
            out[name] = bool(out[name])
        profile = out["language_profile"]
        if "bilingual_firing" not in d:  # a file written before the rename: its cross_lingual was this flag
            out["bilingual_firing"] = bool(profile.get("bilingual_firing", profile.get("cross_lingual", False)))
            out["cross_lingual"] = bool(d.get("cross_lingual")) and out["granularity"] == "concept-synonym"
        out["bilingual_firing"] = bool(out["bilingual_firing"])
        out["cross_lingual"] = bool(out["cross_lingual"])
        return cls(**out)


def _check_version(d: dict[str, Any]) -> None:
    version = d.get("schema_version", SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
        raise UserError(f"unknown schema_version {version!r} (this autointerp reads version {SCHEMA_VERSION})")


T = TypeVar("T")
OnError = Literal["skip", "fail"]


GZIP_MAGIC, ZSTD_MAGIC = b"\x1f\x8b", b"\x28\xb5\x2f\xfd"
ZSTD_LEVEL = 3
ZSTD_WINDOW_LOG = 27  # 128 MiB: zstd's default decoding limit, so `zstd -d` reads it without flags


def _open_bytes(path: Path):
    """A binary read handle on a plain, gzip or zstd file, told by its first bytes."""
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic.startswith(GZIP_MAGIC):
        return gzip.open(path, "rb")
    if magic == ZSTD_MAGIC:
        import zstandard

        reader = zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), read_across_frames=True, closefd=True)
        return io.BufferedReader(reader, 1 << 20)
    return open(path, "rb", buffering=1 << 20)


def _open_text(path: Path, mode: str, suffix: str | None = None):
    """A text handle on a plain, gzip or zstd JSONL file: by its first bytes when reading (any
    name reads), by `suffix` (default: the path's; .gz, .zst) when writing."""
    if mode == "r":
        return io.TextIOWrapper(_open_bytes(path), encoding="utf-8")
    suffix = path.suffix if suffix is None else suffix
    if suffix == ".gz":
        return gzip.open(path, mode + "t", encoding="utf-8")
    if suffix == ".zst":
        import zstandard

        # long-distance matching over a 128 MiB window: a context repeated by many latents is
        # stored about once
        params = zstandard.ZstdCompressionParameters.from_level(
            ZSTD_LEVEL, window_log=ZSTD_WINDOW_LOG, enable_ldm=True, write_checksum=True, threads=-1)
        writer = zstandard.ZstdCompressor(compression_params=params).stream_writer(open(path, mode + "b"),
                                                                                  closefd=True)
        return io.TextIOWrapper(writer, encoding="utf-8")
    return open(path, mode, encoding="utf-8")


def iter_lines(path: str | Path, binary: bool = False) -> Iterator[tuple[int, Any]]:
    """(line number, line) of a JSONL(.gz/.zst) file, blank lines skipped, streamed; the lines as
    bytes with binary=True (undecoded: ~4x faster to read where only a few lines are parsed)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.suffix in (".pt", ".pkl", ".pickle", ".bin"):
        raise UserError(f"{path}: expected a JSONL file, got a pickle/binary file")
    try:
        with (_open_bytes(path) if binary else _open_text(path, "r")) as fh:
            for lineno, line in enumerate(fh, 1):
                if line.strip():
                    yield lineno, line
    except (UnicodeDecodeError, gzip.BadGzipFile, EOFError) as exc:
        raise UserError(f"{path}: not a UTF-8 JSONL file ({exc})") from None
    except Exception as exc:  # zstandard.ZstdError: a cut-off or corrupt .zst file
        if type(exc).__name__ != "ZstdError":
            raise
        raise UserError(f"{path}: damaged zstd file ({exc})") from None


def iter_jsonl(path: str | Path, parse: Callable[[dict[str, Any]], T], on_error: OnError = "fail",
               warn: Callable[[str], None] | None = None,
               fail_hint: str = "use --on-error skip to go on") -> Iterator[T]:
    """Yield parsed objects from a JSONL(.gz/.zst) file, one line at a time.

    A malformed line is reported as `file:line: reason`; with on_error="skip" it is skipped
    (passed to `warn`) and reading goes on, with "fail" it raises UserError (ending with
    `fail_hint`, for commands that offer a way on).
    """
    for lineno, line in iter_lines(path):
        try:
            yield parse(json.loads(line))
        except UserError:
            raise
        except (ValueError, KeyError, TypeError) as exc:
            message = f"{path}:{lineno}: malformed line ({type(exc).__name__}: {exc})"
            if on_error == "fail":
                raise UserError(f"{message}; {fail_hint}" if fail_hint else message) from None
            if warn:
                warn(message)


def stream_records(path: str | Path, on_error: OnError = "fail", warn=None) -> Iterator[FeatureRecord]:
    """The feature records of a records file (plain, .gz or .zst), one at a time."""
    return iter_jsonl(path, FeatureRecord.from_dict, on_error, warn)


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
        key = Key(None if step == b"null" else int(step), None if layer == b"null" else _layer(int(layer)),
                  int(found[b"feature"]))
        return key, found[b"contexts"].rstrip() == b"["
    key = _decode_key(raw)
    return Key(key.checkpoint_step, _layer(key.layer), key.feature), bytes(key.contexts).strip() not in (b"", b"null", b"[]")


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


def read_records(path: str | Path, on_error: OnError = "fail", warn=None) -> list[FeatureRecord]:
    return list(stream_records(path, on_error, warn))


def read_labels(path: str | Path, on_error: OnError = "fail", warn=None) -> list[Label]:
    return list(iter_jsonl(path, Label.from_dict, on_error, warn))


def to_json_line(item: Any) -> str:
    """One JSONL line (with its newline) of a dataclass with to_dict, a dict, or an already
    encoded line (a str is written as it is)."""
    if isinstance(item, str):
        return item if item.endswith("\n") else item + "\n"
    return json.dumps(item.to_dict() if hasattr(item, "to_dict") else item, ensure_ascii=False) + "\n"


def write_jsonl(path: str | Path, items: Iterable[Any]) -> int:
    """Write items (see to_json_line), streamed, atomically (a temp file, then rename); compressed
    when the name ends in .gz or .zst. Returns the number of lines."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    try:
        with _open_text(tmp, "w", suffix=path.suffix) as fh:
            for item in items:
                fh.write(to_json_line(item))
                n += 1
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(path)
    return n


def read_finished(path: str | Path, parse: Callable[[dict[str, Any]], T]) -> dict[tuple[int | None, int], T]:
    """The per-latent lines a stage already appended (by .key), to resume after them.

    A line cut off by a crash is dropped and the file rewritten without it, so the next append
    starts on a fresh line."""
    path = Path(path)
    if not path.exists():
        return {}
    done: dict[tuple[int | None, int], T] = {}
    raw = path.read_text(encoding="utf-8")
    broken = bool(raw) and not raw.endswith("\n")
    for line in raw.splitlines():
        try:
            row = parse(json.loads(line))
        except (ValueError, TypeError, KeyError):
            broken = True
            continue
        done[row.key] = row
    if broken:
        write_jsonl(path, done.values())
    return done


class JsonlAppender:
    """Append one JSON line at a time and flush, so a crash loses only in-flight work."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a", encoding="utf-8")

    def write(self, item: Any) -> None:
        self._fh.write(json.dumps(item.to_dict() if hasattr(item, "to_dict") else item, ensure_ascii=False) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> "JsonlAppender":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
