"""The data contract between stages: feature records and labels (see DESIGN.md).

Every stage reads and writes these dataclasses through `read_jsonl` / `write_jsonl`,
so a file written by one stage is the input of the next.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, TypeVar

from autointerp.errors import UserError

SCHEMA_VERSION = 1
GRANULARITIES = ("token", "concept-synonym", "concept-semantic", "uninterpretable")
LANGUAGE_TRENDS = ("en", "ja", "mix")
# llm-jp-sae's demo data codes its human labels 1-4 (its docs/main.js).
LLMJP_GRANULARITY_CODES = {1: "uninterpretable", 2: "concept-semantic", 3: "concept-synonym", 4: "token"}
Granularity = Literal["token", "concept-synonym", "concept-semantic", "uninterpretable"]


def three_way(granularity: str | None) -> str | None:
    """Token / concept / uninterpretable: the card's coarser view of the four classes."""
    if granularity is None:
        return None
    return "concept" if granularity.startswith("concept") else granularity


@dataclass
class Context:
    """One context window: tokens as strings, levels 0..10 against the latent's max."""

    tokens: list[str]
    levels: list[int]
    activations: list[float] | None = None

    @property
    def max_index(self) -> int:
        values = self.activations if self.activations is not None else self.levels
        return max(range(len(values)), key=values.__getitem__) if values else -1

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
        return cls(tokens=[str(t) for t in tokens], levels=[int(v) for v in levels],
                   activations=None if acts is None else [float(a) for a in acts])


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
    def key(self) -> tuple[int | None, int]:
        return (self.checkpoint_step, self.feature)

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
    """One latent's line in a stage's JSONL output, joined across stages on (checkpoint_step, feature)."""

    checkpoint_step: int | None
    feature: int

    @property
    def key(self) -> tuple[int | None, int]:
        return (self.checkpoint_step, self.feature)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Explanation(LatentRow):
    """What the explainer LLM said about one latent (the `explain` stage's output)."""

    checkpoint_step: int | None
    feature: int
    description: str
    granularity: str | None  # the LLM's vote; None when it failed to give a valid one
    cross_lingual: bool
    confidence: float
    explainer: dict[str, Any]  # {"model", "prompt_sha256", "engine"}
    error: str | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Explanation":
        return cls(**{f.name: d.get(f.name) for f in fields(cls)})


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

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Scores":
        out = {f.name: d.get(f.name) for f in fields(cls) if f.name in d or f.name in ("checkpoint_step", "feature")}
        for name in ("simulator", "ci95", "auc"):
            if out.get(name) is None:
                out.pop(name, None)
        return cls(**out)


@dataclass
class Label(LatentRow):
    """The final label of one latent (DESIGN.md's label schema)."""

    checkpoint_step: int | None
    feature: int
    description: str
    granularity: str | None
    cross_lingual: bool
    language: str  # en | ja | mix (the paper's trend rule)
    language_profile: dict[str, Any]
    scores: dict[str, float | None]
    confidence: float
    explainer: dict[str, Any]
    error: str | None = None
    evidence: dict[str, Any] = field(default_factory=dict)  # what the decision rested on

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Label":
        out = {f.name: d.get(f.name) for f in fields(cls)}
        out["evidence"] = out["evidence"] or {}
        out["scores"] = out["scores"] or {}
        out["language_profile"] = out["language_profile"] or {}
        out["explainer"] = out["explainer"] or {}
        out["cross_lingual"] = bool(out["cross_lingual"])
        out["confidence"] = float(out["confidence"] or 0.0)
        return cls(**out)


def _check_version(d: dict[str, Any]) -> None:
    version = d.get("schema_version", SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
        raise UserError(f"unknown schema_version {version!r} (this autointerp reads version {SCHEMA_VERSION})")


T = TypeVar("T")
OnError = Literal["skip", "fail"]


def _open_text(path: Path, mode: str):
    if path.suffix == ".gz":
        return gzip.open(path, mode + "t", encoding="utf-8")
    return open(path, mode, encoding="utf-8")


def iter_jsonl(path: str | Path, parse: Callable[[dict[str, Any]], T], on_error: OnError = "fail",
               warn: Callable[[str], None] | None = None,
               fail_hint: str = "use --on-error skip to go on") -> Iterator[T]:
    """Yield parsed objects from a JSONL(.gz) file.

    A malformed line is reported as `file:line: reason`; with on_error="skip" it is skipped
    (passed to `warn`) and reading goes on, with "fail" it raises UserError (ending with
    `fail_hint`, for commands that offer a way on).
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.suffix in (".pt", ".pkl", ".pickle", ".bin"):
        raise UserError(f"{path}: expected a JSONL file, got a pickle/binary file")
    try:
        with _open_text(path, "r") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
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
    except (UnicodeDecodeError, gzip.BadGzipFile, EOFError) as exc:
        raise UserError(f"{path}: not a UTF-8 JSONL file ({exc})") from None


def read_records(path: str | Path, on_error: OnError = "fail", warn=None) -> list[FeatureRecord]:
    return list(iter_jsonl(path, FeatureRecord.from_dict, on_error, warn))


def read_labels(path: str | Path, on_error: OnError = "fail", warn=None) -> list[Label]:
    return list(iter_jsonl(path, Label.from_dict, on_error, warn))


def write_jsonl(path: str | Path, items: Iterable[Any]) -> None:
    """Write all items (dataclasses with to_dict, or dicts) atomically: a temp file, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with _open_text(tmp, "w") as fh:
        for item in items:
            fh.write(json.dumps(item.to_dict() if hasattr(item, "to_dict") else item, ensure_ascii=False) + "\n")
    tmp.replace(path)


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
