"""Fitting the granularity decision, and nested grouped cross-validation that cannot flatter it.

Every choice — which optional evidence groups to use, the regularisation C, the class weights,
the softmax temperature (and, when asked, class-share offsets) — is made by `select` from the
rows it is given (the outer-training part), with inner cross-validation on those rows only. `nested_cv`
runs `select` + `fit_choice` inside each outer fold (grouped by feature id, so no feature is
scored by a model that saw any checkpoint of it), repeated over seeds, and scores the outer test
fold with what was chosen. The shipped model is `select` + `fit_choice` on all rows.

The checkpoint step and feature id never enter X: feature ids only group the folds, steps only
split the reported share table.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
from sklearn.metrics import cohen_kappa_score, precision_recall_fscore_support
from sklearn.model_selection import StratifiedGroupKFold
from threadpoolctl import threadpool_limits

from autointerp.labels.decision import GranularityModel, fit_model
from autointerp.labels.evidence import EVIDENCE_GROUPS, LLM_FEATURES, SCORE_FEATURES
from autointerp.schema import GRANULARITIES, three_way

C_GRID = (0.1, 0.3, 1.0)
# The synonym gate (select(..., gate=True)): concept-synonym only where another word of the top
# word's meaning (not one of its forms) is the max token of two contexts or more and the words of
# that meaning are the max tokens of at least half the firing contexts (link_holds): the class's
# definition, one meaning in different words, as a rule rather than a weight.
SYNONYM_GATE = {"concept-synonym": "link_holds"}
CLASS_WEIGHTS = ("none", "sqrt", "balanced")
INNER_FOLDS = 4
INNER_REPEATS = 2


@dataclass
class Choice:
    """What `select` chose from its rows (and how the inner CV rated it)."""

    groups: list[str]
    C: float
    class_weight: str
    bias: list[float] | None  # per-class logit offsets (GRANULARITIES order) matching class shares
    temperature: float = 1.0
    inner: dict[str, Any] = field(default_factory=dict)
    gate: bool = False  # SYNONYM_GATE applies (the `link` group is then always in)


def columns(names: Sequence[str], groups: Sequence[str]) -> list[int]:
    """Column indices of the features of `groups` (in `names`, the design's feature names)."""
    wanted = {n for g in groups for n in group_features(g)}
    return [i for i, n in enumerate(names) if n in wanted]


def group_features(group: str) -> list[str]:
    if group == "llm":
        return [*LLM_FEATURES, *SCORE_FEATURES]
    return EVIDENCE_GROUPS[group]


def design(feature_dicts: Sequence[dict[str, float]], groups: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    names = [n for g in groups for n in group_features(g)]
    return np.asarray([[f.get(n, 0.0) for n in names] for f in feature_dicts], dtype=np.float64), names


def class_weight(y: Sequence[str], kind: str) -> dict[str, float] | None:
    """None, 'balanced' (n / (k n_c)) or its square root: how much rare classes count in the fit."""
    if kind == "none":
        return None
    counts = Counter(y)
    w = {c: len(y) / (len(counts) * k) for c, k in counts.items()}
    return {c: math.sqrt(v) for c, v in w.items()} if kind == "sqrt" else w


def kappas(y, pred) -> tuple[float, float]:
    k4 = cohen_kappa_score(list(y), list(pred), labels=list(GRANULARITIES))
    k3 = cohen_kappa_score([three_way(a) for a in y], [three_way(a) for a in pred])
    return float(k4), float(k3)


def _full_logits(model: GranularityModel, X: np.ndarray) -> np.ndarray:
    """Logits in GRANULARITIES order (-inf for a class the training rows lacked), no offsets."""
    z = np.full((len(X), len(GRANULARITIES)), -1e9)
    bias, model.bias = model.bias, None
    z_model = model.logits(X)
    model.bias = bias
    for j, c in enumerate(model.classes):
        z[:, GRANULARITIES.index(c)] = z_model[:, j]
    return z


def _fit(X, y, idx, cols, C, cw, names, gate: bool = False) -> GranularityModel:
    ys = [y[i] for i in idx]
    model = fit_model(X[np.ix_(idx, cols)], ys, [names[c] for c in cols], C=C, class_weight=class_weight(ys, cw))
    model.gate = dict(SYNONYM_GATE) if gate else None
    return model


def inner_splits(y, gid, idx, seed: int) -> list[list[tuple[np.ndarray, np.ndarray]]]:
    """INNER_REPEATS shuffled grouped k-fold splits of idx (positions into idx)."""
    folds = min(INNER_FOLDS, len(set(gid[i] for i in idx)))
    out = []
    for r in range(INNER_REPEATS):
        splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=1000 * seed + r)
        out.append(list(splitter.split(np.zeros(len(idx)), [y[i] for i in idx], [gid[i] for i in idx])))
    return out


def oof_logits(X, y, idx, cols, C, cw, names, splits, gate: bool = False) -> list[np.ndarray]:
    """Out-of-fold logits over idx, one array per inner repeat."""
    idx = np.asarray(idx)
    out = []
    for repeat in splits:
        z = np.zeros((len(idx), len(GRANULARITIES)))
        for tr, te in repeat:
            model = _fit(X, y, idx[tr], cols, C, cw, names, gate)
            z[te] = _full_logits(model, X[np.ix_(idx[te], cols)])
        out.append(z)
    return out


def predicted_classes(z: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """Each row's class: the largest logit (plus `bias`, class-share offsets, when given)."""
    return np.asarray(GRANULARITIES, dtype=object)[(z if bias is None else z + bias).argmax(axis=1)]


def _score(y_idx, logits: list[np.ndarray]) -> tuple[float, float]:
    """Mean and sd over inner repeats of the 4-way kappa."""
    ks = [kappas(y_idx, predicted_classes(z))[0] for z in logits]
    return float(np.mean(ks)), float(np.std(ks))


def share_offsets(y_idx: Sequence[str], logits: list[np.ndarray], iters: int = 300) -> np.ndarray:
    """Per-class logit offsets under which the out-of-fold predictions' class shares match the
    human shares of these rows (so a rare class such as concept-synonym is not under-called)."""
    z = np.vstack(logits)
    target = np.asarray([Counter(y_idx)[c] for c in GRANULARITIES], dtype=float) * len(logits) / len(z)
    bias = np.zeros(len(GRANULARITIES))
    best, best_gap = bias.copy(), np.inf
    for _ in range(iters):
        pred = np.bincount(z.__add__(bias).argmax(axis=1), minlength=len(GRANULARITIES)) / len(z)
        gap = np.abs(pred - target).max()
        if gap < best_gap:
            best, best_gap = bias.copy(), gap
        if gap < 0.5 / len(z):
            break
        bias += 0.3 * (np.log(target + 1e-3) - np.log(pred + 1e-3))
        bias -= bias.mean()
    return best


def fit_temperature(y_idx, logits: list[np.ndarray], bias: np.ndarray | None) -> float:
    """The softmax temperature minimising out-of-fold log loss (confidence, not the class)."""
    z = np.vstack(logits) + (0 if bias is None else bias)
    truth = np.tile(np.asarray([GRANULARITIES.index(c) for c in y_idx]), len(logits))
    possible = z[np.arange(len(z)), truth] > -1e8  # rows whose true class a gate rules out say nothing of it
    z, truth = z[possible], truth[possible]
    best_t, best = 1.0, np.inf
    for t in np.round(np.arange(0.5, 3.01, 0.1), 2):
        s = z / t
        s = s - s.max(axis=1, keepdims=True)
        loss = -(s[np.arange(len(s)), truth] - np.log(np.exp(s).sum(axis=1))).mean()
        if loss < best:
            best_t, best = float(t), loss
    return best_t


def select(X: np.ndarray, y: Sequence[str], gid: Sequence[int], idx: Sequence[int], names: list[str],
           candidates: Sequence[str], seed: int = 0, calibrate_shares: bool = False,
           select_groups: bool = True, gate: bool = False) -> Choice:
    """Choose evidence groups, C, class weights, share offsets and temperature from rows idx only.

    1. C and class weights: best mean inner-CV kappa with core + all candidates.
    2. Groups (backward): drop a candidate group while dropping it does not lower the inner mean
       kappa; `core` is always in.
    3. Temperature (and, with calibrate_shares, class-share offsets) on the chosen configuration's
       inner out-of-fold logits. Offsets are off by default: matching the overall class shares
       did not narrow the per-checkpoint gaps and cost kappa in the nested CV (its ablation row).
    With gate, SYNONYM_GATE applies to every model rated and fitted, and `link` (its feature)
    stays in like `core`.
    """
    with threadpool_limits(1):  # hundreds of tiny fits: BLAS threads only contend
        return _select(X, y, gid, idx, names, candidates, seed, calibrate_shares, select_groups, gate)


def _select(X, y, gid, idx, names, candidates, seed, calibrate_shares, select_groups, gate=False) -> Choice:
    idx = list(idx)
    y_idx = [y[i] for i in idx]
    splits = inner_splits(y, gid, idx, seed)
    fixed = ["core", "link"] if gate else ["core"]
    full = [*fixed, *(c for c in candidates if c not in fixed)]
    trials: dict[tuple, tuple[float, float]] = {}

    def rate(groups, C, cw):
        key = (tuple(sorted(groups)), C, cw)
        if key not in trials:
            trials[key] = _score(y_idx, oof_logits(X, y, idx, columns(names, groups), C, cw, names, splits, gate))
        return trials[key]

    C, cw = max(((c, w) for c in C_GRID for w in CLASS_WEIGHTS), key=lambda p: rate(full, *p)[0])
    groups = list(full)
    if select_groups and candidates:
        # Backward: drop the group whose removal rates best, while removing it does not lower
        # the inner mean kappa (forward selection with a +1 sd bar was measured to be too
        # timid on ~240 rows: it kept single groups and lost ~0.03 nested-CV kappa).
        while len(groups) > 1:
            current = rate(groups, C, cw)[0]
            drops = {g: rate([x for x in groups if x != g], C, cw)[0] for g in groups if g not in fixed}
            if not drops:
                break
            g, mean = max(drops.items(), key=lambda kv: kv[1])
            if mean < current:
                break
            groups.remove(g)
    logits = oof_logits(X, y, idx, columns(names, groups), C, cw, names, splits, gate)
    bias = share_offsets(y_idx, logits) if calibrate_shares else None
    mean, sd = rate(groups, C, cw)
    return Choice(groups=groups, C=C, class_weight=cw, bias=None if bias is None else bias.tolist(),
                  temperature=fit_temperature(y_idx, logits, bias),
                  inner={"kappa4_mean": round(mean, 4), "kappa4_sd": round(sd, 4)}, gate=gate)


def fit_choice(X: np.ndarray, y: Sequence[str], idx: Sequence[int], names: list[str],
               choice: Choice) -> GranularityModel:
    """The model `choice` describes, fitted on rows idx; its classes in GRANULARITIES order."""
    cols = columns(names, choice.groups)
    model = _fit(X, y, list(idx), cols, choice.C, choice.class_weight, names, choice.gate)
    # Reorder/expand to all four classes so offsets line up (a missing class gets -inf logit).
    coef = np.zeros((len(GRANULARITIES), len(cols)))
    intercept = np.full(len(GRANULARITIES), -1e9)
    for j, c in enumerate(model.classes):
        coef[GRANULARITIES.index(c)] = model.coef[j]
        intercept[GRANULARITIES.index(c)] = model.intercept[j]
    model.classes, model.coef, model.intercept = list(GRANULARITIES), coef, intercept
    model.bias = None if choice.bias is None else np.asarray(choice.bias)
    model.temperature = choice.temperature
    model.groups = list(choice.groups)
    return model


@dataclass
class NestedResult:
    seeds: list[int]
    predictions: list[np.ndarray]  # per seed, out-of-fold predicted class of every row
    choices: list[list[Choice]]  # per seed, per outer fold
    folds: list[list[tuple[np.ndarray, np.ndarray]]]  # per seed, (train, test) row indices


def outer_splits(y, gid, seed: int, folds: int = 5) -> list[tuple[np.ndarray, np.ndarray]]:
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    return list(splitter.split(np.zeros(len(y)), list(y), list(gid)))


def _one_seed(args) -> tuple[np.ndarray, list[Choice], list]:
    X, y, gid, names, candidates, seed, folds, kwargs, select_fn, fit_fn = args
    pred = np.empty(len(y), dtype=object)
    choices, splits = [], outer_splits(y, gid, seed, folds)
    for train, test in splits:
        choice = select_fn(X, y, gid, train, names, candidates, seed=seed, **kwargs)
        model = fit_fn(X, y, train, names, choice)
        pred[test] = predicted_classes(model.logits(X[np.ix_(test, columns(names, choice.groups))]))
        choices.append(choice)
    return pred, choices, splits


def nested_cv(X: np.ndarray, y: Sequence[str], gid: Sequence[int], names: list[str], candidates: Sequence[str],
              seeds: Sequence[int] = range(10), folds: int = 5, jobs: int = 1,
              select_fn: Callable[..., Choice] = select, fit_fn: Callable[..., GranularityModel] = fit_choice,
              **select_kwargs) -> NestedResult:
    """Outer grouped k-fold per seed; `select_fn` + `fit_fn` see only each outer-training part."""
    y, gid = list(y), list(gid)
    tasks = [(X, y, gid, names, list(candidates), s, folds, select_kwargs, select_fn, fit_fn) for s in seeds]
    if jobs > 1:
        from concurrent.futures import ProcessPoolExecutor
        with ProcessPoolExecutor(jobs) as pool:
            results = list(pool.map(_one_seed, tasks))
    else:
        with threadpool_limits(1):
            results = [_one_seed(t) for t in tasks]
    return NestedResult(list(seeds), [r[0] for r in results], [r[1] for r in results], [r[2] for r in results])


# ---- metrics -------------------------------------------------------------------------------------

def share_gaps(y, pred, steps) -> dict[Any, np.ndarray]:
    """Per checkpoint, |predicted - human| share in points, per class (GRANULARITIES order)."""
    out = {}
    for step in sorted(set(steps), key=lambda s: (s is None, s)):
        idx = [i for i, s in enumerate(steps) if s == step]
        h = np.asarray([sum(y[i] == c for i in idx) for c in GRANULARITIES]) / len(idx)
        p = np.asarray([sum(pred[i] == c for i in idx) for c in GRANULARITIES]) / len(idx)
        out[step] = 100.0 * np.abs(p - h)
    return out


def metrics(y, pred, steps) -> dict[str, float]:
    k4, k3 = kappas(y, pred)
    p, r, _, _ = precision_recall_fscore_support(list(y), list(pred), labels=list(GRANULARITIES), zero_division=0)
    out = {"kappa4": k4, "kappa3": k3, "worst_share_gap": max(g.max() for g in share_gaps(y, pred, steps).values())}
    for c, pi, ri in zip(GRANULARITIES, p, r):
        out[f"precision_{c}"] = float(pi)
        out[f"recall_{c}"] = float(ri)
    return out


def summarise(result: NestedResult, y, steps) -> dict[str, tuple[float, float]]:
    """mean and sd over seeds of each metric."""
    per_seed = [metrics(y, pred, steps) for pred in result.predictions]
    return {k: (float(np.mean([m[k] for m in per_seed])), float(np.std([m[k] for m in per_seed])))
            for k in per_seed[0]}
