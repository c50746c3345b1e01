"""`make eval-lineage`: the null and two sanity references for feature lineage, on a real run.

    .venv/bin/python evals/eval_lineage.py [--run runs/demo] [--sample all]

(a) permuted self-match: the last checkpoint's codes against themselves with the latents
    renamed by a random permutation; lineage must recover the permutation exactly.
(b) seed reference: a second SAE trained on the last checkpoint with another seed (the same
    settings as the run's SAEs, `autointerp sae train --seed 1`), matched against the run's SAE:
    the "same features" match rate and correlation distribution that a real continuation
    would reach if the model had not changed at all.
(c) the shuffled-token null of every real pair: the thresholds a match has to beat.
Then the real consecutive pairs, read against (b) and (c).

The second SAE is written to RUN/eval-lineage/ (reused when there). Nothing in the run's own
step folders is changed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from autointerp.lineage import match as lineage
from autointerp.lineage import sites
from autointerp import run as runlib


def quantiles(rows: list[lineage.LineageRow]) -> str:
    values = torch.tensor([r.correlation for r in rows], dtype=torch.float64)
    if not len(values):
        return "-"
    q = torch.quantile(values, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)).tolist()
    return f"{q[0]:.2f} / {q[1]:.2f} / {q[2]:.2f}"


def share(rows, test) -> str:
    return f"{sum(1 for r in rows if test(r)) / max(len(rows), 1):.1%}"


def train_seed_sae(run: Path, ckpt: sites.SiteSAE, out: Path, seed: int) -> None:
    """The run's SAE recipe (from its manifest) with another seed; skipped when already trained."""
    if (out / "metrics.json").exists():
        print(f"(b) reusing {out}")
        return
    settings = runlib.read_manifest(run).get("stages", {}).get("sae", {})
    args = ["sae", "train", "--model", ckpt.model, "--layer", str(ckpt.layer), "--out", str(out), "--seed", str(seed)]
    # manifest keys -> `sae train` options (docs/cli.md)
    options = {"batch_size": "--batch-tokens", "max_tokens": "--train-tokens"}
    for key in ("k", "expansion", "batch_size", "lr", "max_tokens", "seq_len", "auxk_alpha", "dead_tokens", "corpus"):
        if settings.get(key) is not None:
            args += [options.get(key, f"--{key.replace('_', '-')}"), str(settings[key])]
    if ckpt.revision:
        args += ["--revision", ckpt.revision]
    print(f"(b) training the seed-{seed} SAE: autointerp {' '.join(args)}", flush=True)
    rc = subprocess.call([sys.executable, "-m", "autointerp.cli", *args])
    if rc:
        raise SystemExit(f"SAE training failed (exit {rc})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, default=Path("runs/demo"))
    p.add_argument("--sample", default="all", help="shared documents: all (the demo's choice) or eval")
    p.add_argument("--corpus", default=None)
    p.add_argument("--quantile", type=float, default=0.99)
    p.add_argument("--bins", type=int, default=10)
    p.add_argument("--seed", type=int, default=1, help="seed of the second SAE (the run's SAEs use 0)")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.run.is_dir():
        raise SystemExit(f"{args.run}: no such run; make one first (make demo, or autointerp demo {args.run})")
    started = time.perf_counter()
    checkpoints = sites.find_sites(args.run)
    corpus = args.corpus or runlib.read_manifest(args.run).get("stages", {}).get("sae", {}).get("corpus") or "debian-reference"
    docs = sites.shared_documents(corpus, args.sample, None)
    last = checkpoints[-1]
    work = args.run / "eval-lineage"
    train_seed_sae(args.run, last, work / f"sae-seed{args.seed}", args.seed)

    codes = {}
    for ckpt in checkpoints:
        codes[ckpt.site], tokens = sites.encode_checkpoint(ckpt, docs, 64, 32, "cpu")
    seed_ckpt = sites.SiteSAE(last.site, work / f"sae-seed{args.seed}", last.model, last.revision, last.layer)
    seed_codes, _ = sites.encode_checkpoint(seed_ckpt, docs, 64, 32, "cpu")
    n_tokens = codes[last.site].n_tokens
    print(f"\nrun {args.run}: sites {[c.site.name for c in checkpoints]}, {len(docs)} shared documents "
          f"({args.sample}), {n_tokens:,} tokens; null quantile {args.quantile}, {args.bins} firing bands\n")

    # (a) permuted self-match
    own = codes[last.site]
    perm = torch.randperm(own.n_latents, generator=torch.Generator().manual_seed(0))
    a = lineage.lineage_pair(own, own.permuted(perm), last.step, last.step, args.quantile, args.bins)
    inverse = torch.argsort(perm)
    exact = sum(1 for r in a.rows if r.parent_feature == int(inverse[r.feature]))
    print(f"(a) permuted self-match, step {last.step}: {exact} of {len(a.rows)} live latents recovered exactly "
          f"({'all' if exact == len(a.rows) else 'NOT all'}); correlation min {min(r.correlation for r in a.rows):.4f}")

    # (b) two seeds on the same checkpoint
    b = lineage.lineage_pair(own, seed_codes, last.step, last.step, args.quantile, args.bins)
    matched = [r for r in b.rows if not r.new]
    seed_median = float(torch.tensor([r.correlation for r in b.rows]).median())
    print(f"(b) seed {args.seed} vs seed 0 SAE, step {last.step}: {len(matched)} of {len(b.rows)} live latents "
          f"match a seed-0 latent ({len(matched) / max(len(b.rows), 1):.1%}); best correlation p10/median/p90 "
          f"{quantiles(b.rows)}; >= 0.5: {share(b.rows, lambda r: r.correlation >= 0.5)}, "
          f">= 0.7: {share(b.rows, lambda r: r.correlation >= 0.7)}, >= 0.9: {share(b.rows, lambda r: r.correlation >= 0.9)}")

    # (c) + the real pairs
    print("\n(c) shuffled-token null and the real pairs (best correlation of every live latent of B):")
    header = (f"{'pair':<14}{'live B':>8}{'continued':>11}{'new':>7}  {'null p50/p99':>13}  {'thresholds':>11}  "
              f"{'real p10/p50/p90':>18}  {'>= seed median':>14}")
    print(header)
    print("-" * len(header))
    for label, res in [(f"seed {args.seed} vs 0", b)] + [
            (f"{x.site.name} -> {y.site.name}", lineage.lineage_pair(codes[x.site], codes[y.site], x.step, y.step,
                                                                     args.quantile, args.bins, layer_a=x.layer,
                                                                     layer_b=y.layer))
            for x, y in zip(checkpoints, checkpoints[1:])]:
        null = res.meta["null"]
        thr = [band["threshold"] for band in null["bins"]]
        q = null["best_corr_quantiles"]
        print(f"{label:<14}{len(res.rows):>8}{res.meta['continued']:>11}{res.meta['new']:>7}  "
              f"{q['median']:>5.2f} / {q['p99']:<5.2f}  {min(thr):>4.2f}-{max(thr):<4.2f}  {quantiles(res.rows):>18}  "
              f"{share(res.rows, lambda r: r.correlation >= seed_median):>14}")
    print(f"\n'>= seed median': share of B's latents whose best correlation reaches {seed_median:.2f}, the median "
          f"of (b): as close as the same checkpoint's features under a new SAE seed.")
    print(f"eval-lineage: {time.perf_counter() - started:.0f} s")
    (work / "eval.json").write_text(json.dumps({"tokens": n_tokens, "sample": args.sample, "seed_median": seed_median,
                                                "permutation_exact": exact, "permutation_live": len(a.rows),
                                                "seed_match_rate": len(matched) / max(len(b.rows), 1)}, indent=2))


if __name__ == "__main__":
    main()
