"""The scores' arithmetic: Pearson correlation, balanced accuracy, AUC (Mann-Whitney), seeded
percentile-bootstrap 95% intervals (each group resampled on its own), and the paired sign-flip
test with Holm's correction that the shuffled-description control decides by."""

from __future__ import annotations

import hashlib
import math
from typing import Any, Callable, Sequence

import numpy as np


def correlation(predicted: Sequence[float], true: Sequence[float]) -> float:
    """Pearson correlation; 0.0 when either side is constant (no information either way)."""
    p, t = np.asarray(predicted, dtype=np.float64), np.asarray(true, dtype=np.float64)
    if p.size != t.size:
        raise ValueError(f"{p.size} predictions for {t.size} true values")
    if p.size < 2 or p.std() == 0 or t.std() == 0:
        return 0.0
    return float(np.corrcoef(p, t)[0, 1])


def balanced_accuracy(true: Sequence[bool], predicted: Sequence[bool]) -> float:
    """Mean of the recall on positives and on negatives (0.5 for any constant guesser); plain
    accuracy when only one class is present."""
    t, p = np.asarray(true, dtype=bool), np.asarray(predicted, dtype=bool)
    if t.size != p.size:
        raise ValueError(f"{p.size} answers for {t.size} items")
    if t.size == 0:
        return 0.0
    if t.all() or not t.any():
        return float((t == p).mean())
    return float(((p[t]).mean() + (~p[~t]).mean()) / 2)


def auc(true: Sequence[bool], probability: Sequence[float]) -> float | None:
    """Area under the ROC curve: the chance that a random positive gets a higher probability than
    a random negative, ties counting half (Mann-Whitney). None without both classes."""
    t, p = np.asarray(true, dtype=bool), np.asarray(probability, dtype=np.float64)
    pos, neg = p[t], p[~t]
    if pos.size == 0 or neg.size == 0:
        return None
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (pos.size * neg.size))


def percentile_interval(values: Sequence[float]) -> list[float]:
    """The 2.5th and 97.5th percentiles of bootstrap replicates."""
    lo, hi = np.percentile(np.asarray(values, dtype=np.float64), [2.5, 97.5])
    return [round(float(lo), 4), round(float(hi), 4)]


def bootstrap_ci(groups: Sequence[Sequence[Any]], statistic: Callable[..., float | None], n: int,
                 seed: int | str) -> list[float] | None:
    """Seeded percentile bootstrap 95% interval of statistic(*groups): each group is resampled
    with replacement on its own (stratified), e.g. (positives, negatives) or (windows,).
    Replicates where the statistic is undefined (None) are dropped; None if all are."""
    rng = np.random.default_rng(_seed_int(seed))
    values = []
    for _ in range(n):
        sample = [[g[i] for i in rng.integers(0, len(g), len(g))] if len(g) else [] for g in groups]
        value = statistic(*sample)
        if value is not None and not math.isnan(value):
            values.append(value)
    return percentile_interval(values) if values else None


def _seed_int(seed: int | str) -> int:
    return int(hashlib.sha256(str(seed).encode()).hexdigest()[:16], 16)


EXACT_SIGN_FLIPS = 16  # up to this many latents the sign-flip test enumerates all 2^n patterns


def sign_flip_p(gaps: Sequence[float], seed: int | str = 0, draws: int = 20000) -> float:
    """One-sided p-value of mean(gaps) > 0 under the null that each latent's matched and shuffled
    scores are exchangeable (so each gap's sign is a coin flip): exact over all 2^n sign patterns
    for n <= EXACT_SIGN_FLIPS, else seeded Monte Carlo (with the +1 that keeps it valid)."""
    g = np.asarray(gaps, dtype=np.float64)
    n = g.size
    if n == 0:
        return 1.0
    observed = g.sum() - 1e-12 * max(1.0, float(np.abs(g).sum()))  # ties count as extreme
    if n <= EXACT_SIGN_FLIPS:
        patterns = ((np.arange(2 ** n)[:, None] >> np.arange(n)) & 1) * 2 - 1
        return float(((patterns @ g) >= observed).mean())
    rng = np.random.default_rng(_seed_int(seed))
    signs = rng.choice((-1.0, 1.0), size=(draws, n))
    return float((((signs @ g) >= observed).sum() + 1) / (draws + 1))


def holm(pvalues: dict[str, float]) -> dict[str, float]:
    """Holm's step-down adjusted p-values: the familywise error stays at alpha over the methods."""
    order = sorted(pvalues, key=pvalues.get)
    out, running, m = {}, 0.0, len(order)
    for i, name in enumerate(order):
        running = max(running, min(1.0, (m - i) * pvalues[name]))
        out[name] = running
    return out
