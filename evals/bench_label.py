"""Label throughput on the embedded llama.cpp server (xllamacpp), next to the server's own ceiling.

    .venv/bin/python evals/bench_label.py [--features 8] [--concurrency 4] [--threads N] [--parallel N]

In one run, on one server, with the same prompts (the label stage's, fitted with the server's
tokenizer) and the same JSON-schema request: (1) the raw ceiling, a plain loop of `openai` chat
calls (one in flight per server slot), (2) `explain_records` at --concurrency with a fresh cache,
(3) the raw loop again (the spread of the two shows the noise of a shared CPU), (4) a rerun with
the warm cache, which must send zero requests. Prints prompt and generated tokens/s, explained
features/s, the share of valid answers not cut short by max_tokens, and label / raw (target >= 0.9x).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai

from autointerp.interp.explainer import ANSWER_SCHEMA as EXPLANATION_SCHEMA, ExplainSettings, explain_records, fit_prompt
from autointerp.llm.client import ChatResult, LLMClient, check_answer, json_response_format
from autointerp.jsonl import iter_jsonl
from autointerp.schema import FeatureRecord
from autointerp.llm.serve import default_parallel, flag_value, start_server, threads_summary

DEV = Path(__file__).resolve().parents[2] / "shared/data/llmjp_sae_human_labels.dev.jsonl.gz"


def load(n: int) -> list[FeatureRecord]:
    records = []
    for record in iter_jsonl(DEV, FeatureRecord.from_dict):
        if record.feature % 4 == 0:  # spread over features, not just the first few
            records.append(record)
        if len(records) == n:
            break
    return records


def peak_memory_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--parallel", type=int, default=None, help="server slots (default: as autointerp serve)")
    parser.add_argument("--n-ctx", type=int, default=2048, help="context per slot")
    args = parser.parse_args()
    if not DEV.exists():
        sys.exit(f"dev data not found at {DEV}")
    records = load(args.features)
    settings = ExplainSettings(context_window=args.n_ctx, engine="llama-cpp", form="chat")
    with start_server("llama-cpp", n_threads=args.threads, n_ctx=args.n_ctx, parallel=args.parallel) as server, \
            tempfile.TemporaryDirectory() as tmp:
        slots = int(flag_value(server.command, "--parallel") or 1)
        print(f"{len(records)} features; llama.cpp (xllamacpp) {threads_summary(server.command)}, "
              f"{slots} slot(s) (default here {default_parallel()}), n_ctx {args.n_ctx} per slot, "
              f"label concurrency {args.concurrency}", flush=True)

        def client(cache: str, concurrency: int) -> LLMClient:
            return LLMClient(server.base_url, server.model, cache_path=Path(tmp) / cache, concurrency=concurrency,
                             timeout=600, check_alive=server.check)

        prompter = client("prompts.sqlite", 1)  # the prompts label sends (trimmed with the server's tokenizer)

        async def all_prompts() -> list[str]:
            return [(await fit_prompt(r, prompter, settings.prompt_budget, settings.n_contexts, settings.window)).text
                    for r in records]

        prompts = prompter.run(all_prompts())
        raw = openai.OpenAI(base_url=server.base_url, api_key="none", timeout=600, max_retries=0)
        raw.chat.completions.create(model=server.model, messages=[{"role": "user", "content": "hi"}], max_tokens=1)

        def ask(prompt: str) -> tuple[int, int, bool]:
            response = raw.chat.completions.create(
                model=server.model, messages=[{"role": "user", "content": prompt}], max_tokens=settings.max_tokens,
                temperature=0.0, seed=0, response_format=json_response_format(EXPLANATION_SCHEMA, "explanation"))
            choice = response.choices[0]
            answer = ChatResult(text=choice.message.content or "", finish_reason=choice.finish_reason)
            valid = check_answer(answer, EXPLANATION_SCHEMA)[1] is None
            return response.usage.prompt_tokens, response.usage.completion_tokens, valid

        rows = []  # name, seconds, prompt tokens, generated tokens, valid answers, requests, note

        def run_raw(name: str) -> None:
            started = time.perf_counter()
            with ThreadPoolExecutor(slots) as pool:  # one request in flight per slot: the server's ceiling
                answers = list(pool.map(ask, prompts))
            seconds = time.perf_counter() - started
            rows.append((name, seconds, *(sum(column) for column in zip(*answers)), len(prompts), ""))
            print(f"{name}: {seconds:.1f} s", flush=True)

        def run_label(name: str, cache: str) -> None:
            c = client(cache, args.concurrency)
            started = time.perf_counter()
            explanations = explain_records(records, c, None, settings)
            seconds = time.perf_counter() - started
            valid = sum(e.error is None for e in explanations)
            s = c.stats
            rows.append((name, seconds, s.prompt_tokens, s.completion_tokens, valid, s.requests,
                         f"{s.truncated} cut short, {s.repairs} re-asked" if s.requests else "all from cache"))
            print(f"{name}: {seconds:.1f} s  {s}", flush=True)
            c.close()

        # raw first and last: the CPU is shared, so the spread of the two shows the noise
        run_raw("raw openai loop")
        run_label(f"label c={args.concurrency}", "label.sqlite")
        run_raw("raw openai loop again")
        run_label(f"label rerun c={args.concurrency}", "label.sqlite")
        peak_rss = peak_memory_mib(server.process.pid)

    raw_rate = 2 * len(records) / (rows[0][1] + rows[2][1])
    print(f"\n{'run':<24}{'seconds':>8}{'prompt tok/s':>13}{'gen tok/s':>10}{'features/s':>11}{'vs raw':>7}"
          f"{'valid':>7}{'requests':>9}  notes")
    for name, seconds, prompt_tokens, tokens, valid, requests, note in rows:
        rate = len(records) / seconds
        if requests == 0:  # the warm-cache rerun: no server time to compare
            print(f"{name:<24}{seconds:>8.2f}{'-':>13}{'-':>10}{'-':>11}{'-':>7}{valid:>4}/{len(records):<2}"
                  f"{requests:>9}  {note}")
        else:
            print(f"{name:<24}{seconds:>8.1f}{prompt_tokens / seconds:>13.1f}{tokens / seconds:>10.1f}{rate:>11.3f}"
                  f"{rate / raw_rate:>6.2f}x{valid:>4}/{len(records):<2}{requests:>9}  {note}")
    spread = abs(rows[0][1] - rows[2][1]) / max(rows[0][1], rows[2][1])
    print(f"raw loops differ by {spread:.0%} (noise of the shared CPU); valid = parsed, matched the schema and "
          f"was not cut short by max_tokens ({settings.max_tokens})")
    print(f"server peak memory (VmHWM): {peak_rss:.0f} MiB")
    rerun = rows[-1][5]
    print(f"second run requests: {rerun} ({'OK' if rerun == 0 else 'FAIL'})")


if __name__ == "__main__":
    main()
