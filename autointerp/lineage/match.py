"""Feature lineage across checkpoints, or across layers: which latent at a later step (a later
layer) continues one at an earlier step (layer).

    autointerp lineage RUN [--sample eval|all] [--quantile 0.99]

SAE latents of two checkpoints (or two layers) live in different residual bases, so their decoder
directions cannot be compared; where they fire can. For each pair of consecutive sites A -> B
(checkpoints of one layer, or the layers of one model: run.lineage_pairs), a shared token sample
(default: the documents `lm train` holds out) runs through both sites' LM + SAE (the layers of one
model from one forward pass), and every latent of B that fires on the sample is matched to the latent
of A whose activations correlate best with its own over those tokens (Pearson, zeros
included). A match is a continuation only when the correlation beats a null threshold: the
same matching against B's tokens shuffled, taken per band of firing frequency (rare latents
reach high correlations by chance). Output per pair:

    RUN/B/lineage.jsonl       one line per latent of B that fires on the sample (feature,
                              parent_step, parent_layer, parent_feature, correlation, margin, new, ...)
    RUN/B/lineage.meta.json   sample size, null thresholds, settings (written last: "done")

Memory: TopK codes are sparse (k of n latents per token), so the cross-products
sum_t a_i(t) b_j(t) are accumulated from the codes (Gustavson's row-by-row sparse product),
never from a dense latents x tokens array, and the latents x latents matrix is never held
whole: A's latents are taken in groups whose rows x n_B block fits `group_bytes`, each group
is turned into correlations and only the best two parents per latent of B are kept.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from autointerp import run as runlib
from autointerp.errors import UserError
from autointerp.files import Kind, expect
from autointerp.options import renamed
from autointerp.jsonl import iter_jsonl, write_jsonl
from autointerp.schema import GRANULARITIES, FeatureRecord, Label, LatentRow

console = Console(stderr=True)
META_FILE = "lineage.meta.json"
ROWS_FILE = "lineage.jsonl"
NEW = "new"


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


# --------------------------------------------------------------------------- running sites

@dataclass
class SiteSAE:
    """What lineage needs of one site: its SAE and the LM it reads."""

    site: runlib.Site
    sae_dir: Path
    model: str
    revision: str | None
    layer: int

    @property
    def step(self) -> int | None:
        return self.site.step


def find_sites(run: Path) -> list[SiteSAE]:
    """Sites with an SAE and a reachable LM (RUN/lm/step-N, else the model in the SAE's config,
    as `collect` does); a one-line UserError when lineage cannot run on this run."""
    if not run.is_dir():
        raise UserError(f"{run}: no such run directory")
    found = runlib.sites(run)
    with_sae = [s for s in found if (runlib.site_dir(run, s) / "sae").is_dir()]
    if not with_sae:
        if any(runlib.records_file(runlib.site_dir(run, s)).exists() for s in found):
            raise UserError(f"{run}: lineage cannot run on feature records alone (imported records?): it runs the "
                            "same tokens through each site's LM and SAE, and this run has no step-N/sae or layer-L/sae")
        raise UserError(f"{run}: no step-N/sae or layer-L/sae folders (train SAEs first: autointerp sae train {run})")
    out = []
    for site in with_sae:
        sae_dir = runlib.site_dir(run, site) / "sae"
        cfg_path = sae_dir / "config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        lm_dir = runlib.lm_checkpoint_dir(run, site.step) if site.step is not None else None
        own_lm = lm_dir is not None and lm_dir.is_dir()
        model = str(lm_dir) if own_lm else runlib.resolve_model(cfg.get("model"), sae_dir)
        if not model:
            raise UserError(f"{sae_dir}: no LM for {site.title} (no RUN/lm/step-N and the SAE config names no model), "
                            "so lineage cannot run its tokens through it")
        if cfg.get("layer") is None:
            raise UserError(f"{sae_dir}: the SAE config names no layer")
        out.append(SiteSAE(site, sae_dir, model, None if own_lm else cfg.get("revision"), int(cfg["layer"])))
    if len(out) < 2:
        raise UserError(f"{run}: lineage needs at least two checkpoints or layers with an SAE (found {len(out)})")
    return out


def shared_documents(corpus: str, sample: str, max_docs: int | None):
    from autointerp.lm.corpus import load_corpus
    from autointerp.lm.train import is_eval_doc

    docs = load_corpus(corpus)
    if sample == "eval":
        docs = [d for d in docs if is_eval_doc(d)]
    elif sample != "all":
        raise UserError(f"--sample must be eval or all, not {sample!r}")
    docs = docs[:max_docs] if max_docs else docs
    if not docs:
        raise UserError(f"corpus {corpus!r} has no {'held-out ' if sample == 'eval' else ''}documents to share")
    return docs


@torch.inference_mode()
def encode_sites(sites: Sequence[SiteSAE], docs, seq_len: int, batch_size: int, device: str,
                 progress: Progress | None = None) -> tuple[dict[runlib.Site, Codes], torch.Tensor]:
    """({site: codes}, token ids) of the shared documents' first `seq_len` tokens through the
    sites' LM + SAEs: sites that read one LM (its layers) share one forward pass."""
    from autointerp.lm.activations import iter_activations, load_lm
    from autointerp.sae import load_sae

    if len({(s.model, s.revision) for s in sites}) != 1 or len({s.layer for s in sites}) != len(sites):
        raise ValueError("encode_sites takes the SAEs of one LM at distinct layers")
    saes = {s.layer: load_sae(s.sae_dir, device=device) for s in sites}
    model, tokenizer = load_lm(sites[0].model, revision=sites[0].revision, device=device)
    title = ", ".join(s.site.title for s in sites)
    task = progress.add_task(f"encode {title}", total=len(docs)) if progress else None
    values: dict[int, list[torch.Tensor]] = {layer: [] for layer in saes}
    indices: dict[int, list[torch.Tensor]] = {layer: [] for layer in saes}
    tokens = []
    for batch in iter_activations(model, tokenizer, docs, list(saes), batch_size=batch_size, max_tokens=seq_len,
                                  device=device):
        for layer, sae in saes.items():
            v, i = sae.encode(batch.by_layer[layer][batch.mask].to(device))
            values[layer].append(v.float().cpu())
            indices[layer].append(i.to(torch.int32).cpu())
        tokens.append(batch.input_ids[batch.mask])
        if progress is not None:
            progress.update(task, advance=len(batch.doc_ids))
    codes = {s.site: Codes(torch.cat(values[s.layer]), torch.cat(indices[s.layer]), int(saes[s.layer].cfg.d_sae))
             for s in sites}
    return codes, torch.cat(tokens)


def encode_checkpoint(ckpt: SiteSAE, docs, seq_len: int, batch_size: int, device: str,
                      progress: Progress | None = None) -> tuple[Codes, torch.Tensor]:
    """(codes, token ids) of one site (encode_sites for one)."""
    codes, tokens = encode_sites([ckpt], docs, seq_len, batch_size, device, progress)
    return codes[ckpt.site], tokens


def _settings(corpus: str, sample: str, max_docs: int | None, seq_len: int, quantile: float, bins: int,
              seed: int) -> dict[str, Any]:
    return {"corpus": corpus, "sample": sample, "max_docs": max_docs, "seq_len": seq_len, "quantile": quantile,
            "bins": bins, "seed": seed}


def run_lineage(run: Path, corpus: str | None = None, sample: str = "eval", max_docs: int | None = None,
                seq_len: int = 64, quantile: float = 0.99, bins: int = 10, seed: int = 0, batch_size: int = 32,
                device: str = "cpu", force: bool = False, group_bytes: int = 16 << 20) -> list[dict[str, Any]]:
    """Write SITE/lineage.jsonl + lineage.meta.json for every consecutive pair of sites; return the metas."""
    found = {s.site: s for s in find_sites(run)}
    corpus = corpus or runlib.load_saved((runlib.read_manifest(run).get("stages", {}).get("sae", {}) or {}).get("corpus"),
                                         run) or "debian-reference"
    settings = _settings(corpus, sample, max_docs, seq_len, quantile, bins, seed)
    pairs = [(found[a], found[b]) for a, b in runlib.lineage_pairs(list(found))]
    todo = []
    for a, b in pairs:
        folder = runlib.site_dir(run, b.site)
        meta_path = folder / META_FILE
        done = meta_path.exists() and (folder / ROWS_FILE).exists()
        if done and not force and json.loads(meta_path.read_text()).get("settings") == settings:
            console.print(f"[dim]{a.site.title} -> {b.site.title}: done ({meta_path}); --force to redo[/]")
            continue
        todo.append((a, b))
    if not todo:
        return [json.loads((runlib.site_dir(run, b.site) / META_FILE).read_text()) for _, b in pairs]
    docs = shared_documents(corpus, sample, max_docs)
    cache: dict[runlib.Site, tuple[Codes, torch.Tensor]] = {}
    metas = []
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as progress:
        for a, b in todo:
            for one in (a, b):
                if one.site not in cache:
                    # every site still to match that reads the same LM comes from this one pass
                    group = [s for s in found.values() if (s.model, s.revision) == (one.model, one.revision)
                             and s.site not in cache and any(s in pair for pair in todo)]
                    codes, tokens = encode_sites(group, docs, seq_len, batch_size, device, progress)
                    cache.update({site: (c, tokens) for site, c in codes.items()})
            (codes_a, tok_a), (codes_b, tok_b) = cache[a.site], cache[b.site]
            if not torch.equal(tok_a, tok_b):
                raise UserError(f"{a.site.title} and {b.site.title} tokenize the shared documents differently; "
                                "lineage compares activations token by token, so both need the same tokenizer")
            task = progress.add_task(f"match {a.site.title} -> {b.site.title} (+ null)", total=None)

            def on_group(done: int, total: int, task=task) -> None:
                progress.update(task, total=2 * total, advance=1)

            result = lineage_pair(codes_a, codes_b, a.step, b.step, quantile, bins, seed, group_bytes, on_group,
                                  layer_a=a.layer, layer_b=b.layer)
            folder = runlib.site_dir(run, b.site)
            write_jsonl(folder / ROWS_FILE, result.rows)
            meta = {**result.meta, "parent_site": a.site.name, "site": b.site.name, "settings": settings,
                    "docs": len(docs)}
            tmp = folder / (META_FILE + ".tmp")
            tmp.write_text(json.dumps(meta, indent=2))
            tmp.replace(folder / META_FILE)
            metas.append(meta)
            later = {s for pair in todo[todo.index((a, b)) + 1:] for s in (pair[0].site, pair[1].site)}
            for site in [s for s in cache if s not in later]:
                del cache[site]  # codes no later pair needs
            progress.console.print(
                f"{a.site.title} -> {b.site.title}: {meta['live_b']} latents of {b.site.title} fire on "
                f"{meta['tokens']:,} shared tokens; {meta['continued']} continue a latent of {a.site.title}, "
                f"{meta['new']} are new (null threshold {_threshold_range(meta)}); {meta['seconds']:.1f} s")
    runlib.update_manifest(run, "lineage", {**settings, "pairs": [
        {k: m.get(k) for k in ("parent_step", "checkpoint_step", "parent_layer", "layer", "tokens", "live_b",
                               "continued", "new", "seconds")}
        for m in metas]})
    return metas


def pair_title(meta: dict[str, Any]) -> str:
    """"step 10 -> 100", "layer 3 -> 9": how a pair of sites is named."""
    a = runlib.Site(meta.get("parent_step"), meta.get("parent_layer"))
    b = runlib.Site(meta.get("checkpoint_step"), meta.get("layer"))
    if a.layer == b.layer:
        return f"step {a.step} -> {b.step}"
    if a.step == b.step:
        return f"layer {a.layer} -> {b.layer}" + (f" (step {a.step})" if a.step is not None else "")
    return f"{a.title} -> {b.title}"


def _threshold_range(meta: dict[str, Any]) -> str:
    values = [b["threshold"] for b in meta["null"]["bins"]]
    if not values:
        return "-"
    return f"{min(values):.2f}" if min(values) == max(values) else f"{min(values):.2f}-{max(values):.2f} by firing band"


def _eval_or_all(value: str) -> str:
    if value not in ("eval", "all"):
        raise typer.BadParameter(f"{value!r} is not one of 'eval', 'all'.")
    return value


def _null_quantile(value: float) -> float:
    if not 0.5 <= value < 1:
        raise typer.BadParameter(f"{value} is not in [0.5, 1).")
    return value


@renamed({"--max-docs": "--docs"})
def cli(
    run: Path = typer.Argument(..., metavar="RUN_DIR",
                               help="Run folder with step-N/sae (or layer-L/sae) and their LM (RUN_DIR/lm/step-N or "
                                    "the SAE config's model)."),
    corpus: str | None = typer.Option(None, "--corpus", metavar="CORPUS",
                                      help="Corpus of the shared tokens (default: the one the SAEs were trained on)."),
    sample: str = typer.Option("eval", "--sample", metavar="eval|all", callback=_eval_or_all,
                               help="Shared documents: eval (held out by `lm train`) or all."),
    max_docs: int | None = typer.Option(None, "--docs", min=1, help="Use only the first N shared documents."),
    seq_len: int = typer.Option(64, "--seq-len", min=1, help="First tokens of each document (as for the SAEs and records)."),
    quantile: float = typer.Option(0.99, "--quantile", callback=_null_quantile,
                                   help="A match counts when it beats this quantile of the shuffled-token null "
                                        "(per firing band); in [0.5, 1)."),
    bins: int = typer.Option(10, "--bins", min=1, help="Firing-frequency bands of the null threshold."),
    seed: int = typer.Option(0, "--seed", help="Seed of the token shuffle (the null)."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Documents (sequences) per forward pass."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda (for the LM and SAE; matching runs on CPU)."),
    threads: int | None = typer.Option(None, "--threads", min=1, help="Torch CPU threads (default: torch's choice; 1 is often fastest on a busy machine)."),
    memory_mb: int = typer.Option(16, "--block-mb", min=1, help="Size of one block of the correlation matrix (MB); the whole matrix is never held."),
    force: bool = typer.Option(False, "--force", help="Redo pairs whose lineage.jsonl exists with the same settings."),
) -> None:
    """Match every latent of each checkpoint (layer) to its parent at the previous one (feature lineage)."""
    expect(run, Kind.RUN)
    if threads:
        torch.set_num_threads(threads)
    metas = run_lineage(run, corpus, sample, max_docs, seq_len, quantile, bins, seed, batch_size, device, force,
                        memory_mb << 20)
    for m in metas:
        print(f"{pair_title(m)}: {m['continued']} continued, {m['new']} new "
              f"of {m['live_b']} live ({m['tokens']:,} tokens); median best correlation "
              f"{m['real_best_corr_quantiles'].get('median', math.nan):.3f} "
              f"(shuffled-token null: {m['null']['best_corr_quantiles'].get('median', math.nan):.3f})")


# --------------------------------------------------------------------------- reading results

def read_rows(run: Path, site: runlib.Site) -> list[LineageRow]:
    path = runlib.site_dir(run, site) / ROWS_FILE
    return list(iter_jsonl(path, LineageRow.from_dict, on_error="skip")) if path.exists() else []


def read_meta(run: Path, site: runlib.Site) -> dict[str, Any] | None:
    path = runlib.site_dir(run, site) / META_FILE
    return json.loads(path.read_text()) if path.exists() else None


@dataclass
class LatentClass:
    granularity: str
    source: str  # "label" or "stats" (the statistical decision over the record, no LLM)
    top_tokens: list[str] = field(default_factory=list)


CLASSES_CACHE = "lineage.classes.json"
CLASSES_CACHE_VERSION = 2


def _shown(token: str) -> str:
    """A max token as the card shows it: newlines as ↵, a blank token as ␣."""
    token = token.replace("\n", "↵")
    return token if token.strip() else "␣" * max(len(token), 1)


def latent_classes(run: Path, site: runlib.Site) -> dict[int, LatentClass]:
    """Every latent's granularity at `site`: its label where labelled, else the statistical
    decision over its record (granularity.decide with no LLM input), so counts cover all latents.

    Cached in SITE/lineage.classes.json, keyed on the sizes and times of the records file and
    labels.jsonl (reading 2,048 records and deciding takes ~15 s on the demo)."""
    from autointerp.labels import decision as granularity

    folder = runlib.site_dir(run, site)
    sources = [runlib.records_file(folder), folder / "labels.jsonl"]
    key = [CLASSES_CACHE_VERSION] + [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in sources if p.exists()]
    cache = folder / CLASSES_CACHE
    if cache.exists():
        try:
            saved = json.loads(cache.read_text())
            if saved.get("key") == key:
                return {int(f): LatentClass(**c) for f, c in saved["classes"].items()}
        except (ValueError, TypeError, KeyError):
            pass  # a torn or old cache: recompute
    labels: dict[int, Label] = {}
    if sources[1].exists():
        labels = {l.feature: l for l in iter_jsonl(sources[1], Label.from_dict, on_error="skip")}
    out: dict[int, LatentClass] = {}
    if sources[0].exists():
        for record in iter_jsonl(sources[0], FeatureRecord.from_dict, on_error="skip"):
            label = labels.get(record.feature)
            if label is not None and label.granularity:
                tokens = [_shown(t) for t, _ in (label.evidence or {}).get("top_tokens", [])][:3]
                out[record.feature] = LatentClass(label.granularity, "label", tokens)
                continue
            cls, _, evidence = granularity.decide(record)
            out[record.feature] = LatentClass(cls, "stats", [_shown(t) for t, _ in evidence.get("top_tokens", [])][:3])
    for feature, label in labels.items():
        if feature not in out and label.granularity:
            out[feature] = LatentClass(label.granularity, "label", [])
    if len(key) > 1:
        try:
            tmp = cache.with_suffix(".tmp")
            tmp.write_text(json.dumps({"key": key, "classes": {f: c.__dict__ for f, c in out.items()}},
                                      ensure_ascii=False))
            tmp.replace(cache)
        except OSError:
            pass  # a read-only run: no cache, same answer
    return out


def transition_matrix(rows: Iterable[LineageRow], class_a: dict[int, str], class_b: dict[int, str]) -> dict[str, dict[str, int]]:
    """Counts {parent class (or "new") -> {class at B -> latents}} over the given rows of B
    (every live latent of B once, so the counts add up to len(rows)); "unknown" where a class is missing."""
    counts: dict[str, Counter] = {}
    for r in rows:
        src = NEW if r.new else class_a.get(r.parent_feature, "unknown")  # type: ignore[arg-type]
        counts.setdefault(src, Counter())[class_b.get(r.feature, "unknown")] += 1
    return {src: dict(c) for src, c in counts.items()}


def _order(names: Iterable[str]) -> list[str]:
    known = list(GRANULARITIES) + ["unknown", NEW]
    names = set(names)
    return [n for n in known if n in names] + sorted(names - set(known))


# --------------------------------------------------------------------------- the report's view

@dataclass
class LineageReport:
    """What the report shows: per-pair summaries and matrices, the flow figure, per-feature links."""

    pairs: list[dict[str, Any]]
    figure_png: str | None                                  # base64 PNG
    cards: dict[tuple[runlib.Site, int], dict[str, Any]]    # (site, feature) -> {"parent", "children"}

    next_site: dict[runlib.Site, runlib.Site] = field(default_factory=dict)  # A -> B for every pair

    def card(self, site: runlib.Site, feature: int) -> dict[str, Any] | None:
        """A feature card's lineage: parent (or new) at the previous site, children at the next."""
        found = self.cards.get((site, feature), {})
        nxt = self.next_site.get(site)
        if not found and nxt is None:
            return None
        return {"parent": None, "new": None, "parent_site": None, "correlation": None, "threshold": None,
                "children": [], "n_children": 0, **found, "children_site": nxt.title if nxt else None}


def report_view(run: Path, sites: Sequence[runlib.Site], max_children: int = 8) -> LineageReport | None:
    """The lineage part of the report, or None when `autointerp lineage` has not run."""
    run = Path(run)
    pairs, cards = [], {}
    classes: dict[runlib.Site, dict[int, LatentClass]] = {}

    def classes_at(site: runlib.Site) -> dict[int, LatentClass]:
        if site not in classes:
            classes[site] = latent_classes(run, site)
        return classes[site]

    for site in sites:
        meta, rows = read_meta(run, site), read_rows(run, site)
        if meta is None or not rows:
            continue
        parent = runlib.Site.parse(meta.get("parent_site") or "") or next(  # a meta written before sites
            (s for s in sites if s.step == meta.get("parent_step") and s.layer in (None, meta.get("parent_layer"))),
            runlib.Site(meta.get("parent_step")))
        ca, cb = classes_at(parent), classes_at(site)
        matrix = transition_matrix(rows, {f: c.granularity for f, c in ca.items()},
                                   {f: c.granularity for f, c in cb.items()})
        n_children = Counter(r.parent_feature for r in rows if not r.new)
        sources = Counter(cb[r.feature].source if r.feature in cb else "none" for r in rows)
        continued = [r.correlation for r in rows if not r.new]
        pairs.append({
            "parent": parent, "site": site, "parent_title": parent.title, "title": site.title,
            "pair_title": pair_title(meta).replace("->", "→"), "meta": meta, "matrix": matrix,
            "rows_order": _order(matrix), "cols_order": _order(k for row in matrix.values() for k in row),
            "col_totals": dict(sum((Counter(row) for row in matrix.values()), Counter())),
            "live": len(rows), "new": sum(r.new for r in rows), "continued": len(continued),
            "median_corr": float(torch.tensor(continued).median()) if continued else None,
            "parents_with_children": len(n_children), "splits": sum(1 for v in n_children.values() if v > 1),
            "live_a": meta.get("live_a"), "ended": max(0, (meta.get("live_a") or 0) - len(n_children)),
            "class_sources": dict(sources),
        })
        children: dict[int, list[LineageRow]] = {}
        for r in rows:
            link = None
            if not r.new and r.parent_feature is not None:
                children.setdefault(r.parent_feature, []).append(r)
                pc = ca.get(r.parent_feature)
                link = {"site": parent.title, "page": parent.name, "feature": r.parent_feature,
                        "correlation": r.correlation, "margin": r.margin, "granularity": pc.granularity if pc else None,
                        "tokens": pc.top_tokens if pc else []}
            cards.setdefault((site, r.feature), {}).update({"parent": link, "new": r.new, "correlation": r.correlation,
                                                            "threshold": r.threshold, "parent_site": parent.title,
                                                            "candidate": r.candidate_feature})
        for parent_feature, kids in children.items():
            card = cards.setdefault((parent, parent_feature), {})
            kids = sorted(kids, key=lambda r: -r.correlation)
            card["n_children"] = len(kids)
            card["children"] = [{"site": site.title, "page": site.name, "feature": r.feature,
                                 "correlation": r.correlation,
                                 "granularity": cb[r.feature].granularity if r.feature in cb else None,
                                 "tokens": cb[r.feature].top_tokens if r.feature in cb else []}
                                for r in kids[:max_children]]
    if not pairs:
        return None
    return LineageReport(pairs, flow_figure(pairs), cards, {p["parent"]: p["site"] for p in pairs})


_FLOW_COLORS = {"token": "#4e79a7", "concept-synonym": "#59a14f", "concept-semantic": "#edc948",
                "uninterpretable": "#bab0ac", "unknown": "#dddddd", NEW: "#e15759"}


def flow_figure(pairs: list[dict[str, Any]], path: str | Path | None = None) -> str:
    """An alluvial panel per pair A -> B: on the left every live latent of B stacked by its parent's
    class at A (or "new"), on the right by its own class at B, bands = transition counts.
    Returns the PNG as base64 (and writes it to `path` when given)."""
    import base64
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import PathPatch, Rectangle
    from matplotlib.path import Path as MPath

    fig, axes = plt.subplots(1, len(pairs), figsize=(4.6 * len(pairs), 4.2), squeeze=False)
    for ax, pair in zip(axes[0], pairs):
        matrix, total = pair["matrix"], pair["live"]
        left_names, right_names = pair["rows_order"], pair["cols_order"]
        gap = 0.015 * total
        w = 0.12

        def stack(names, sizes):
            pos, y = {}, 0.0
            for name in names:
                pos[name] = y
                y += sizes[name] + gap
            return pos

        left_size = {s: sum(matrix.get(s, {}).values()) for s in left_names}
        right_size = {d: sum(matrix.get(s, {}).get(d, 0) for s in left_names) for d in right_names}
        left_pos, right_pos = stack(left_names, left_size), stack(right_names, right_size)
        left_fill, right_fill = dict(left_pos), dict(right_pos)
        for s in left_names:
            for d in right_names:
                n = matrix.get(s, {}).get(d, 0)
                if not n:
                    continue
                y0, y1 = left_fill[s], right_fill[d]
                left_fill[s] += n
                right_fill[d] += n
                verts = [(w, y0), (0.5, y0), (0.5, y1), (1 - w, y1), (1 - w, y1 + n), (0.5, y1 + n),
                         (0.5, y0 + n), (w, y0 + n), (w, y0)]
                codes = [MPath.MOVETO, MPath.CURVE4, MPath.CURVE4, MPath.CURVE4, MPath.LINETO, MPath.CURVE4,
                         MPath.CURVE4, MPath.CURVE4, MPath.CLOSEPOLY]
                ax.add_patch(PathPatch(MPath(verts, codes), facecolor=_FLOW_COLORS.get(s, "#999"), alpha=0.45,
                                       edgecolor="none"))
        for names, pos, size, x in ((left_names, left_pos, left_size, 0.0), (right_names, right_pos, right_size, 1 - w)):
            for name in names:
                if not size[name]:
                    continue
                ax.add_patch(Rectangle((x, pos[name]), w, size[name], facecolor=_FLOW_COLORS.get(name, "#999"),
                                       edgecolor="white"))
            # labels at their segment's middle, pushed apart where small segments would overlap
            label_y, min_sep = [], 0.055 * (total + gap * len(names))
            for name in names:
                if size[name]:
                    y = pos[name] + size[name] / 2
                    label_y.append([name, max(y, label_y[-1][1] + min_sep) if label_y else y])
            for name, y in label_y:
                ax.text(-0.02 if x == 0 else 1.02, y, f"{name} {size[name]}", va="center",
                        ha="right" if x == 0 else "left", fontsize=8)
        height = total + gap * max(len(left_names), len(right_names))
        ax.set_xlim(-0.55, 1.55)
        ax.set_ylim(height, -gap)
        ax.axis("off")
        ax.set_title(f"{pair['pair_title']}\n{total} live latents of {pair['title']}, {pair['new']} new", fontsize=9)
        ax.text(w / 2, height + gap * 0.5, f"parent at {pair['parent_title']}", ha="center", va="top", fontsize=8)
        ax.text(1 - w / 2, height + gap * 0.5, f"at {pair['title']}", ha="center", va="top", fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    if path is not None:
        Path(path).write_bytes(buffer.getvalue())
    return base64.b64encode(buffer.getvalue()).decode("ascii")
