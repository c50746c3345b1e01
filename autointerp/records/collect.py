"""Feature records: the true top-k contexts of every SAE latent, negatives and density.

One streaming pass over the corpus. For every latent we keep a [n_latents, keep] buffer of the
best (activation, context) pairs and merge each batch into it with a stable sort, so memory is
bounded by latents x k, not by corpus size. The SAE codes (top-k values/indices per token) of
the contexts that are still referenced are kept on the side, so the per-token activations of
the winners are re-materialised at the end without a second forward pass.

A context is one document's first `max_tokens` tokens (64, as in the paper); when that is
longer than `window`, the stored context is a `window`-token slice centred on the latent's
max token. Contexts are ranked by the latent's max activation in them; ties go to the earlier
context, so the result is deterministic.

Negatives (FeatureRecord.negatives, kind in extra["negative_kinds"]):
  "similar":    the contexts ranked just below the top-k band (they still activate, more weakly);
  "same-token": contexts of a fixed random pool that contain the latent's max token (the one
                at the max of its top context) but where the latent never fires;
  "random":     other contexts drawn at random (seeded) from that pool where it never fires.
"""

from __future__ import annotations

import gc
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from rich.console import Console
from rich.progress import Progress

from autointerp import run as runlib
from autointerp.errors import UserError
from autointerp.jsonl import write_jsonl
from autointerp.progress import progress_bar
from autointerp.schema import LEVELS, Context, FeatureRecord


# --------------------------------------------------------------------------- levels

def quantise(acts: torch.Tensor, max_activation: float | torch.Tensor) -> torch.Tensor:
    """Levels 0..10 against the latent's max: round(10 a / max), and at least 1 where a > 0,
    so level > 0 exactly where the latent fires. `max_activation` may broadcast (one per row)."""
    max_activation = torch.as_tensor(max_activation, dtype=acts.dtype).clamp_min(1e-30)
    levels = torch.round(acts * LEVELS / max_activation).long().clamp(0, LEVELS)
    return torch.where(acts > 0, levels.clamp(min=1), torch.zeros_like(levels))


def round_sig(x: torch.Tensor, digits: int = 5) -> torch.Tensor:
    """Round to `digits` significant digits in float64, so JSON holds short exact-looking numbers."""
    x = x.double()
    exp = torch.floor(torch.log10(x.abs().clamp_min(1e-30)))
    scale = torch.pow(10.0, digits - 1 - exp)
    return torch.round(x * scale) / scale


# --------------------------------------------------------------------------- the tracker

def _num_latents(sae) -> int:
    for holder in (getattr(sae, "cfg", None), getattr(sae, "config", None), sae):
        if holder is not None and getattr(holder, "d_sae", None):
            return int(holder.d_sae)
    raise UserError("cannot tell the SAE's number of latents (no cfg.d_sae)")


@dataclass
class _Stored:
    """What is kept of one context: its token ids and the SAE codes of its tokens."""

    doc_id: int
    ids: torch.Tensor  # [T] long
    values: torch.Tensor  # [T, k_sae] float
    indices: torch.Tensor  # [T, k_sae] int32 (half the memory of int64)


class TopContexts:
    """Streaming top-`keep` contexts per latent, density counts and a random-negative pool.

    `latents`: the latent ids to track (all when None). `pool`: stream positions of the
    contexts that random negatives are drawn from.
    """

    def __init__(self, n_latents: int, keep: int, latents: Sequence[int] | None = None,
                 pool: Sequence[int] = (), device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.latents = torch.arange(n_latents) if latents is None else torch.as_tensor(sorted(set(latents)), dtype=torch.long)
        if len(self.latents) and (self.latents.min() < 0 or self.latents.max() >= n_latents):
            raise UserError(f"--latents asks for latents outside 0..{n_latents - 1}")
        n = len(self.latents)
        # latent id -> column in the buffers (-1: not tracked)
        self.column = torch.full((n_latents,), -1, dtype=torch.long, device=self.device)
        self.column[self.latents.to(self.device)] = torch.arange(n, device=self.device)
        self.keep = keep
        self.values = torch.zeros(n, keep, device=self.device)  # 0 = empty slot (only a > 0 counts)
        self.context = torch.full((n, keep), -1, dtype=torch.long, device=self.device)
        self.position = torch.zeros(n, keep, dtype=torch.long, device=self.device)
        self.fired_tokens = torch.zeros(n, dtype=torch.long, device=self.device)
        self.fired_contexts = torch.zeros(n, dtype=torch.long, device=self.device)
        self.pool = sorted(set(int(p) for p in pool))
        self._pool_column = {p: j for j, p in enumerate(self.pool)}
        self.pool_fired = torch.zeros(n, len(self.pool), dtype=torch.bool, device=self.device)
        self.n_tokens = 0
        self.n_contexts = 0
        self.stored: dict[int, _Stored] = {}  # stream position -> kept context
        self._batches = 0

    @torch.inference_mode()
    def add(self, values: torch.Tensor, indices: torch.Tensor, token_row: torch.Tensor,
            token_pos: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor, doc_ids: Sequence[int],
            base: int | None = None) -> None:
        """Merge one batch: SAE codes `values/indices` [N, k_sae] of the batch's N valid tokens
        (in row-major order), with each token's row and position in the [B, T] batch. `base`:
        the stream position of the batch's first context (default: right after the last batch;
        a rank under torchrun sees only its share of the batches)."""
        B, T = input_ids.shape
        n = len(self.latents)
        base = self.n_contexts if base is None else base
        values, indices = values.to(self.device), indices.to(self.device)
        token_row, token_pos = token_row.to(self.device), token_pos.to(self.device)
        col = self.column[indices]
        hit = (values > 0) & (col >= 0)
        v, c = values[hit], col[hit]
        r = token_row[:, None].expand_as(indices)[hit]
        p = token_pos[:, None].expand_as(indices)[hit]
        self.fired_tokens += torch.bincount(c, minlength=n)
        # per-(context, latent) max activation and the first position where it is reached
        flat = r * n + c
        ctx_max = torch.zeros(B * n, device=self.device).scatter_reduce_(0, flat, v, "amax")
        at_max = v == ctx_max[flat]
        ctx_pos = torch.full((B * n,), T, dtype=torch.long, device=self.device)
        ctx_pos.scatter_reduce_(0, flat[at_max], p[at_max], "amin")
        ctx_max, ctx_pos = ctx_max.view(B, n).T, ctx_pos.view(B, n).T  # [n, B]
        self.fired_contexts += (ctx_max > 0).sum(1)
        for b in range(B):
            j = self._pool_column.get(base + b)
            if j is not None:
                self.pool_fired[:, j] = ctx_max[:, b] > 0
        # merge only the latents whose current k-th best is beaten; stable sort keeps earlier
        # contexts first among ties (the buffer precedes the batch and is itself in order)
        rows = (ctx_max > self.values[:, -1:]).any(1).nonzero().squeeze(1)
        if len(rows):
            cand_v = torch.cat([self.values[rows], ctx_max[rows]], 1)
            cand_c = torch.cat([self.context[rows], (base + torch.arange(B, device=self.device)).expand(len(rows), B)], 1)
            cand_p = torch.cat([self.position[rows], ctx_pos[rows]], 1)
            order = torch.sort(cand_v, dim=1, descending=True, stable=True).indices[:, :self.keep]
            self.values[rows] = cand_v.gather(1, order)
            self.context[rows] = cand_c.gather(1, order)
            self.position[rows] = cand_p.gather(1, order)
        # keep the codes of this batch's contexts that are referenced now, or in the pool
        alive = set(torch.unique(self.context[self.context >= base]).tolist())
        alive.update(q for q in range(base, base + B) if q in self._pool_column)
        if alive:
            starts = torch.zeros(B + 1, dtype=torch.long)
            starts[1:] = torch.bincount(token_row.cpu(), minlength=B).cumsum(0)
            for q in sorted(alive):
                b = q - base
                s, e = starts[b].item(), starts[b + 1].item()
                self.stored[q] = _Stored(int(doc_ids[b]), input_ids[b].cpu()[mask[b].cpu()],
                                         values[s:e].float().cpu(), indices[s:e].to(torch.int32).cpu())
        self.n_tokens += int(mask.sum())
        self.n_contexts += B
        self._batches += 1
        if self._batches % 32 == 0:
            self.prune()

    def prune(self) -> None:
        """Forget the codes of contexts no buffer refers to any more."""
        alive = set(torch.unique(self.context).tolist()) | set(self.pool)
        for q in [q for q in self.stored if q not in alive]:
            del self.stored[q]

    def merge_ranks(self) -> bool:
        """Under torchrun: every rank's buffers merged into rank 0's tracker, exactly as one
        process over all the batches would have them (per latent the top `keep` contexts by
        activation, ties to the earlier context; counts summed). Returns True on rank 0."""
        from autointerp.distributed import broadcast_from_first, gather_to_first, rank_world

        rank, _ = rank_world()
        self.prune()
        parts = gather_to_first({name: getattr(self, name).cpu() for name in
                                 ("values", "context", "position", "fired_tokens", "fired_contexts", "pool_fired")}
                                | {"n_tokens": self.n_tokens, "n_contexts": self.n_contexts})
        needed = None
        if parts is not None:
            values = torch.cat([p["values"] for p in parts], 1)
            context = torch.cat([p["context"] for p in parts], 1)
            position = torch.cat([p["position"] for p in parts], 1)
            # order by context (empty slots last), then stably by value: ties keep the earlier context
            by_context = torch.sort(torch.where(values > 0, context, torch.iinfo(torch.long).max), dim=1,
                                    stable=True).indices
            values, context, position = (t.gather(1, by_context) for t in (values, context, position))
            order = torch.sort(values, dim=1, descending=True, stable=True).indices[:, :self.keep]
            values, context, position = (t.gather(1, order) for t in (values, context, position))
            context = torch.where(values > 0, context, torch.full_like(context, -1))
            position = torch.where(values > 0, position, torch.zeros_like(position))
            for name, value in (("values", values), ("context", context), ("position", position),
                                ("fired_tokens", sum(p["fired_tokens"] for p in parts)),
                                ("fired_contexts", sum(p["fired_contexts"] for p in parts)),
                                ("pool_fired", torch.stack([p["pool_fired"] for p in parts]).any(0))):
                setattr(self, name, value.to(self.device))
            self.n_tokens = sum(p["n_tokens"] for p in parts)
            self.n_contexts = sum(p["n_contexts"] for p in parts)
            needed = set(context[context >= 0].tolist()) | set(self.pool)
        needed = broadcast_from_first(needed)
        stored = gather_to_first({q: s for q, s in self.stored.items() if q in needed})
        if stored is None:
            return False
        self.stored = {q: s for part in stored for q, s in part.items()}
        return True


# --------------------------------------------------------------------------- records

def _mix(seed: int, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A deterministic integer hash (splitmix64-style, wrapping int64 arithmetic) of (seed, a, b)."""
    x = a * 0x9E3779B1 + b * 0x85EBCA77 + seed * 0xC2B2AE3D
    for mult in (0x3C79AC492BA7B653 - (1 << 63), 0x1C69B3F74AC4AE35 - (1 << 63)):
        x = (x ^ (x >> 31)) * mult
    return (x ^ (x >> 29)) & ((1 << 53) - 1)


def iter_records(tracker: TopContexts, decode: Callable[[list[int]], list[str]], *, top_k: int,
                 window: int, n_random: int, n_same_token: int, seed: int, model: str, layer: int,
                 checkpoint_step: int | None, chunk: int = 128) -> Iterator[FeatureRecord]:
    """The tracker's buffers as one FeatureRecord per tracked latent, in latent order (vectorised
    over `chunk` latents at a time; Python only slices the finished lists)."""
    values, context, position = tracker.values.cpu(), tracker.context.cpu(), tracker.position.cpu()
    n, keep = values.shape
    context = torch.where(values > 0, context, torch.full_like(context, -1))  # empty slots: -1
    # the kept contexts' codes as one sorted table of (context row, latent) -> (position, value),
    # so each (latent, slot) finds its ≤ T entries by binary search, not by a dense scan
    kept = sorted(tracker.stored)
    stored = [tracker.stored[q] for q in kept]
    row_of = torch.full((tracker.n_contexts + 1,), -1, dtype=torch.long)  # index -1: no context
    row_of[torch.tensor(kept, dtype=torch.long)] = torch.arange(len(kept))
    n_latents = len(tracker.column)
    lengths = torch.tensor([len(s.ids) for s in stored] + [0], dtype=torch.long)
    T = max(int(lengths.max()), 1)
    if stored:
        vals = torch.cat([s.values.reshape(-1) for s in stored]).float()
        key = torch.cat([r * n_latents + s.indices.reshape(-1).long() for r, s in enumerate(stored)])
        tpos = torch.cat([torch.arange(len(s.ids)).repeat_interleave(s.indices.shape[1]) for s in stored])
        live = vals > 0
        key, order = torch.sort(key[live], stable=True)
        vals, tpos = vals[live][order], tpos[live][order]
    else:
        vals, key, tpos = torch.zeros(0), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    tokens = [decode(s.ids.tolist()) for s in stored]
    doc_ids = [s.doc_id for s in stored]
    ids_pad = torch.full((len(stored) + 1, T), -1, dtype=torch.long)  # last row: no context
    for r, s in enumerate(stored):
        ids_pad[r, :len(s.ids)] = s.ids

    # silent negatives come from the pool, in a seeded random order that hashes (seed, latent,
    # context), so a latent's negatives do not depend on --latents. "same-token": pool contexts
    # that contain the latent's max token (from its top context) yet never fire it; "random":
    # any other silent pool contexts.
    pool = torch.tensor([q for q in tracker.pool], dtype=torch.long)
    pool_rows = row_of[pool.clamp(max=tracker.n_contexts)] if len(pool) else pool
    scores = _mix(seed, tracker.latents[:, None], pool[None, :]).double()
    scores[tracker.pool_fired.cpu() | (pool_rows < 0)[None, :]] = math.inf
    top_token = ids_pad[row_of[context[:, 0]], position[:, 0]]  # [n]; -1 for dead latents
    vocab = int(ids_pad.max()) + 2
    occurs = torch.zeros(vocab, len(pool) + 1, dtype=torch.bool)  # token id -> pool contexts with it
    for j, r in enumerate(pool_rows.tolist()):
        if r >= 0:
            occurs[ids_pad[r][ids_pad[r] >= 0], j] = True
    has_token = occurs[top_token.clamp(min=0), :len(pool)] & (top_token >= 0)[:, None]
    same_scores = torch.where(has_token, scores, torch.full_like(scores, math.inf))
    same = torch.argsort(same_scores, dim=1, stable=True)[:, :n_same_token]
    same_ok = same_scores.gather(1, same) < math.inf
    scores.scatter_(1, same, torch.where(same_ok, math.inf, scores.gather(1, same)))  # not twice
    picks = torch.argsort(scores, dim=1, stable=True)[:, :n_random]
    random_ok = scores.gather(1, picks) < math.inf
    same_ctx = torch.where(same_ok, pool[same], torch.full_like(same, -1))
    random_ctx = torch.where(random_ok, pool[picks], torch.full_like(picks, -1))
    # the same-token window is centred on the token's first occurrence
    same_pos = (ids_pad[row_of[same_ctx]] == top_token[:, None, None]).int().argmax(-1)
    slot_ctx = torch.cat([context, same_ctx, random_ctx], 1)  # [n, M]: top-k, similar, same-token, random
    slot_pos = torch.cat([position, same_pos, torch.zeros_like(random_ctx)], 1)
    kinds = ["top"] * top_k + ["similar"] * (keep - top_k) + ["same-token"] * same.shape[1] + ["random"] * picks.shape[1]

    fired_tokens, fired_contexts = tracker.fired_tokens.cpu().tolist(), tracker.fired_contexts.cpu().tolist()
    max_round = round_sig(values[:, 0]).tolist()
    for c0 in range(0, n, chunk):
        latents = tracker.latents[c0:c0 + chunk]
        rows = row_of[slot_ctx[c0:c0 + chunk]]  # [c, M]
        query = (rows * n_latents + latents[:, None]).reshape(-1)
        lo, hi = torch.searchsorted(key, query), torch.searchsorted(key, query, right=True)
        hi = torch.where(rows.reshape(-1) >= 0, hi, lo)
        counts = hi - lo
        which = torch.repeat_interleave(torch.arange(len(query)), counts)
        entry = torch.arange(int(counts.sum())) - torch.repeat_interleave(counts.cumsum(0) - counts, counts) \
            + torch.repeat_interleave(lo, counts)
        acts = torch.zeros(len(query), T)
        acts[which, tpos[entry]] = vals[entry]
        acts = acts.view(*rows.shape, T)  # [c, M, T]
        levels = quantise(acts, values[c0:c0 + chunk, :1, None])
        length = lengths[rows]
        start = torch.where(length > window,
                            (slot_pos[c0:c0 + chunk] - window // 2).clamp(min=0).minimum((length - window).clamp(min=0)),
                            torch.zeros_like(length))
        end = torch.minimum(length, start + window)
        # to Python lists only the filled slots (rare latents leave most slots empty)
        filled = rows >= 0
        acts_l, levels_l = iter(round_sig(acts[filled]).tolist()), iter(levels[filled].tolist())
        rows_l, start_l, end_l = rows.tolist(), start.tolist(), end.tolist()
        for i, latent in enumerate(latents.tolist()):
            j = c0 + i
            slots = [(m, r, start_l[i][m], end_l[i][m]) for m, r in enumerate(rows_l[i]) if r >= 0]
            # silent negatives (same-token, random): no activations list of zeros
            ctxs = [Context(tokens[r][s:e], next(levels_l)[s:e], a[s:e] if m < keep else None)
                    for (m, r, s, e), a in zip(slots, acts_l)]
            n_top = sum(m < top_k for m, *_ in slots)
            docs = [doc_ids[r] for _, r, _, _ in slots]
            yield FeatureRecord(
                model=model, layer=layer, checkpoint_step=checkpoint_step, feature=latent,
                contexts=ctxs[:n_top], negatives=ctxs[n_top:],
                density=fired_tokens[j] / max(tracker.n_tokens, 1), max_activation=max_round[j],
                extra={"negative_kinds": [kinds[m] for m, *_ in slots[n_top:]],
                       "context_doc_ids": docs[:n_top], "negative_doc_ids": docs[n_top:],
                       "active_contexts": fired_contexts[j], "n_tokens": tracker.n_tokens},
            )


@contextmanager
def _no_gc():
    """Pause the cyclic GC: building millions of small lists would make it rescan them over and over."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _gc_paused(records: Iterator[FeatureRecord]) -> Iterator[FeatureRecord]:
    with _no_gc():
        yield from records


def stream_from_batches(batches: Iterable[Any], sae, decode: Callable[[list[int]], list[str]], *,
                        n_docs: int, layer: int, **options: Any) -> Iterator[FeatureRecord]:
    """The top-k pass over ActivationBatch-like objects (acts [B,T,d], input_ids, mask, doc_ids),
    run now; returns an iterator that builds the records latent by latent (so a writer holds
    only a chunk of them in memory). The options are stream_sites'."""
    return stream_sites(batches, {layer: sae}, decode, n_docs=n_docs, **options)[layer]


def stream_sites(batches: Iterable[Any], saes: dict[int, Any], decode: Callable[[list[int]], list[str]], *,
                 n_docs: int, model: str = "", checkpoint_step: int | None = None,
                 top_k: int = 50, window: int = 64, n_similar: int = 10, n_random: int = 20,
                 n_same_token: int = 5, random_pool: int = 256, features: Sequence[int] | None = None, seed: int = 0,
                 on_batch: Callable[[int, int], None] | None = None) -> dict[int, Iterator[FeatureRecord]]:
    """stream_from_batches for the SAEs of several layers (layer -> SAE) over one pass: each
    batch holds every layer's activations (batch.by_layer; batch.acts for a single layer).

    `n_docs` (an upper bound on the number of contexts) sizes the random-negative pool;
    `on_batch(n_contexts, n_tokens)` is called after each batch (progress).
    """
    if top_k < 1:
        raise UserError("--top-k must be at least 1")
    gen = torch.Generator().manual_seed(seed)
    pool = torch.randperm(max(n_docs, 0), generator=gen)[:random_pool].tolist() if n_random + n_same_token > 0 else []
    # the top-k buffers live where the SAE does (activations arrive on the CPU)
    devices = {layer: next((p.device for p in sae.parameters()), torch.device("cpu"))
               if hasattr(sae, "parameters") else torch.device("cpu") for layer, sae in saes.items()}
    trackers: dict[int, TopContexts] = {}
    from autointerp.distributed import rank_world

    distributed = rank_world()[1] > 1  # each rank has its share of the batches (iter_activations' shard)
    with torch.inference_mode():
        for batch in batches:
            for layer, sae in saes.items():
                device = devices[layer]
                acts = (batch.by_layer.get(layer, batch.acts) if getattr(batch, "by_layer", None) else batch.acts)
                acts, mask = acts.to(device), batch.mask.to(device)
                if layer not in trackers:
                    trackers[layer] = TopContexts(_num_latents(sae), top_k + n_similar, features, pool, device)
                # positions count text tokens only (a context holds input_ids[mask], e.g. without BOS)
                token_row = mask.nonzero(as_tuple=True)[0]
                token_pos = (mask.cumsum(1) - 1)[mask]
                x = acts[mask].float()
                values, indices = sae.encode(x) if len(x) else (x.new_zeros(0, 1), x.new_zeros(0, 1, dtype=torch.long))
                trackers[layer].add(values, indices, token_row, token_pos, batch.input_ids, mask, list(batch.doc_ids),
                                    base=batch.start if distributed else None)
            if on_batch:
                on_batch(len(batch.doc_ids), int(batch.mask.sum()))
    out = {}
    for layer, sae in saes.items():
        # an empty corpus (or no batch left for this rank): every latent is dead
        tracker = trackers.get(layer) or TopContexts(_num_latents(sae), top_k + n_similar, features,
                                                     pool if distributed else (), devices[layer])
        tracker.prune()
        if distributed and not tracker.merge_ranks():
            out[layer] = iter(())  # rank 0 writes the records
            continue
        out[layer] = _gc_paused(iter_records(tracker, decode, top_k=top_k, window=window, n_random=n_random,
                                             n_same_token=n_same_token, seed=seed, model=model, layer=layer,
                                             checkpoint_step=checkpoint_step))
    return out


def collect_from_batches(batches: Iterable[Any], sae, decode: Callable[[list[int]], list[str]],
                         **options: Any) -> list[FeatureRecord]:
    """stream_from_batches(...) as a list."""
    return list(stream_from_batches(batches, sae, decode, **options))


def collect(model, tokenizer, sae, docs, layer: int, top_k: int = 50, window: int = 64,
            **options: Any) -> list[FeatureRecord]:
    """Records of every latent (or `features`) of `sae` over `docs`, one streaming pass
    (the options are iter_collect's)."""
    return list(iter_collect(model, tokenizer, sae, docs, layer, top_k, window, **options))


def iter_collect(model, tokenizer, sae, docs, layer: int, top_k: int = 50, window: int = 64, *,
                 max_tokens: int | None = None, batch_size: int = 32, n_similar: int = 10, n_random: int = 20,
                 n_same_token: int = 5,
                 features: Sequence[int] | None = None, seed: int = 0, device: str | None = None,
                 model_name: str | None = None, checkpoint_step: int | None = None,
                 on_batch: Callable[[int, int], None] | None = None) -> Iterator[FeatureRecord]:
    """Run the pass over `docs` now; return an iterator over the records (latent order).

    Each document contributes its first `max_tokens` tokens (default: `window`, i.e. 64 as in
    the paper) as one context.
    """
    from autointerp.lm.activations import iter_activations, token_strings

    from autointerp.distributed import rank_world

    rank, world = rank_world()
    batches = iter_activations(model, tokenizer, docs, layer, batch_size=batch_size,
                               max_tokens=max_tokens or window, device=device,
                               shard=(rank, world) if world > 1 else None)
    name = model_name or getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    return stream_from_batches(batches, sae, lambda ids: token_strings(tokenizer, ids), n_docs=len(docs),
                                layer=layer, model=str(name), checkpoint_step=checkpoint_step, top_k=top_k,
                                window=window, n_similar=n_similar, n_random=n_random,
                                n_same_token=n_same_token, features=features,
                                seed=seed, on_batch=on_batch)


# --------------------------------------------------------------------------- writing records files

console = Console(stderr=True)


def collect_progress(disable: bool = False) -> Progress:
    """The progress bar of a collect run: documents and tokens per second (the task's `tps` field)."""
    return progress_bar("docs  {task.fields[tps]:>8} tok/s", eta=True, console=console, disable=disable)


def _model_name(model_id: str, run: Path | None) -> str:
    """The records' `model` field: a hub id as is, a local folder relative to the run (lm/step-600)
    or, outside a run, absolute."""
    if run is not None:
        return runlib.saved_path(model_id, run)
    return str(Path(model_id).resolve()) if Path(model_id).exists() else model_id


def _sae_provenance(sae) -> dict[str, Any]:
    cfg = getattr(sae, "cfg", None) or getattr(sae, "config", None)
    return {k: getattr(cfg, k, None) for k in ("model", "revision", "layer", "checkpoint_step")}


def collect_records(saes: list[tuple[Path, Path]], lm_path: str | None, revision: str | None, docs, *,
                    layer: int | None, step: int | None, opts: dict[str, Any], progress: Progress,
                    run: Path | None = None) -> list[dict[str, Any]]:
    """Collect the records of SAEs that read one LM (at their layers: one pass of the LM for all
    of them) into their files: [(SAE folder, records file)]. Returns what each wrote."""
    from autointerp.lm.activations import iter_activations, load_lm, token_strings
    from autointerp.distributed import rank_world
    from autointerp.sae import load_sae

    loaded, layers, model_id, provenance = [], [], None, None
    for sae_dir, _ in saes:
        sae = load_sae(sae_dir, device=opts["device"] or "cpu")
        prov = _sae_provenance(sae)
        folder = sae_dir if sae_dir.is_dir() else sae_dir.parent
        model_id = model_id or lm_path or runlib.resolve_model(prov["model"], folder)
        if not model_id:
            raise UserError(f"{sae_dir}: the SAE config names no model; pass --model")
        one = layer if layer is not None and len(saes) == 1 else prov["layer"]
        if one is None:
            raise UserError(f"{sae_dir}: the SAE config names no layer; pass --layer")
        if int(one) in layers:
            raise UserError(f"{sae_dir}: two SAEs of one collect read layer {one}; collect them apart")
        loaded.append(sae)
        layers.append(int(one))
        provenance = provenance or prov
    step = step if step is not None else provenance["checkpoint_step"]
    model, tokenizer = load_lm(str(model_id), revision=revision if revision is not None else provenance["revision"],
                               device=opts["device"] or "cpu")
    title = f"step {step}" if step is not None else "collect"
    task = progress.add_task(title + (f" (layers {', '.join(map(str, layers))})" if len(layers) > 1 else ""),
                             total=len(docs), tps="-")
    started, seen = time.perf_counter(), [0]

    def on_batch(n_ctx: int, n_tok: int) -> None:
        seen[0] += n_tok
        progress.update(task, advance=n_ctx, tps=f"{seen[0] / max(time.perf_counter() - started, 1e-9):,.0f}")

    rank, world = rank_world()
    batches = iter_activations(model, tokenizer, docs, layers, batch_size=opts["batch_size"],
                               max_tokens=opts["max_tokens"] or opts["window"], device=opts["device"],
                               shard=(rank, world) if world > 1 else None)
    streams = stream_sites(batches, dict(zip(layers, loaded)), lambda ids: token_strings(tokenizer, ids),
                           n_docs=len(docs), model=_model_name(str(model_id), run), checkpoint_step=step,
                           top_k=opts["top_k"], window=opts["window"], n_similar=opts["n_similar"],
                           n_random=opts["n_random"], n_same_token=opts["n_same_token"], features=opts["features"],
                           seed=opts["seed"], on_batch=on_batch)
    if rank != 0:  # under torchrun rank 0 holds the merged records and writes them
        return [{} for _ in saes]
    seconds = time.perf_counter() - started
    written = []
    for (_, out), one in zip(saes, layers):
        counts = {"latents": 0, "dead": 0}

        def counted(records: Iterable[FeatureRecord], counts=counts) -> Iterator[FeatureRecord]:
            for r in records:
                counts["latents"] += 1
                counts["dead"] += not r.contexts
                yield r

        write_jsonl(out, counted(streams[one]))  # streamed: one chunk of latents in memory at a time
        console.print(f"{out}: {counts['latents']} latents ({counts['dead']} dead), {seen[0]:,} tokens in "
                      f"{seconds:.1f} s" + (f" (one pass for layers {', '.join(map(str, layers))})" if len(layers) > 1 else "")
                      + (f" (this rank's share of the tokens; {world} ranks)" if world > 1 else ""))
        written.append({"records": runlib.saved_path(out, run) if run is not None else str(out), **counts,
                        "tokens": seen[0], "seconds": round(seconds, 2)})
    return written
