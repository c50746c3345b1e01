"""Feature lineage: which latent at a later step (a later layer) continues one at an earlier step
(layer), decided from the SAE codes of both sites over shared tokens.

SAE latents of two checkpoints (or two layers) live in different residual bases, so their decoder
directions cannot be compared; where they fire can. Every latent of B that fires on the shared
tokens is matched to the latent of A whose activations correlate best with its own over those
tokens (Pearson, zeros included). A match is a continuation only when the correlation beats a
null threshold: the same matching against B's tokens shuffled, taken per band of firing
frequency (rare latents reach high correlations by chance). lineage.sites runs this over a
run's sites; lineage.view reads the results for the report.

Memory: TopK codes are sparse (k of n latents per token), so the cross-products
sum_t a_i(t) b_j(t) are accumulated from the codes (Gustavson's row-by-row sparse product),
never from a dense latents x tokens array, and the latents x latents matrix is never held
whole: A's latents are taken in groups whose rows x n_B block fits `group_bytes`, each group
is turned into correlations and only the best two parents per latent of B are kept.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from autointerp import run as runlib
from autointerp.schema import LatentRow


# --------------------------------------------------------------------------- codes and statistics

@dataclass
class Codes:
    """TopK SAE codes of one checkpoint over the shared tokens: row t holds token t's k latents."""

    values: torch.Tensor   # [T, k] float32 (0 where fewer than k latents are positive)
    indices: torch.Tensor  # [T, k] int32
    n_latents: int

    @property
    def n_tokens(self) -> int:
        return self.values.shape[0]

    def permuted(self, perm: torch.Tensor) -> "Codes":
        """The same codes with latent i renamed perm[i] (a sanity reference: lineage must undo it)."""
        return Codes(self.values, perm.to(torch.int32)[self.indices.long()], self.n_latents)


@dataclass
class Moments:
    """Per-latent sums over the tokens: what Pearson's correlation needs besides the cross-products."""

    n: int
    mean: torch.Tensor   # [n_latents] float64
    std: torch.Tensor    # [n_latents] float64 (population)
    fired: torch.Tensor  # [n_latents] long: tokens where the latent is > 0

    @property
    def live(self) -> torch.Tensor:
        """Latents that fire on the sample and vary (a constant latent has no correlation)."""
        return (self.fired > 0) & (self.std > 0)


def moments(codes: Codes, tokens_per_chunk: int = 1 << 16) -> Moments:
    n = max(codes.n_tokens, 1)
    total = torch.zeros(codes.n_latents, dtype=torch.float64)
    squares = torch.zeros(codes.n_latents, dtype=torch.float64)
    fired = torch.zeros(codes.n_latents, dtype=torch.long)
    for t in range(0, codes.n_tokens, tokens_per_chunk):  # chunks: no T x k float64 temporaries
        idx = codes.indices[t:t + tokens_per_chunk].reshape(-1).long()
        vals = codes.values[t:t + tokens_per_chunk].reshape(-1).double()
        total.index_add_(0, idx, vals)
        squares.index_add_(0, idx, vals * vals)
        fired += torch.bincount(idx[vals > 0], minlength=codes.n_latents)
    mean = total / n
    var = (squares / n - mean * mean).clamp_min(0.0)
    std = torch.where(fired > 0, var.sqrt(), torch.zeros_like(var))
    std = torch.where(std > 1e-12 * mean.abs().clamp_min(1.0), std, torch.zeros_like(std))
    return Moments(n=codes.n_tokens, mean=mean, std=std, fired=fired)


@dataclass
class _ByLatent:
    """A's nonzero code entries sorted by latent (a CSR matrix latents x tokens, without the matrix)."""

    latent: torch.Tensor  # [E] int32, ascending
    token: torch.Tensor   # [E] int32
    value: torch.Tensor   # [E] float32
    start: torch.Tensor   # [n_latents + 1] long: latent i's entries are start[i]:start[i+1]


def _by_latent(codes: Codes) -> _ByLatent:
    k = codes.indices.shape[1]
    vals = codes.values.reshape(-1)
    # zero entries (fewer than k positive latents) sort last, under the sentinel latent n
    lat = torch.where(vals > 0, codes.indices.reshape(-1), torch.tensor(codes.n_latents, dtype=torch.int32))
    lat, order = torch.sort(lat)
    value = vals[order]
    token = order.div_(k, rounding_mode="floor").to(torch.int32)  # in place: no second int64 copy
    del order
    start = torch.zeros(codes.n_latents + 2, dtype=torch.long)
    start[1:] = torch.bincount(lat.long(), minlength=codes.n_latents + 1).cumsum(0)
    return _ByLatent(lat, token, value, start[:codes.n_latents + 1])


@dataclass
class Match:
    """For every latent j of B: its best and second-best parent in A and their correlations."""

    best: torch.Tensor          # [n_B] long (-1: no live latent in A)
    best_corr: torch.Tensor     # [n_B] float64
    second: torch.Tensor        # [n_B] long
    second_corr: torch.Tensor   # [n_B] float64 (-inf when A has one live latent)
    moments_a: Moments
    moments_b: Moments


def match(a: Codes, b: Codes, b_order: torch.Tensor | None = None, group_bytes: int = 16 << 20,
          on_group: Callable[[int, int], None] | None = None, entries_per_chunk: int = 1 << 14,
          a_moments: Moments | None = None, b_moments: Moments | None = None,
          a_sorted: _ByLatent | None = None) -> Match:
    """The best two parents in A of every latent of B, by the Pearson correlation of their
    activations over the shared tokens (all of them, zeros included).

    Token t of A is paired with token b_order[t] of B (default: t itself; a random permutation
    gives the shuffled-token null). A's latents go in groups of `rows` so that one group's
    float64 block of cross-products [rows, n_B] is at most `group_bytes`; each block is filled
    by index_add from the codes (only co-firing pairs touch it), turned into correlations in
    place and reduced to its top two per column.
    """
    if a.n_tokens != b.n_tokens:
        raise ValueError(f"A has {a.n_tokens} tokens, B {b.n_tokens}: the sample must be shared")
    ma = a_moments or moments(a)
    mb = b_moments or moments(b)
    sorted_a = a_sorted or _by_latent(a)
    n, n_a, n_b = max(a.n_tokens, 1), a.n_latents, b.n_latents
    b_idx, b_val = b.indices, b.values
    rows = max(1, min(n_a, group_bytes // (8 * n_b), (2**31 - 1) // n_b))  # int32 flat indices
    # corr_ij = (C_ij / n - mean_i mean_j) / (sd_i sd_j) = (C_ij u_i - z_i mean_j) / sd_j, with
    # u = 1 / (n sd_A), z = mean_A / sd_A. Per column j the ranking over i needs only the bracket
    # (two in-place passes over a block); / sd_j is applied to the two winners. Dead rows of A get
    # u = 0 and a huge z, so they lose to every live row (they are removed at the end).
    u = torch.where(ma.live, 1.0 / (n * ma.std.clamp_min(1e-300)), torch.zeros_like(ma.std))
    z = torch.where(ma.live, ma.mean / ma.std.clamp_min(1e-300), torch.full_like(ma.std, 1e150))
    top_v = torch.full((2, n_b), -math.inf, dtype=torch.float64)
    top_i = torch.full((2, n_b), -1, dtype=torch.long)
    block = torch.empty(rows * n_b, dtype=torch.float64)
    columns = torch.arange(n_b)
    # reused buffers: fresh multi-MB temporaries per chunk cost more in page faults than the work
    k_b = b_idx.shape[1]
    buf_idx = torch.empty(entries_per_chunk, k_b, dtype=b_idx.dtype)
    buf_val = torch.empty(entries_per_chunk, k_b, dtype=b_val.dtype)
    buf_prod = torch.empty(entries_per_chunk, k_b, dtype=torch.float64)
    groups = range(0, n_a, rows)
    for g, i0 in enumerate(groups):
        i1 = min(n_a, i0 + rows)
        block.zero_()
        lo, hi = int(sorted_a.start[i0]), int(sorted_a.start[i1])
        for s in range(lo, hi, entries_per_chunk):
            e = slice(s, min(hi, s + entries_per_chunk))
            m = e.stop - e.start
            tok = sorted_a.token[e].long()
            if b_order is not None:
                tok = b_order[tok]
            flat, val, prod = buf_idx[:m], buf_val[:m], buf_prod[:m]
            torch.index_select(b_idx, 0, tok, out=flat)
            torch.index_select(b_val, 0, tok, out=val)
            flat.add_(((sorted_a.latent[e] - i0) * n_b).to(flat.dtype)[:, None])
            prod.copy_(val).mul_(sorted_a.value[e].double()[:, None])  # exact: f32 x f32 fits in f64
            block.index_add_(0, flat.view(-1), prod.view(-1))
        x = block[: (i1 - i0) * n_b].view(i1 - i0, n_b)
        x.mul_(u[i0:i1, None]).addr_(z[i0:i1], mb.mean, alpha=-1)
        # top two per column: max, knock it out, max again (cheaper than topk along dim 0)
        v1, r1 = x.max(dim=0)
        if i1 - i0 > 1:
            x[r1, columns] = -math.inf
            v2, r2 = x.max(dim=0)
        else:
            v2, r2 = torch.full_like(v1, -math.inf), torch.zeros_like(r1)
        v = torch.stack([top_v[0], top_v[1], v1, v2])
        i = torch.stack([top_i[0], top_i[1], r1 + i0, r2 + i0])
        keep = v.topk(2, dim=0).indices
        top_v, top_i = v.gather(0, keep), i.gather(0, keep)
        if on_group:
            on_group(g + 1, len(groups))
    sd_b = torch.where(mb.live, mb.std, torch.full_like(mb.std, math.inf))  # dead columns: corr 0
    corr = top_v / sd_b[None, :]
    valid = (top_i >= 0) & ma.live[top_i.clamp_min(0)]
    corr = torch.where(valid, corr, torch.full_like(corr, -math.inf))
    top_i = torch.where(valid, top_i, torch.full_like(top_i, -1))
    return Match(top_i[0], corr[0], top_i[1], corr[1], ma, mb)


def dense_correlation(a: Codes, b: Codes) -> torch.Tensor:
    """Pearson correlation of every (latent of A, latent of B) from dense activations [n_A, n_B]:
    the reference `match` must equal (tests; small cases only). Dead latents give NaN."""
    def dense(c: Codes) -> torch.Tensor:
        x = torch.zeros(c.n_tokens, c.n_latents, dtype=torch.float64)
        x.scatter_add_(1, c.indices.long(), c.values.double())
        return x

    x, y = dense(a), dense(b)
    x, y = x - x.mean(0), y - y.mean(0)
    cov = x.T @ y / a.n_tokens
    return cov / (x.pow(2).mean(0).sqrt()[:, None] * y.pow(2).mean(0).sqrt()[None, :])


# --------------------------------------------------------------------------- the null and decisions

def null_thresholds(null_best: torch.Tensor, fired: torch.Tensor, live: torch.Tensor, quantile: float = 0.99,
                    bins: int = 10) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """Per-latent threshold: the `quantile` of the null's best correlation among the live latents
    in the same band of firing frequency (bands: quantiles of the live latents' fire counts, so a
    latent that fires on 3 tokens is held to what 3-token latents reach by chance).

    Returns (threshold [n_B], bands [{fired_min, fired_max, latents, threshold}])."""
    thresholds = torch.full_like(null_best, math.nan, dtype=torch.float64)
    idx = live.nonzero().squeeze(1)
    if len(idx) == 0:
        return thresholds, []
    counts = fired[idx].double()
    edges = torch.unique(torch.quantile(counts, torch.linspace(0, 1, bins + 1, dtype=torch.float64)[1:-1]))
    band = torch.bucketize(counts, edges, right=True)
    out = []
    for b in torch.unique(band).tolist():
        members = idx[band == b]
        values = null_best[members].double()
        values = values[torch.isfinite(values)]
        thr = float(torch.quantile(values, quantile)) if len(values) else math.inf
        thresholds[members] = thr
        out.append({"fired_min": int(fired[members].min()), "fired_max": int(fired[members].max()),
                    "latents": len(members), "threshold": round(thr, 4)})
    return thresholds, out


@dataclass
class LineageRow(LatentRow):
    """One latent of checkpoint B and where it comes from at checkpoint A (the previous one)."""

    checkpoint_step: int | None
    feature: int
    parent_step: int | None
    parent_feature: int | None    # None when `new`
    correlation: float            # with the best candidate (the parent, unless new)
    margin: float | None          # correlation - the second-best candidate's (None: no second)
    new: bool                     # no candidate beats the null threshold
    candidate_feature: int | None  # the best-correlated latent of A, parent or not
    second_feature: int | None
    threshold: float              # the null threshold this latent was held to
    fired: int                    # tokens of the shared sample where it is > 0
    layer: int | None = None
    parent_layer: int | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LineageRow":
        return cls(checkpoint_step=d.get("checkpoint_step"), feature=int(d["feature"]),
                   parent_step=d.get("parent_step"), parent_feature=d.get("parent_feature"),
                   correlation=float(d["correlation"]), margin=d.get("margin"), new=bool(d["new"]),
                   candidate_feature=d.get("candidate_feature"), second_feature=d.get("second_feature"),
                   threshold=float(d.get("threshold", math.nan)), fired=int(d.get("fired", 0)),
                   layer=d.get("layer"), parent_layer=d.get("parent_layer"))


def decide(m: Match, thresholds: torch.Tensor, step_a: int | None, step_b: int | None,
           layer_a: int | None = None, layer_b: int | None = None) -> list[LineageRow]:
    """One row per live latent of B: its parent (the best candidate) unless it fails its threshold."""
    rows = []
    for j in m.moments_b.live.nonzero().squeeze(1).tolist():
        best, corr = int(m.best[j]), float(m.best_corr[j])
        second, corr2 = int(m.second[j]), float(m.second_corr[j])
        thr = float(thresholds[j])
        has_parent = best >= 0 and math.isfinite(corr)
        is_new = not (has_parent and corr > thr)
        rows.append(LineageRow(
            checkpoint_step=step_b, feature=j, parent_step=step_a,
            parent_feature=None if is_new else best,
            correlation=round(corr, 4) if has_parent else 0.0,
            margin=round(corr - corr2, 4) if has_parent and math.isfinite(corr2) else None,
            new=is_new, candidate_feature=best if has_parent else None,
            second_feature=second if second >= 0 else None, threshold=round(thr, 4),
            fired=int(m.moments_b.fired[j]), layer=layer_b, parent_layer=layer_a))
    return rows


@dataclass
class PairResult:
    rows: list[LineageRow]
    meta: dict[str, Any]


def lineage_pair(a: Codes, b: Codes, step_a: int | None, step_b: int | None, quantile: float = 0.99,
                 bins: int = 10, seed: int = 0, group_bytes: int = 16 << 20,
                 on_group: Callable[[int, int], None] | None = None,
                 layer_a: int | None = None, layer_b: int | None = None) -> PairResult:
    """Match B to A, match B to A over shuffled tokens (the null), and decide every live latent of B."""
    ma, mb, sorted_a = moments(a), moments(b), _by_latent(a)
    started = time.perf_counter()
    real = match(a, b, group_bytes=group_bytes, on_group=on_group, a_moments=ma, b_moments=mb, a_sorted=sorted_a)
    gen = torch.Generator().manual_seed(seed)
    shuffle = torch.randperm(b.n_tokens, generator=gen)
    null = match(a, b, b_order=shuffle, group_bytes=group_bytes, on_group=on_group, a_moments=ma,
                 b_moments=mb, a_sorted=sorted_a)
    thresholds, bands = null_thresholds(null.best_corr, mb.fired, mb.live, quantile, bins)
    rows = decide(real, thresholds, step_a, step_b, layer_a, layer_b)
    live_null = null.best_corr[mb.live]
    meta = {
        "parent_step": step_a, "checkpoint_step": step_b, "parent_layer": layer_a, "layer": layer_b,
        "tokens": a.n_tokens,
        "latents_a": a.n_latents, "latents_b": b.n_latents,
        "live_a": int(ma.live.sum()), "live_b": int(mb.live.sum()),
        "new": sum(r.new for r in rows), "continued": sum(not r.new for r in rows),
        "null": {"quantile": quantile, "bins": bands, "seed": seed,
                 "best_corr_quantiles": _quantiles(live_null)},
        "real_best_corr_quantiles": _quantiles(real.best_corr[mb.live]),
        "seconds": round(time.perf_counter() - started, 2),
    }
    return PairResult(rows, meta)


def _quantiles(x: torch.Tensor) -> dict[str, float]:
    x = x[torch.isfinite(x)].double()
    if not len(x):
        return {}
    qs = torch.quantile(x, torch.tensor([0.1, 0.5, 0.9, 0.99], dtype=torch.float64)).tolist()
    return {"p10": round(qs[0], 4), "median": round(qs[1], 4), "p90": round(qs[2], 4), "p99": round(qs[3], 4)}


def pair_title(meta: dict[str, Any]) -> str:
    """"step 10 -> 100", "layer 3 -> 9": how a pair of sites is named."""
    a = runlib.Site(meta.get("parent_step"), meta.get("parent_layer"))
    b = runlib.Site(meta.get("checkpoint_step"), meta.get("layer"))
    if a.layer == b.layer:
        return f"step {a.step} -> {b.step}"
    if a.step == b.step:
        return f"layer {a.layer} -> {b.layer}" + (f" (step {a.step})" if a.step is not None else "")
    return f"{a.title} -> {b.title}"
