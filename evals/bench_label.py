"""Label throughput against the embedded llama.cpp server, next to the server's own ceiling.

    .venv/bin/python evals/bench_label.py [--features 4] [--concurrency 4]

In one run, on one server, with the same prompts: (1) a plain loop of raw `openai` calls,
(2) `explain_records` at concurrency 1 and (3) at concurrency N (each with a fresh cache),
(4) a rerun with the warm cache, which must send zero requests. Prints features/s and the
ratio to the mean of two raw loops, one before and one after the label runs (target >= 0.9x).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import openai

from autointerp.explain import (EXPLANATION_SCHEMA, ExplainSettings, explain_records, fit_prompt)
from autointerp.llm import LLMClient, json_response_format
from autointerp.schema import FeatureRecord, iter_jsonl
from autointerp.serve import default_threads, start_server

DEV = Path(__file__).resolve().parents[2] / "shared/data/llmjp_sae_human_labels.dev.jsonl.gz"


def load(n: int) -> list[FeatureRecord]:
    records = []
    for record in iter_jsonl(DEV, FeatureRecord.from_dict):
        if record.feature % 4 == 0:  # spread over features, not just the first few
            records.append(record)
        if len(records) == n:
            break
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--n-ctx", type=int, default=2048)
    args = parser.parse_args()
    if not DEV.exists():
        sys.exit(f"dev data not found at {DEV}")
    records = load(args.features)
    settings = ExplainSettings(context_window=args.n_ctx, engine="llama-cpp")
    print(f"{len(records)} features, llama.cpp threads {args.threads or default_threads()}, n_ctx {args.n_ctx}")
    with start_server("llama-cpp", n_threads=args.threads, n_ctx=args.n_ctx) as server, \
            tempfile.TemporaryDirectory() as tmp:
        def client(cache: str, concurrency: int) -> LLMClient:
            return LLMClient(server.base_url, server.model, cache_path=Path(tmp) / cache, concurrency=concurrency,
                             timeout=600, json_style="json_object", check_alive=server.check)

        # the prompts label will send (trimmed with the server's tokenizer)
        prompter = client("prompts.sqlite", 1)
        async def all_prompts() -> list[str]:
            return [await fit_prompt(r, prompter, settings.prompt_budget, settings.max_contexts, settings.window)
                    for r in records]

        prompts = prompter.run(all_prompts())
        raw = openai.OpenAI(base_url=server.base_url, api_key="none", timeout=600, max_retries=0)
        raw.chat.completions.create(model=server.model, messages=[{"role": "user", "content": "hi"}], max_tokens=1)

        def raw_loop() -> float:
            started = time.perf_counter()
            for prompt in prompts:
                raw.chat.completions.create(
                    model=server.model, messages=[{"role": "user", "content": prompt}],
                    max_tokens=settings.max_tokens, temperature=0.0, seed=0,
                    response_format=json_response_format(EXPLANATION_SCHEMA, style="json_object"))
            return time.perf_counter() - started

        # raw first and last: the CPU is shared, so the spread of the two shows the noise
        rows = [("raw openai loop", raw_loop(), len(prompts))]
        print(f"raw: {rows[0][1]:.1f} s", flush=True)
        for name, cache, concurrency in (("label c=1", "c1.sqlite", 1),
                                         (f"label c={args.concurrency}", "cN.sqlite", args.concurrency),
                                         ("raw openai loop again", None, 0),
                                         (f"label rerun c={args.concurrency}", "cN.sqlite", args.concurrency)):
            if cache is None:
                rows.append((name, raw_loop(), len(prompts)))
                continue
            c = client(cache, concurrency)
            started = time.perf_counter()
            explain_records(records, c, None, context_window=args.n_ctx, engine="llama-cpp")
            rows.append((name, time.perf_counter() - started, c.stats.requests))
            print(f"{name}: {c.stats}", flush=True)
            c.close()

    raw_s = (rows[0][1] + rows[3][1]) / 2
    print(f"{'run':<24}{'seconds':>9}{'features/s':>12}{'vs raw':>8}{'requests':>10}")
    for name, seconds, requests in rows:
        rate = len(records) / seconds
        if requests == 0:  # the warm-cache rerun: no server time to compare
            print(f"{name:<24}{seconds:>9.2f}{'-':>12}{'-':>8}{requests:>10}")
        else:
            print(f"{name:<24}{seconds:>9.1f}{rate:>12.3f}{raw_s / seconds:>7.2f}x{requests:>10}")
    rerun_requests = rows[-1][2]
    print(f"second run requests: {rerun_requests} ({'OK' if rerun_requests == 0 else 'FAIL'})")
    print("note: llama-cpp-python's server runs one request at a time (a lock around the model; "
          "it has no parallel slots), so concurrency > 1 only overlaps HTTP and tokenization.")


if __name__ == "__main__":
    main()
