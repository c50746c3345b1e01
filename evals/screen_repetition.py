"""One-off: llama.cpp repetition controls on the explainer's greedy completion requests.

    .venv/bin/python evals/screen_repetition.py --features 120 none dry repeat4 both
    .venv/bin/python evals/screen_repetition.py --features 120 --old-python /tmp/venv-lcp/bin/python none

A seeded sample of live dev features, the explain prompt as `label` builds it, one greedy answer
each (no re-ask, no cache) per named variant. Prints the invalid answers (empty, or a line cut
by max_tokens: a loop or an endless list) and, among the features the calibrated decision calls
token-level, the share whose description quotes a top-3 max token (eval_explain's measure).
With --old-python the server is llama-cpp-python's (its defaults, as compare_llama_cpp_python
starts it; it ignores llama.cpp's fields). The README's 120-feature table came from here.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
import time
from pathlib import Path

from autointerp.labels import decision as granularity
from autointerp.labels import sampling
from autointerp.interp.explainer import ExplainSettings, answer_problem, clean_answer, fit_prompt
from autointerp.llm.client import LLMClient
from autointerp.records.read import read_records
from autointerp.llm.serve import endpoint

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_explain import DEV, quotes_top_token  # noqa: E402

DRY = {"dry_multiplier": 0.8, "dry_allowed_length": 4, "dry_penalty_last_n": 2048, "dry_sequence_breakers": ["\n"]}
VARIANTS = {
    "none": {},
    "freq8": {"frequency_penalty": 0.5, "repeat_last_n": 8},
    "dry": DRY,
    "repeat4": {"repeat_penalty": 1.1, "repeat_last_n": 4},
    "both": ExplainSettings(engine="llama-cpp").sampling_extra(),  # what label sends
}


@contextlib.contextmanager
def server(old_python: str | None):
    if old_python is None:
        with endpoint(None, None, None, None, 2048) as (url, model, _, _):
            yield url, model
        return
    from compare_llama_cpp_python import start_old
    with tempfile.TemporaryDirectory() as tmp:
        old = start_old(old_python, 1, 2048, Path(tmp) / "old.log")
        try:
            yield old.base_url, old.model
        finally:
            old.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("variants", nargs="+", choices=list(VARIANTS))
    ap.add_argument("--features", type=int, default=120)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--old-python", default=None, help="a python with llama-cpp-python[server]")
    args = ap.parse_args()
    records = sampling.sample_live(read_records(DEV), args.features, args.seed)
    models = granularity.load_models()
    token_level = [granularity.decide(r, models=models)[0] == "token" for r in records]
    settings = ExplainSettings(engine="llama-cpp")
    with server(args.old_python) as (url, model):
        client = LLMClient(url, model, concurrency=2, timeout=600, seed=0)

        async def prompts() -> list[str]:
            return [(await fit_prompt(r, client, settings.prompt_budget)).text for r in records]

        async def answers(extra: dict) -> list[tuple[str, str | None]]:
            async def one(prompt: str) -> tuple[str, str | None]:
                result = await client.complete(prompt, max_tokens=settings.max_tokens, temperature=0.0, stop=["\n"],
                                               extra_body=extra or None)
                text = clean_answer(result.text)
                return text, answer_problem(text, result.truncated and "\n" not in result.text)
            return list(await asyncio.gather(*(one(p) for p in texts)))

        texts = client.run(prompts())
        for name in args.variants:
            started = time.perf_counter()
            got = client.run(answers(VARIANTS[name]))
            invalid = sum(problem is not None for _, problem in got)
            pairs = [(r, text) for r, (text, _), t in zip(records, got, token_level) if t]
            quoted = sum(quotes_top_token(text, r) for r, text in pairs)
            print(f"{name:<8} {time.perf_counter() - started:6.1f} s  invalid {invalid}/{len(got)}  "
                  f"token-level quoting {quoted}/{len(pairs)} = {quoted / max(len(pairs), 1):.0%}", flush=True)


if __name__ == "__main__":
    main()
