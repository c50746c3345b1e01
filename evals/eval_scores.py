"""The shuffled-description control on the human-labelled dev features (`make eval-scores`).

Do the scorers tell a feature's own description from another feature's? A seeded sample of the
300 dev features (default 20%, at least 10) is scored twice on the same held-out examples: with
its own description and with another sampled feature's (a seeded derangement). Per method: mean
matched, mean shuffled, the paired gap with a bootstrap 95% interval over features, a verdict.

Descriptions: the explainer's, where `make eval-explain` left them (RUN/step-N/explanations.jsonl
under --explanations, default runs/eval-explain, covering >= 90% of the sample); otherwise
deterministic ones that name each feature's real top max tokens (`fires on " more", "また"`,
counted over the explainer's half of the contexts, so the scorers' half stays held out) --
descriptions that are right by construction, so the control tests the scorer alone.

Simulator: the embedded llama.cpp server (SmolLM2-135M-Instruct) unless --base-url; example counts
by engine (ScoreSettings.for_engine). Everything is cached under --out (default runs/eval-scores/
<descriptions>/: scores.jsonl, control.jsonl, cache.sqlite), so a rerun prints the same numbers at
once. The dev file has no negatives: non-activating examples are other features' top windows at
the same checkpoint, taken as silent for this feature (an approximation).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
from rich.console import Console

from autointerp.interp import score
from autointerp.interp.control import control_plan, control_sample, run_control
from autointerp.interp.scorers.examples import split_contexts
from autointerp.labels.language import clean_token
from autointerp.progress import progress_bar
from autointerp.records.read import read_records
from autointerp.schema import FeatureRecord

REPO = Path(__file__).resolve().parents[1]
DEV = REPO.parent / "shared/data/llmjp_sae_human_labels.dev.jsonl.gz"


def top_token_description(record: FeatureRecord, n: int = 3) -> str:
    """`fires on " more", "また"`: the most common max tokens of the explainer's contexts."""
    shown, _ = split_contexts(record)
    counts = Counter(clean_token(c.tokens[c.max_index]) for c in shown if c.max_index >= 0 and c.levels[c.max_index] > 0)
    tokens = [t for t, _ in counts.most_common(n) if t.strip()] or [t for t, _ in counts.most_common(1)]
    return "fires on " + ", ".join(json.dumps(t, ensure_ascii=False) for t in tokens)


def explainer_descriptions(folder: Path) -> dict:
    out = {}
    for path in sorted(folder.glob("step-*/explanations.jsonl")):
        out |= {k: v for k, v in score.read_descriptions(path).items() if v.strip()}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--dev", type=Path, default=DEV, help="the human-labelled dev file")
    ap.add_argument("--features", type=int, default=None, help="only a seeded sample of N dev features (default all)")
    ap.add_argument("--descriptions", choices=["auto", "explainer", "top-tokens"], default="auto",
                    help="auto: the explainer's where cached, else top max tokens")
    ap.add_argument("--explanations", type=Path, default=REPO / "runs/eval-explain",
                    help="where `make eval-explain` keeps step-N/explanations.jsonl")
    ap.add_argument("--fraction", type=float, default=0.2, help="share of the features in the control (default 0.2)")
    ap.add_argument("--minimum", type=int, default=10, help="at least this many features in the control")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="cache folder (default runs/eval-scores/<descriptions>)")
    ap.add_argument("--base-url", default=None, help="an OpenAI-compatible server instead of the embedded one")
    ap.add_argument("--model", default=None)
    ap.add_argument("--engine", default=None, help="llama-cpp or vllm: picks the example counts and simulation mode")
    ap.add_argument("--threads", type=int, default=None, help="threads of the embedded llama.cpp server")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--human-class", default=None,
                    help="only the dev features people labelled so (e.g. token: there top-token descriptions are right)")
    ap.add_argument("--methods", default=",".join(score.METHODS),
                    help="comma-separated scoring methods (default all: simulation,detection,fuzzing)")
    args = ap.parse_args(argv)
    console = Console(stderr=True)

    if not args.dev.exists():
        print(f"no dev file at {args.dev}: nothing to evaluate", file=sys.stderr)
        return 1
    records = [r for r in read_records(args.dev) if r.contexts]
    if args.human_class:
        records = [r for r in records if (r.extra or {}).get("human_granularity") == args.human_class]
    if args.features:
        records = score_sample(records, args.features, args.seed)
    kind = args.descriptions
    cached = explainer_descriptions(args.explanations) if args.explanations.is_dir() else {}
    if kind == "auto":
        kind = "explainer" if sum(r.key in cached for r in records) >= 0.9 * len(records) else "top-tokens"
    if kind == "explainer":
        descriptions = {r.key: cached.get(r.key, "") for r in records}
        if not any(descriptions.values()):
            print(f"no explainer descriptions under {args.explanations} (run `make eval-explain`)", file=sys.stderr)
            return 1
    else:
        descriptions = {r.key: top_token_description(r) for r in records}
    out = args.out or REPO / "runs/eval-scores" / kind
    out.mkdir(parents=True, exist_ok=True)
    settings = score.ScoreSettings.for_engine(args.engine or ("llama-cpp" if not args.base_url else None),
                                              seed=args.seed, methods=tuple(args.methods.split(",")))
    sample = control_sample(records, descriptions, {r.key for r in records}, args.fraction, args.minimum,
                            args.seed)
    steps = sorted({r.checkpoint_step for r in records})
    example = next(iter(descriptions.values()), "")
    print(f"dev features: {len(records)} ({len(steps)} checkpoints); descriptions: {kind} (e.g. {example})")
    print(f"control sample: {len(sample)} features (seed {args.seed}, {args.fraction:.0%}, at least {args.minimum}), "
          f"each scored with its own and with another sampled feature's description; "
          f"{settings.n_activating} + {settings.n_non_activating} examples per method")

    from autointerp.llm.client import LLMClient
    from autointerp.llm.serve import endpoint

    # the control's own plan, to know whether anything is left to send (else no server is started)
    planned = [score.Scores(r.checkpoint_step, r.feature, detection=0.5) for r in sample]
    _, shuffled, _ = control_plan(records, descriptions, planned, 1.0, 0, args.seed)
    needed = bool(score.pending_keys(sample, descriptions, out / "scores.jsonl")
                  or score.pending_keys(sample, shuffled, out / "control.jsonl"))
    started = time.perf_counter()
    with endpoint(args.base_url, args.model, args.engine, args.threads, 2048, needed) as (url, model, engine, alive):
        client = LLMClient(url, model, cache_path=out / "cache.sqlite", concurrency=args.concurrency,
                           check_alive=alive, seed=args.seed)
        try:
            with progress_bar(console=console) as progress:
                task = progress.add_task("matched descriptions", total=len(sample))
                matched = score.score_records(sample, descriptions, client, out / "scores.jsonl", settings,
                                              on_done=lambda _: progress.update(task, advance=1), pool=records)
                task = progress.add_task("shuffled descriptions", total=len(sample))
                # every matched-scored feature is in the control: fraction 1 of the sample
                control = run_control(records, descriptions, matched, client, out / "control.jsonl", settings,
                                      fraction=1.0, minimum=0, seed=args.seed,
                                      on_done=lambda _: progress.update(task, advance=1))
        finally:
            stats = client.stats.to_dict()
            client.close()
    seconds = time.perf_counter() - started
    print(f"simulator: {control.model}; {stats['requests']} requests ({stats['cache_hits']} cached) in {seconds:.0f} s")
    print()
    print(f"{'method':<11} {'metric':<18} {'n':>3} {'matched':>8} {'shuffled':>8} {'gap':>7}  95% CI of the gap")
    for method, m in control.methods.items():
        if m.get("gap") is None:
            print(f"{method:<11} {'-':<18} {m['n']:>3}  {m['verdict']}")
            continue
        print(f"{method:<11} {m['metric']:<18} {m['n']:>3} {m['matched']:>8.3f} {m['shuffled']:>8.3f} "
              f"{m['gap']:>+7.3f}  {m['ci95'][0]:+.3f} .. {m['ci95'][1]:+.3f}")
    print()
    widths = {m: [s.ci95[m][1] - s.ci95[m][0] for s in matched if m in (s.ci95 or {})] for m in score.METHODS}
    print("median width of a feature's own 95% interval (matched): " +
          ", ".join(f"{m} {np.median(w):.2f}" for m, w in widths.items() if w))
    for method, m in control.methods.items():
        print(f"  {m['verdict']}")
    print(f"verdict: {control.verdict}")
    (out / "summary.json").write_text(json.dumps({"descriptions": kind, "features": len(records),
                                                  "control": control.to_dict(), "settings": settings.to_dict()},
                                                 indent=2, ensure_ascii=False))
    return 0


def score_sample(records: list[FeatureRecord], n: int, seed: int) -> list[FeatureRecord]:
    import random

    chosen = set(r.key for r in random.Random(f"eval-scores:{seed}").sample(records, min(n, len(records))))
    return [r for r in records if r.key in chosen]


if __name__ == "__main__":
    sys.exit(main())
