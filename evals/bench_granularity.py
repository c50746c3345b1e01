"""Speed of the granularity evidence (`granularity.stat_features`) on the dev file.

    .venv/bin/python evals/bench_granularity.py [--passes 3] [--baseline-rev b0643c2]

In one run: the evidence before issue 12 (granularity.py at --baseline-rev, loaded from git, with
its JMdict lookups through jamdict) and the current evidence, all groups (JMdict both ways, UniDic
loanwords and lemmas, context cohesion: what the eval computes) and the shipped model's groups
(what `decide` computes). Each pass labels all 300 dev features; the first
pass starts with cold per-token caches, later passes reuse them (as a whole-SAE run does after
its first few hundred latents, since distinct tokens are bounded by the vocabulary). Prints
features/s per pass, one process, and the ratio current / baseline.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from autointerp.labels import decision as G
from autointerp.labels import dictionary as D
from autointerp.labels import evidence as E
from autointerp.records.read import read_records

REPO = Path(__file__).resolve().parents[1]
DEV = REPO.parent / "shared/data/llmjp_sae_human_labels.dev.jsonl.gz"


def load_baseline(rev: str):
    try:
        source = subprocess.run(["git", "show", f"{rev}:autointerp/granularity.py"], cwd=REPO, check=True,
                                capture_output=True, text=True).stdout
    except (subprocess.CalledProcessError, FileNotFoundError):
        return None
    path = Path(tempfile.mkdtemp()) / "granularity_baseline.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("granularity_baseline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def rates(fn, records, passes: int) -> list[float]:
    out = []
    for _ in range(passes):
        started = time.perf_counter()
        for r in records:
            fn(r)
        out.append(len(records) / (time.perf_counter() - started))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--baseline-rev", default="b0643c2", help="git revision of the baseline granularity.py")
    args, _ = ap.parse_known_args()
    if not DEV.exists():
        print(f"dev file {DEV} not found; nothing to measure")
        return 0
    records = read_records(DEV)
    print("evidence sources: " + ", ".join(f"{k} {'on' if s['available'] else 'off'}"
                                           for k, s in D.evidence_sources().items()))
    baseline = load_baseline(args.baseline_rev)
    rows = {}
    if baseline is not None:
        print(f"baseline JMdict (through jamdict): {'on' if baseline.lexicon_available() else 'off'}")
        rows[f"before ({args.baseline_rev})"] = rates(baseline.stat_features, records, args.passes)
    rows["current, all groups"] = rates(E.stat_features, records, args.passes)
    shipped = G.load_models()[G.choose_model(G.load_models())].groups
    rows["current, shipped groups"] = rates(lambda r: E.stat_features(r, shipped), records, args.passes)
    print(f"{'stat_features, features/s':<28} " + " ".join(f"{'pass ' + str(i + 1):>8}" for i in range(args.passes)))
    for name, values in rows.items():
        print(f"{name:<28} " + " ".join(f"{v:8.0f}" for v in values))
    if baseline is not None:
        before = rows[f"before ({args.baseline_rev})"]
        for name in ("current, all groups", "current, shipped groups"):
            print(f"ratio {name} / before: " + " ".join(f"{b / a:.2f}x" for a, b in zip(before, rows[name])) +
                  " (pass 1 cold caches, later passes warm)")
    print(f"shipped groups (what `decide` computes): {'+'.join(shipped)}; rows after the first reuse its per-token caches")
    warm = rows["current, shipped groups"][-1]
    print(f"warm, one process: {warm:.0f} features/s; two processes on 2 cores would give about {2 * warm:.0f} "
          f"(target for statistical labelling: >= 1000 on 2 cores)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
