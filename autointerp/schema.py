"""The data contract between stages: feature records and labels (docs/design.md).

Every stage reads and writes these dataclasses as JSONL lines (autointerp.jsonl: plain, .gz or
.zst), so a file written by one stage is the input of the next.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Literal, NamedTuple

from autointerp.errors import UserError

SCHEMA_VERSION = 1
GRANULARITIES = ("token", "concept-synonym", "concept-semantic", "uninterpretable")
LANGUAGE_TRENDS = ("en", "ja", "mix")
LEVELS = 10  # a context's levels are 0..10, 10 at the latent's max (as in llm-jp-sae's demo)
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


def layer_or_none(value: Any) -> int | None:
    """A layer as stored: records write -1 where it is not known."""
    return None if value is None or int(value) < 0 else int(value)


def row_key(d: dict[str, Any]) -> Key:
    """The Key of a parsed JSONL line of any stage."""
    step = d.get("checkpoint_step")
    return Key(None if step is None else int(step), layer_or_none(d.get("layer")), int(d["feature"]))


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
        return Key(self.checkpoint_step, layer_or_none(self.layer), self.feature)

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
    contexts: int | None = None  # snippets the explainer's prompt showed (None: written before this was kept)
    trimmed: bool = False  # fewer snippets or a narrower window than asked, to fit the server's context

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Explanation":
        out = {f.name: d.get(f.name) for f in fields(cls)}
        out["explainer"] = out["explainer"] or {}
        out["layer"] = layer_or_none(out["layer"])
        out["description"] = out["description"] or ""
        out["trimmed"] = bool(out["trimmed"])
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
        out["layer"] = layer_or_none(out.get("layer"))
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
        out["layer"] = layer_or_none(out["layer"])
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
