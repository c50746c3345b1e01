"""Variants of the LM evidence rated like `make eval` rates a piece beside the shipped configuration:
nested grouped CV (10 seeds, every choice inside the outer folds) with the shipped pieces (gloss,
loanword) as candidates, plus one small group made of single LM features (fewer inputs than the
lm_* groups, for 21 synonym features). Reads the LM evidence from its cache (computes what is missing).

    .venv/bin/python evals/lm_evidence_variants.py [--seeds 10]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

from autointerp.labels import evidence as E  # noqa: E402
from autointerp.labels import fit as F  # noqa: E402
from autointerp.labels import lm_evidence as LM  # noqa: E402
from autointerp.records.read import read_records  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from eval_granularity import DEV, fmt  # noqa: E402

VARIANTS = {"v_link_top2": ["lm_link_top2"], "v_link_family": ["lm_link_family"], "v_tr_w": ["lm_tr_w"],
            "v_top2_tr_w": ["lm_link_top2", "lm_tr_w"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args()
    records = read_records(DEV)
    y = [r.extra["human_granularity"] for r in records]
    gid = [r.feature for r in records]
    steps = [r.checkpoint_step for r in records]
    evidence = [E.feature_vector(r).features for r in records]
    for f, lm in zip(evidence, LM.LMEvidence().features(records)):
        f.update(lm)
    E.EVIDENCE_GROUPS.update(VARIANTS)  # fit.group_features reads this dict
    X, names = F.design(evidence, list(E.EVIDENCE_GROUPS))
    seeds = list(range(args.seeds))
    base = ["gloss", "loanword"]
    shipped = F.summarise(F.nested_cv(X, y, gid, names, base, seeds=seeds, jobs=args.jobs), y, steps)
    print(f"{'candidates':<32} {'kappa4':<16} {'gain':>7} {'bar':<4} {'kappa3':<16} {'syn recall':<13} "
          f"{'syn precision':<13} worst share gap")
    rows = [("gloss+loanword (shipped)", shipped)]
    for name in VARIANTS:
        started = time.perf_counter()
        rows.append((f"+{name} ({'+'.join(VARIANTS[name])})"[:32],
                     F.summarise(F.nested_cv(X, y, gid, names, base + [name], seeds=seeds, jobs=args.jobs), y, steps)))
        print(f"  ({name}: {time.perf_counter() - started:.0f} s)", file=sys.stderr)
    for name, res in rows:
        gain = res["kappa4"][0] - shipped["kappa4"][0]
        bar = "-" if res is shipped else ("yes" if gain > max(res["kappa4"][1], shipped["kappa4"][1]) else "no")
        print(f"{name:<32} {fmt(res['kappa4']):<16} {gain:+7.3f} {bar:<4} {fmt(res['kappa3']):<16} "
              f"{fmt(res['recall_concept-synonym'], 2):<13} {fmt(res['precision_concept-synonym'], 2):<13} "
              f"{fmt(res['worst_share_gap'], 1)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
