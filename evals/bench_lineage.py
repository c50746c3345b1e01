"""Bench: feature lineage between two checkpoints of 32,768 latents over 1M shared tokens.

    .venv/bin/python evals/bench_lineage.py [--tokens 1000000] [--latents 32768] [--k 32] [--threads 1]

Synthetic TopK codes (the LM and SAE are not what is measured): checkpoint A has k distinct
latents per token with Zipf-skewed frequencies; checkpoint B renames A's latents by a random
permutation and replaces 20% of each token's latents with others (so correlations are below
1). Timed in this one process:

  baseline        per-latent sums and squares of both checkpoints' codes (every code read once:
                  the least any lineage method must do)
  lineage         lineage_pair: the match (T x k x k co-firing pairs into blocks of the
                  correlation matrix, best two parents per latent) + the shuffled-token null

and prints lineage / baseline, co-firing pairs per second, the share of B's latents whose
recovered parent is the true one, the resident memory with the codes loaded and at its peak
during lineage (sampled), and the process's peak RSS against the 2 GB target.
"""

from __future__ import annotations

import argparse
import resource
import threading
import time

import torch

from autointerp.lineage.match import Codes, lineage_pair, moments


def peak_rss_mb() -> float:
    """The process's high-water mark so far (Linux: ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20


class RssSampler(threading.Thread):
    """The peak resident memory while a piece of work runs (sampled every 5 ms)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak, self._stop_event = rss_mb(), threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(0.005):
            self.peak = max(self.peak, rss_mb())

    def stop(self) -> float:
        self._stop_event.set()
        self.join()
        return max(self.peak, rss_mb())


def synthetic_pair(tokens: int, latents: int, k: int, seed: int = 0) -> tuple[Codes, Codes, torch.Tensor]:
    """(A, B, perm): B's latent perm[i] continues A's latent i."""
    gen = torch.Generator().manual_seed(seed)
    band = latents // k  # slot r of every token draws from band r, so a token's k latents are distinct
    weights = 1.0 / torch.arange(1, band + 1, dtype=torch.float64) ** 0.8
    offsets = (torch.arange(k, dtype=torch.int32) * band)[None, :]
    perm = torch.randperm(latents, generator=gen).to(torch.int32)
    a_idx, a_val = torch.empty(tokens, k, dtype=torch.int32), torch.empty(tokens, k)
    b_idx, b_val = torch.empty(tokens, k, dtype=torch.int32), torch.empty(tokens, k)
    step = 1 << 16
    for t in range(0, tokens, step):  # in chunks, so generating is not what the peak memory measures
        n = min(step, tokens - t)
        idx = torch.multinomial(weights, n * k, replacement=True, generator=gen).view(n, k).to(torch.int32) + offsets
        a_idx[t:t + n] = idx
        a_val[t:t + n] = torch.rand(n, k, generator=gen) * 4
        other = torch.randint(0, band, (n, k), generator=gen, dtype=torch.int32) + offsets
        b_idx[t:t + n] = perm[torch.where(torch.rand(n, k, generator=gen) < 0.2, other, idx).long()]
        b_val[t:t + n] = a_val[t:t + n] * (1 + 0.3 * torch.rand(n, k, generator=gen))
    return Codes(a_val, a_idx, latents), Codes(b_val, b_idx, latents), perm


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=1_000_000)
    p.add_argument("--latents", type=int, default=32768)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--block-mb", type=int, default=16)
    # 1 by default: the work is many small scatter/gather ops, and a torch thread pool on a shared
    # machine waits for busy cores at each one (here: 65 s at 1 thread, 324 s at 2, load ~7 on 2 cores)
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's choice)")
    p.add_argument("--target-mb", type=float, default=2048, help="memory target for the whole process")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    a, b, perm = synthetic_pair(args.tokens, args.latents, args.k)
    codes_mb = 2 * (a.values.numel() * 4 + a.indices.numel() * 4) / 2**20
    started = time.perf_counter()
    moments(a), moments(b)
    t_base = time.perf_counter() - started
    before = rss_mb()
    sampler = RssSampler()
    sampler.start()
    started = time.perf_counter()
    result = lineage_pair(a, b, 0, 1, group_bytes=args.block_mb << 20)
    t_lineage = time.perf_counter() - started
    during = sampler.stop()
    rss = peak_rss_mb()

    inverse = torch.argsort(perm.long())
    true_parent = sum(1 for r in result.rows if not r.new and r.parent_feature == int(inverse[r.feature]))
    pairs = 2 * args.tokens * args.k * args.k  # match + null
    print(f"synthetic TopK codes: 2 checkpoints x {args.latents:,} latents, k {args.k}, {args.tokens:,} shared tokens "
          f"({codes_mb:.0f} MB of codes); torch threads {torch.get_num_threads()}; block {args.block_mb} MB")
    print(f"  baseline (sums + squares) {t_base:7.2f} s")
    print(f"  lineage (match + null)    {t_lineage:7.2f} s   {pairs / t_lineage / 1e6:,.0f}M co-firing pairs/s")
    print(f"lineage / baseline          = {t_lineage / t_base:.1f}x")
    print(f"latents of B: {len(result.rows):,} live, {result.meta['continued']:,} continued, {result.meta['new']:,} new; "
          f"true parent recovered for {true_parent / max(len(result.rows), 1):.2%}")
    print(f"RSS: {before:,.0f} MB with the codes loaded, {during:,.0f} MB peak during lineage (+{during - before:,.0f} MB)")
    print(f"peak RSS of the process     = {rss:,.0f} MB  (target <= {args.target_mb:,.0f} MB: "
          f"{'met' if rss <= args.target_mb else 'NOT met'})")


if __name__ == "__main__":
    main()
