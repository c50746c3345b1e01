"""The concept-synonym reading set (issue 33): is a latent that a decision calls concept-synonym
one a reader believes?

    sample  draw, with a fixed seed, up to N concept-synonym latents of each decision (the old
            labels and the new ones of the same records), pool them, shuffle: sample.jsonl
    show    print the pooled latents for judging, blind: only each one's max tokens with counts
            and its top contexts (never its label, confidence, evidence line, or which decision
            chose it)
    score   read the judgements (judgements.jsonl: {"item", "verdict", "note"}, verdicts as in
            RULES.md) and print each decision's synonym precision with a Wilson 95% interval

The rules (RULES.md beside the sample) were written before any latent was judged. Typical use,
on a finished `make demo-real` copied into runs/demo-real (the old labels) and relabelled
statistically with the new decision into runs/demo-real-new (`autointerp score DIR --stats-only`):

    python evals/synonym_reading.py sample --old runs/demo-real --new runs/demo-real-new
    python evals/synonym_reading.py show --contexts 8 > runs/reading.txt
    python evals/synonym_reading.py score
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import Counter
from pathlib import Path

from autointerp.jsonl import iter_jsonl
from autointerp.labels import language
from autointerp.labels.shares import wilson
from autointerp.records.lean import scan_records
from autointerp.schema import FeatureRecord

ROOT = Path(__file__).resolve().parent / "synonym_reading"  # RULES.md, and a folder per reading set
VERDICTS = ("synonym", "inflection", "grammar", "weak link", "semantic", "junk")


def synonym_keys(run: Path) -> dict[tuple[str, int], float]:
    """(site, feature) -> confidence of every latent labelled concept-synonym in a run's sites."""
    out = {}
    for labels in sorted(run.glob("*/labels.jsonl")):
        for d in iter_jsonl(labels, dict):
            if d.get("granularity") == "concept-synonym":
                out[(labels.parent.name, int(d["feature"]))] = float(d.get("confidence") or 0.0)
    return out


def cmd_sample(args) -> int:
    HERE = ROOT / args.set
    decisions = {"old": synonym_keys(args.old), "new": synonym_keys(args.new)}
    rng = random.Random(args.seed)
    chosen: dict[tuple[str, int], list[str]] = {}
    for name, keys in decisions.items():
        drawn = rng.sample(sorted(keys), min(args.n, len(keys)))
        for key in drawn:
            chosen.setdefault(key, []).append(name)
    items = sorted(chosen)
    rng.shuffle(items)
    HERE.mkdir(parents=True, exist_ok=True)
    with open(HERE / "sample.jsonl", "w") as f:
        for i, (site, feature) in enumerate(items):
            # which decisions drew it, and which label it as synonym at all (for the precision of each)
            f.write(json.dumps({"item": i, "site": site, "feature": feature, "drawn_by": chosen[(site, feature)],
                                "synonym_in": [n for n, keys in decisions.items() if (site, feature) in keys]},
                               ensure_ascii=False) + "\n")
    meta = {"seed": args.seed, "n_per_decision": args.n, "old": str(args.old), "new": str(args.new),
            "synonym_latents": {n: len(k) for n, k in decisions.items()}, "pooled": len(items)}
    (HERE / "sample.meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(json.dumps(meta))
    return 0


def _records(run: Path, wanted: set[tuple[str, int]]) -> dict[tuple[str, int], FeatureRecord]:
    out = {}
    for site in sorted({s for s, _ in wanted}):
        features = {f for s, f in wanted if s == site}
        path = next((run / site).glob("records.jsonl*"))
        for key, _live, raw in scan_records(path):
            if key.feature in features:
                out[(site, key.feature)] = FeatureRecord.from_dict(json.loads(raw))
    return out


def _mark(tokens: list[str], i: int, width: int = 12) -> str:
    lo, hi = max(0, i - width), min(len(tokens), i + 4)
    text = lambda ts: "".join(language.clean_token(t) for t in ts).replace("\n", "⏎")  # noqa: E731
    return f"{text(tokens[lo:i])}[[{text([tokens[i]])}]]{text(tokens[i + 1:hi])}"


def cmd_show(args) -> int:
    HERE = ROOT / args.set
    items = list(iter_jsonl(HERE / "sample.jsonl", dict))
    records = _records(args.run, {(d["site"], d["feature"]) for d in items})
    for d in items[args.start:args.start + args.count]:
        record = records[(d["site"], d["feature"])]
        firing = [(c.max_index, c) for c in record.contexts if c.max_index >= 0 and c.levels[c.max_index] > 0]
        counts = Counter(language.clean_token(c.tokens[i]) for i, c in firing)
        print(f"=== item {d['item']} ({len(firing)} firing contexts)")
        print("   max tokens: " + " · ".join(f"{t!r} {k}" for t, k in counts.most_common(12)))
        # contexts spread over the max tokens: each distinct max token's first contexts, then the rest
        shown, seen = [], Counter()
        for i, c in firing:
            t = language.clean_token(c.tokens[i])
            if seen[t] < 2:
                shown.append((i, c))
            seen[t] += 1
        for i, c in shown[:args.contexts]:
            print("   | " + _mark(c.tokens, i))
    return 0


def cmd_score(args) -> int:
    HERE = ROOT / args.set
    items = {d["item"]: d for d in iter_jsonl(HERE / "sample.jsonl", dict)}
    judged = {d["item"]: d for d in iter_jsonl(HERE / "judgements.jsonl", dict)}
    bad = [d for d in judged.values() if d["verdict"] not in VERDICTS]
    if bad:
        print(f"unknown verdicts: {bad[:3]}", file=sys.stderr)
        return 1
    missing = sorted(set(items) - set(judged))
    print(f"{len(judged)} of {len(items)} pooled latents judged" + (f"; not yet: {missing[:10]}" if missing else ""))
    print(f"{'decision':<9} {'drawn':>5} {'judged':>6} {'synonym':>7}  precision [Wilson 95%]   verdicts")
    for name in ("old", "new"):
        mine = [judged[i] for i, d in items.items() if name in d["drawn_by"] and i in judged]
        verdicts = Counter(j["verdict"] for j in mine)
        k, n = verdicts["synonym"], len(mine)
        lo, hi = wilson(k, n) if n else (0.0, 0.0)
        print(f"{name:<9} {sum(name in d['drawn_by'] for d in items.values()):>5} {n:>6} {k:>7}  "
              f"{k / max(n, 1):6.1%} [{lo:.1%}, {hi:.1%}]   " + ", ".join(f"{v} {c}" for v, c in verdicts.most_common()))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sample")
    s.add_argument("--old", type=Path, required=True, help="run whose labels are the old decision's")
    s.add_argument("--new", type=Path, required=True, help="the same records labelled by the new decision")
    s.add_argument("--n", type=int, default=40, help="latents drawn per decision (default 40)")
    s.add_argument("--seed", type=int, default=33)
    s = sub.add_parser("show")
    s.add_argument("--run", type=Path, default=Path("runs/demo-real"), help="where the records are")
    s.add_argument("--start", type=int, default=0)
    s.add_argument("--count", type=int, default=1000)
    s.add_argument("--contexts", type=int, default=8)
    sub.add_parser("score")
    for p in sub.choices.values():
        p.add_argument("--set", default="test", help="the reading set's folder under evals/synonym_reading/ "
                                                     "(dev: the first set, read while the gate was designed; test: drawn after)")
    args = ap.parse_args()
    return {"sample": cmd_sample, "show": cmd_show, "score": cmd_score}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
