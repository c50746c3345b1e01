"""One-off: the embedded server before (llama-cpp-python's Python server) and now (llama.cpp's
C++ server via xllamacpp), on the same explain prompts, alternating so both see the same load.

    python3 -m venv /tmp/venv-lcp
    CMAKE_ARGS=-DGGML_NATIVE=OFF nice /tmp/venv-lcp/bin/pip install 'llama-cpp-python[server]'  # ~5 min
    .venv/bin/python evals/compare_llama_cpp_python.py --old-python /tmp/venv-lcp/bin/python

llama-cpp-python is not a dependency any more (it compiles for minutes); this script is how the
README's "before" number was measured. Each round sends the label stage's explain requests for
--features features to each server with --concurrency in flight, as `label` does, in --form:
"chat" (a JSON answer: the old server in the only JSON form it takes, json_object + schema, the
new one in OpenAI's json_schema form) or "completion" (label's default request today: the
few-shot prompt as a plain completion, one line, the same request to both servers); max_tokens
as explain sends them. Each server is started as `label` started it: the old one as autointerp
ran it (n_threads and n_threads_batch = cores - 1, 1 on 2 cores; n_ctx 2048), the new one with
today's defaults (autointerp.llm.serve: threads, prompt-reading threads, slots, OMP_WAIT_POLICY;
n_ctx 2048). An invalid answer is re-asked once, sampled, as explain does. Prints explained
features/s (features with a valid answer in the end, per second), generated tokens/s, valid
complete answers (first, and in the end) and the server's CPU seconds per round, the new/old
ratio of each round, and the load average before and after.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai

from autointerp.interp.explainer import (ANSWER_SCHEMA as EXPLANATION_SCHEMA, FORMS, ExplainSettings, answer_problem,
                                clean_answer, fit_prompt)
from autointerp.llm.client import ChatResult, LLMClient, check_answer, json_response_format
from autointerp.llm.serve import (DEFAULT_MODEL_ALIAS, Server, available_cores, find_smollm2_gguf, flag_value,
                              free_port, start_server, threads_summary, wait_until_ready)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_label import DEV, load  # noqa: E402


def start_old(python: str, threads: int, n_ctx: int, log: Path) -> Server:
    """llama-cpp-python's server, with the command line autointerp used to build for it."""
    port = free_port()
    cmd = [python, "-m", "llama_cpp.server", "--model", str(find_smollm2_gguf()), "--model_alias",
           DEFAULT_MODEL_ALIAS, "--host", "127.0.0.1", "--port", str(port), "--n_threads", str(threads),
           "--n_threads_batch", str(threads), "--n_ctx", str(n_ctx)]
    with open(log, "ab") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    server = Server(f"http://127.0.0.1:{port}/v1", DEFAULT_MODEL_ALIAS, "llama-cpp-python", process, log, cmd)
    wait_until_ready(server, 300)
    return server


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one_pass(base_url: str, prompts: list[str], response_format: dict | None, concurrency: int,
             max_tokens: int, sampling: dict | None = None) -> tuple[float, int, int, int, int]:
    """(wall seconds, prompt tokens, generated tokens, valid complete first answers, features with a
    valid answer in the end) for all prompts, `concurrency` in flight, as explain asks: greedy, and
    an invalid answer re-asked once, sampled. Requests are chat answered in response_format, or
    (None) the explainer's plain completions, one line each, valid as explain judges them, with
    `sampling` (ExplainSettings.sampling_extra) as extra fields."""
    client = openai.OpenAI(base_url=base_url, api_key="none", timeout=900, max_retries=0)

    def ask(prompt: str, temperature: float) -> tuple[int, int, bool]:
        if response_format is None:  # what `label` sends by default (ExplainSettings.form "completion")
            response = client.completions.create(model=DEFAULT_MODEL_ALIAS, prompt=prompt, max_tokens=max_tokens,
                                                 temperature=temperature, seed=0, stop=["\n"],
                                                 extra_body=sampling)
            text, finish = response.choices[0].text or "", response.choices[0].finish_reason
            valid = answer_problem(clean_answer(text), finish == "length" and "\n" not in text) is None
        else:
            response = client.chat.completions.create(
                model=DEFAULT_MODEL_ALIAS, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
                temperature=temperature, seed=0, response_format=response_format)
            choice = response.choices[0]
            answer = ChatResult(text=choice.message.content or "", finish_reason=choice.finish_reason)
            valid = check_answer(answer, EXPLANATION_SCHEMA)[1] is None
        return response.usage.prompt_tokens, response.usage.completion_tokens, valid

    def explain(prompt: str) -> tuple[int, int, bool, bool]:
        prompt_tokens, tokens, first_valid = ask(prompt, 0.0)
        if first_valid:
            return prompt_tokens, tokens, True, True
        more_prompt, more, valid = ask(prompt, 0.7)  # explain's one sampled re-ask
        return prompt_tokens + more_prompt, tokens + more, False, valid

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        answers = list(pool.map(explain, prompts))
    return (time.perf_counter() - started, *(sum(column) for column in zip(*answers)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old-python", required=True, help="a python with llama-cpp-python[server] installed")
    parser.add_argument("--features", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight (label's default)")
    parser.add_argument("--form", choices=FORMS, default="chat",
                        help="the explain request: chat (a JSON answer; the form the issue's target was first "
                             "measured in) or completion (what label sends by default today)")
    parser.add_argument("--old-threads", type=int, default=None,
                        help="the old server's threads (default: as autointerp started it, cores - 1, at least 1)")
    args = parser.parse_args()
    if not DEV.exists():
        sys.exit(f"dev data not found at {DEV}")
    threads = args.old_threads or max(1, available_cores() - 1)
    records = load(args.features)
    settings = ExplainSettings(context_window=2048, engine="llama-cpp", form=args.form)
    max_tokens = settings.request_max_tokens  # as explain sends them in this form
    if args.form == "chat":
        schema_form: dict | None = json_response_format(EXPLANATION_SCHEMA, "explanation")
        object_form: dict | None = {"type": "json_object", "schema": EXPLANATION_SCHEMA}  # llama-cpp-python's form
    else:
        schema_form = object_form = None
    with tempfile.TemporaryDirectory() as tmp, start_server("llama-cpp", n_ctx=2048) as new:
        old = start_old(args.old_python, threads, 2048, Path(tmp) / "old.log")
        try:
            prompter = LLMClient(new.base_url, new.model, cache_path=Path(tmp) / "p.sqlite")

            async def all_prompts() -> list[str]:
                return [(await fit_prompt(r, prompter, settings.prompt_budget, settings.n_contexts,
                                          settings.window)).text for r in records]

            prompts = prompter.run(all_prompts())
            print(f"{len(prompts)} features, {args.form} requests, concurrency {args.concurrency}, "
                  f"max_tokens {max_tokens}; "
                  f"llama-cpp-python {threads} thread(s); xllamacpp {threads_summary(new.command)}, "
                  f"{flag_value(new.command, '--parallel')} slot(s); load average {load_average()}", flush=True)
            for url, form in ((old.base_url, object_form), (new.base_url, schema_form)):  # warm both up
                one_pass(url, prompts[:1], form, 1, 8)
            ratios, cpu_ratios = [], []
            print(f"{'round':<6}{'server':<20}{'seconds':>8}{'features/s':>11}{'prompt tok/s':>13}{'gen tok/s':>10}"
                  f"{'valid first':>12}{'in end':>7}{'server CPU s':>13}{'features/CPU s':>15}{'load 1 min':>11}")
            for r in range(args.rounds):
                order = [("llama-cpp-python", old.base_url, object_form), ("xllamacpp", new.base_url, schema_form)]
                if r % 2:  # alternate who goes first
                    order.reverse()
                rates, cpu_rates = {}, {}
                for name, url, form in order:
                    pid = (old if name == "llama-cpp-python" else new).process.pid
                    cpu_before = cpu_seconds(pid)
                    seconds, prompt_tokens, tokens, first_valid, valid = one_pass(
                        url, prompts, form, args.concurrency, max_tokens, settings.sampling_extra())
                    cpu = cpu_seconds(pid) - cpu_before
                    rates[name], cpu_rates[name] = valid / seconds, valid / cpu
                    print(f"{r + 1:<6}{name:<20}{seconds:>8.1f}{rates[name]:>11.3f}{prompt_tokens / seconds:>13.1f}"
                          f"{tokens / seconds:>10.1f}{f'{first_valid}/{len(prompts)}':>12}{f'{valid}/{len(prompts)}':>7}"
                          f"{cpu:>13.1f}{cpu_rates[name]:>15.3f}{os.getloadavg()[0]:>11.2f}", flush=True)
                ratios.append(rates["xllamacpp"] / rates["llama-cpp-python"])
                cpu_ratios.append(cpu_rates["xllamacpp"] / cpu_rates["llama-cpp-python"])
            print(f"explained features/s (a valid answer in the end), xllamacpp / llama-cpp-python per round: "
                  f"{', '.join(f'{x:.2f}x' for x in ratios)}; median {statistics.median(ratios):.2f}x (target >= 1.3x)")
            print(f"explained features per server CPU second, same ratio: "
                  f"{', '.join(f'{x:.2f}x' for x in cpu_ratios)}; median {statistics.median(cpu_ratios):.2f}x "
                  "(less sensitive to other jobs on the machine)")
            print(f"load average at the end: {load_average()} (1, 5, 15 min; {available_cores()} cores)")
        finally:
            old.stop()


if __name__ == "__main__":
    main()
