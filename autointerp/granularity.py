"""The granularity decision: token / concept-synonym / concept-semantic / uninterpretable.

A multinomial logistic regression over a latent's own evidence (its max-activating tokens,
activation pattern, and, when present, the explainer's vote and the simulator's scores), fitted
on the human-labelled dev file by evals/eval_granularity.py and shipped as JSON in
autointerp/data/granularity_model.json (coefficients, standardisation, version: no pickle; the
estimator is rebuilt from them with numpy). Never an input: the checkpoint step or feature id.

Optional evidence: with the `ja` extra (jamdict + jamdict-data) a Japanese max token whose JMdict
English gloss is another max token (ダーク ~ "dark") counts as the same meaning; without it that
signal is just absent.
"""

from __future__ import annotations

import difflib
import itertools
import json
import math
import unicodedata
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from autointerp import language
from autointerp.schema import GRANULARITIES, Explanation, FeatureRecord, Label, Scores

MODEL_PATH = Path(__file__).resolve().parent / "data" / "granularity_model.json"
MODEL_FORMAT_VERSION = 1

# Feature names per evidence group; the model file lists the ones it was fitted on.
STAT_FEATURES = [
    "top1_share", "top2_share", "variant_share", "family_share", "cross_script_variant_share",
    "distinct_ratio", "entropy_norm", "en_share", "ja_share", "other_share", "script_mix",
    "junk_share", "digit_share", "katakana_share", "kanji_share", "char_class_entropy",
    "frac_active", "mean_active_level", "high_tokens_per_context", "n_contexts_norm",
    "activating_ratio", "log_density", "has_density",
    "top2_related", "top2_cross_script_related", "variant_types_ratio",
    "prev_top_share", "max_position_mean",
]
LLM_FEATURES = [*(f"vote_{g}" for g in GRANULARITIES), "vote_missing", "llm_confidence", "llm_cross_lingual"]
SCORE_FEATURES = ["simulation", "detection", "fuzzing", "scores_missing"]


# ---- optional lexical evidence -------------------------------------------------------------------

@lru_cache(maxsize=1)
def _jamdict():
    try:
        from jamdict import Jamdict
        jam = Jamdict(memory_mode=False)
        jam.lookup("犬", strict_lookup=True, lookup_chars=False, lookup_ne=False)  # data present?
        return jam
    except Exception:  # the `ja` extra is not installed, or its database is missing
        return None


def lexicon_available() -> bool:
    return _jamdict() is not None


@lru_cache(maxsize=65536)
def english_glosses(ja_token: str) -> frozenset[str]:
    """Lowercased English gloss words of a Japanese token from JMdict; empty without jamdict."""
    jam = _jamdict()
    if jam is None or not ja_token:
        return frozenset()
    try:
        result = jam.lookup(ja_token, strict_lookup=True, lookup_chars=False, lookup_ne=False)
    except Exception:
        return frozenset()
    words: set[str] = set()
    for entry in result.entries[:5]:
        for sense in entry.senses[:4]:
            for gloss in sense.gloss:
                text = gloss.text.lower().split("(")[0].strip()
                words.add(text)
                words.update(w for w in text.split() if len(w) > 2)
    return frozenset(words)


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


def _latin_stem(word: str) -> str:
    return word[:5] if len(word) >= 5 else word


def related(a: str, b: str) -> bool:
    """Are two different normalised max tokens forms of one meaning? (inflection, spelling, translation)"""
    if not a or not b or a == b:
        return a == b and bool(a)
    sa, sb = language.token_script(a), language.token_script(b)
    if sa == sb == "en":
        if len(a) >= 3 and len(b) >= 3 and (a in b or b in a):
            return True
        if len(a) >= 5 and len(b) >= 5 and _latin_stem(a) == _latin_stem(b):
            return True
        return difflib.SequenceMatcher(None, a, b).ratio() >= 0.8 and min(len(a), len(b)) >= 4
    if sa == sb == "ja":
        return bool(set(a) & set(b) - set("のにをはがとでもへや、。"))  # a shared content character
    if {sa, sb} == {"en", "ja"}:
        ja, en = (a, b) if sa == "ja" else (b, a)
        glosses = english_glosses(ja)
        return en in glosses or any(en == w.rstrip("s") or en.rstrip("s") == w for w in glosses)
    if {sa, sb} == {"en", "other"}:  # '1' ~ 'one' style: digits and their English number words
        digit, word = (a, b) if sa == "other" else (b, a)
        return digit.isdigit() and word in _NUMBER_WORDS.get(digit, ())
    return False


_NUMBER_WORDS = {"1": ("one", "first"), "2": ("two", "second"), "3": ("three", "third"),
                 "4": ("four", "fourth"), "5": ("five", "fifth"), "6": ("six",), "7": ("seven",),
                 "8": ("eight",), "9": ("nine",), "10": ("ten",)}


# ---- features ------------------------------------------------------------------------------------

Z_CLIP = 3.0


@dataclass
class Evidence:
    """A latent's feature vector and what it is built from (kept in Label.evidence)."""

    features: dict[str, float]
    top_tokens: list[tuple[str, int]]
    problem: str | None  # why the record cannot be labelled (then: uninterpretable)


def token_key(token: str) -> str:
    """What counts as "the same max token": the normalised text, or for a token with no visible
    text (newline byte, space) its raw NFKC form, so a latent firing on every newline is one token."""
    return language.normalize_token(token) or unicodedata.normalize("NFKC", token)


def stat_features(record: FeatureRecord) -> Evidence:
    """Features from the record's own contexts only (never its step or feature id)."""
    firing = [c for c in record.contexts if language.max_token(c) is not None]
    raw = [c.tokens[c.max_index] for c in firing]
    tokens = [token_key(t) for t in raw]
    junk = sum(not language.normalize_token(t) for t in raw)
    n_ctx = len(record.contexts)
    n = len(tokens)
    if n_ctx == 0:
        return Evidence({}, [], "no contexts")
    if n == 0:
        return Evidence({}, [], "no activating token in any context")
    counts = Counter(tokens)
    top = counts.most_common()
    top_token, top_count = top[0]
    if junk == n and top_count / n < 0.8:
        return Evidence({}, top[:10], "max tokens are only whitespace or byte fragments")
    classes = Counter(token_class(language.normalize_token(t)) for t in raw)
    scripts = Counter(language.token_script(t) for t in tokens)
    variants = [t for t in counts if t != top_token and related(top_token, t)]
    variant_count = sum(counts[t] for t in variants)
    cross_variant = sum(counts[t] for t in variants
                        if language.token_script(t) != language.token_script(top_token))
    second = top[1][0] if len(top) > 1 else ""
    top2_related = bool(second) and second in variants
    levels = [v for c in record.contexts for v in c.levels]
    active = [v for v in levels if v > 0]
    high_per_ctx = sum(sum(v >= 5 for v in c.levels) for c in record.contexts) / n_ctx
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
        "frac_active": len(active) / len(levels) if levels else 0.0,
        "mean_active_level": (sum(active) / len(active) / 10.0) if active else 0.0,
        "high_tokens_per_context": min(high_per_ctx, 10.0) / 10.0,
        "n_contexts_norm": min(n_ctx, 50) / 50.0,
        "activating_ratio": n / n_ctx,
        "log_density": math.log10(max(record.density, 1e-7)) / 7.0 + 1.0 if record.density else 0.0,
        "has_density": 1.0 if record.density else 0.0,
        # the runner-up max token is another form of the top one (synonymy), maybe in another script
        "top2_related": float(top2_related),
        "top2_cross_script_related": float(top2_related and language.token_script(second)
                                           != language.token_script(top_token)),
        "variant_types_ratio": len(variants) / len(counts),
        # context, not token: fires after one token (e.g. after "(") / at one place in the text
        "prev_top_share": Counter(token_key(c.tokens[c.max_index - 1]) if c.max_index > 0 else "<start>"
                                  for c in firing).most_common(1)[0][1] / n,
        "max_position_mean": sum(c.max_index / max(len(c.tokens) - 1, 1) for c in firing) / n,
    }
    return Evidence(f, top[:10], None)


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
                   scores: Scores | None = None) -> Evidence:
    ev = stat_features(record)
    if ev.problem is None:
        ev.features.update(llm_features(explanation, scores))
    return ev


# ---- the model (JSON, rebuilt with numpy) --------------------------------------------------------

@dataclass
class GranularityModel:
    """Standardise -> linear -> softmax(/temperature). The fitted sklearn estimator's numbers."""

    feature_names: list[str]
    classes: list[str]
    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray  # [n_classes, n_features]
    intercept: np.ndarray  # [n_classes]
    temperature: float = 1.0
    info: dict[str, Any] | None = None

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        # Clip standardised inputs to the fitted range (+-Z_CLIP sd): a linear model must not
        # extrapolate on features far outside the training data (a tiny model's dense latents).
        standardised = np.clip((X - self.mean) / self.scale, -Z_CLIP, Z_CLIP)
        z = standardised @ self.coef.T + self.intercept
        z = z / self.temperature
        z = z - z.max(axis=1, keepdims=True)
        p = np.exp(z)
        return p / p.sum(axis=1, keepdims=True)

    def vector(self, features: dict[str, float]) -> np.ndarray:
        return np.array([features.get(k, 0.0) for k in self.feature_names], dtype=np.float64)

    def to_dict(self) -> dict[str, Any]:
        return {"feature_names": self.feature_names, "classes": self.classes, "mean": self.mean.tolist(),
                "scale": self.scale.tolist(), "coef": self.coef.tolist(), "intercept": self.intercept.tolist(),
                "temperature": self.temperature, "info": self.info or {}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GranularityModel":
        return cls(feature_names=list(d["feature_names"]), classes=list(d["classes"]),
                   mean=np.asarray(d["mean"], dtype=np.float64), scale=np.asarray(d["scale"], dtype=np.float64),
                   coef=np.asarray(d["coef"], dtype=np.float64),
                   intercept=np.asarray(d["intercept"], dtype=np.float64),
                   temperature=float(d.get("temperature", 1.0)), info=d.get("info") or {})


def fit_model(X: np.ndarray, y: list[str], feature_names: list[str], C: float = 1.0,
              class_weight: str | dict | None = None, seed: int = 0) -> GranularityModel:
    """Fit standardise + multinomial logistic regression with scikit-learn; keep only the numbers."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(X)
    scale = np.where(scaler.scale_ > 0, scaler.scale_, 1.0)
    lr = LogisticRegression(C=C, class_weight=class_weight, max_iter=5000, random_state=seed)
    lr.fit((X - scaler.mean_) / scale, y)
    coef, intercept, classes = lr.coef_, lr.intercept_, [str(c) for c in lr.classes_]
    if len(classes) == 2:  # binary sklearn models keep one row; make it two-class softmax
        coef = np.vstack([-coef[0] / 2, coef[0] / 2])
        intercept = np.array([-intercept[0] / 2, intercept[0] / 2])
    return GranularityModel(feature_names=list(feature_names), classes=classes, mean=scaler.mean_.copy(),
                            scale=scale, coef=coef, intercept=intercept)


def save_models(models: dict[str, GranularityModel], path: Path = MODEL_PATH, info: dict | None = None) -> None:
    payload = {"format_version": MODEL_FORMAT_VERSION, "info": info or {},
               "models": {name: m.to_dict() for name, m in models.items()}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, ensure_ascii=False))


@lru_cache(maxsize=4)
def load_models(path: Path = MODEL_PATH) -> dict[str, GranularityModel]:
    """The shipped models by name ('stats': no LLM input, 'both': stats + LLM vote + scores)."""
    d = json.loads(Path(path).read_text())
    if d.get("format_version") != MODEL_FORMAT_VERSION:
        raise ValueError(f"{path}: granularity model format {d.get('format_version')} "
                         f"(this autointerp reads {MODEL_FORMAT_VERSION})")
    return {name: GranularityModel.from_dict(m) for name, m in d["models"].items()}


# ---- labels --------------------------------------------------------------------------------------

def _has_llm_evidence(explanation: Explanation | None, scores: Scores | None) -> bool:
    return (explanation is not None and not explanation.error and explanation.granularity in GRANULARITIES) \
        or (scores is not None and any(getattr(scores, k) is not None for k in ("simulation", "detection", "fuzzing")))


def decide(record: FeatureRecord, explanation: Explanation | None = None, scores: Scores | None = None,
           models: dict[str, GranularityModel] | None = None) -> tuple[str, float, dict[str, Any]]:
    """(granularity, confidence, evidence) for one latent."""
    models = models if models is not None else load_models()
    ev = feature_vector(record, explanation, scores)
    if ev.problem is not None:
        return "uninterpretable", 1.0, {"reason": ev.problem, "top_tokens": ev.top_tokens}
    name = "both" if _has_llm_evidence(explanation, scores) and "both" in models else "stats"
    model = models[name]
    x = model.vector(ev.features)[None, :]
    proba = model.predict_proba(x)[0]
    best = int(np.argmax(proba))
    evidence = {"model": name, "model_version": (model.info or {}).get("version"),
                "probabilities": {c: round(float(p), 4) for c, p in zip(model.classes, proba)},
                "features": {k: round(float(v), 4) for k, v in ev.features.items() if k in model.feature_names},
                "top_tokens": ev.top_tokens, "lexicon": lexicon_available()}
    if explanation is not None:
        evidence["explainer_vote"] = explanation.granularity
        evidence["explainer_confidence"] = explanation.confidence
    return model.classes[best], float(proba[best]), evidence


def label_record(record: FeatureRecord, expl: Explanation | None = None, sc: Scores | None = None,
                 models: dict[str, GranularityModel] | None = None, texts: list[str] | None = None) -> Label:
    """The Label of one latent: calibrated granularity, language trend + profile, scores, explainer.
    `texts`: its language.context_texts, when the caller has them."""
    try:
        granularity, confidence, evidence = decide(record, expl, sc, models)
        error = evidence.get("reason")
    except Exception as exc:  # never lose a latent: label it and say why
        granularity, confidence, evidence = "uninterpretable", 0.0, {}
        error = f"granularity decision failed: {type(exc).__name__}: {exc}"
    try:
        profile = language.profile(record, texts=texts)
    except Exception as exc:
        profile, error = {"trend": "mix", "cross_lingual": False}, error or f"language profile failed: {exc}"
    cross = bool(profile.get("cross_lingual")) or (
        granularity == "concept-synonym" and evidence.get("features", {}).get("cross_script_variant_share", 0.0) > 0)
    return Label(
        checkpoint_step=record.checkpoint_step, feature=record.feature,
        description=expl.description if expl else "",
        granularity=granularity, cross_lingual=cross, language=profile.get("trend", "mix"),
        language_profile=profile,
        scores={k: getattr(sc, k) if sc else None for k in ("simulation", "detection", "fuzzing")},
        confidence=round(confidence, 4), explainer=expl.explainer if expl else {},
        error=error or (expl.error if expl else None), evidence=evidence)


def iter_labels(records: Iterable[FeatureRecord], explanations: Iterable[Explanation] | None = None,
                scores: Iterable[Scores] | None = None, models: dict[str, GranularityModel] | None = None,
                chunk: int = 256) -> Iterator[Label]:
    """build_labels over a stream: one Label per record, in order, holding `chunk` records at a
    time (their context languages are detected together, in one langdetect batch)."""
    by_expl = {e.key: e for e in explanations or []}
    by_score = {s.key: s for s in scores or []}
    models = models if models is not None else load_models()
    it = iter(records)
    while batch := list(itertools.islice(it, chunk)):
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
