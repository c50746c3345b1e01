"""Run llama.cpp's own C++ server (through xllamacpp's prebuilt wheel) in this process until
SIGTERM or Ctrl-C. `autointerp serve` starts it as a supervised subprocess, so a crash of the
native server shows as an exit code and a log tail instead of a dead thread:

    python -m autointerp.llm.llamacpp --model M.gguf --alias smollm2 --port 8080 \
        --threads 1 --threads-batch 2 --parallel 2 --n-ctx 2048 [NAME=VALUE ...]

NAME=VALUE sets any other field of xllamacpp's CommonParams (e.g. n_batch=256,
cpuparams.poll=0, cache_prompt=false); the server's own log goes to stderr.
"""

from __future__ import annotations

import argparse
import enum
import os
import signal
import sys
from typing import Any


def set_param(params: Any, assignment: str) -> None:
    """Apply one NAME=VALUE to CommonParams, converting VALUE to the field's current type."""
    name, sep, text = assignment.partition("=")
    if not sep:
        raise ValueError(f"server argument {assignment!r} is not NAME=VALUE")
    *path, field = name.split(".")
    target = params
    for part in path:
        target = getattr(target, part)
    if not hasattr(target, field):
        raise ValueError(f"xllamacpp's CommonParams has no field {name!r}")
    current = getattr(target, field)
    if isinstance(current, bool):
        value: Any = text.lower() in ("1", "true", "yes", "on")
    elif isinstance(current, enum.Enum):  # by member name or number, e.g. flash_attn_type=0
        kind = type(current)
        try:
            value = kind(int(text)) if text.lstrip("-").isdigit() else kind[text.upper()]
        except (KeyError, ValueError):
            raise ValueError(f"{name!r} takes one of {', '.join(m.name for m in kind)} (or its number), "
                             f"got {text!r}") from None
    elif isinstance(current, int):
        value = int(text)
    elif isinstance(current, float):
        value = float(text)
    elif isinstance(current, str):
        value = text
    else:
        raise ValueError(f"{name!r} ({type(current).__name__}) cannot be set from the command line")
    setattr(target, field, value)


def build_params(args: argparse.Namespace) -> Any:
    import xllamacpp

    params = xllamacpp.CommonParams()
    params.model.path = args.model
    params.model_alias = {args.alias}  # a set of names; a plain str would become a set of letters
    params.hostnames = [args.host]
    params.port = args.port
    params.cpuparams.n_threads = args.threads
    params.cpuparams_batch.n_threads = args.threads_batch or args.threads
    params.n_parallel = args.parallel
    params.n_ctx = args.n_ctx * args.parallel  # llama.cpp's n_ctx is the total over all slots
    params.ui = False  # no web UI assets in the wheel; an API server only
    params.offline = True  # never reach for the network
    # No host-RAM prompt cache (default 8 GiB): autointerp never sends a prompt twice (its response
    # cache answers repeats), so over a long run it would only grow; each slot still reuses the
    # prefix it holds.
    params.cache_ram_mib = 0
    params.cache_idle_slots = False  # needs the RAM cache
    for assignment in args.set:
        set_param(params, assignment)
    return params


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="GGUF file")
    parser.add_argument("--alias", required=True, help="model name clients send and /v1/models lists")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--threads", type=int, required=True, help="threads that generate")
    parser.add_argument("--threads-batch", type=int, default=None, help="threads that read prompts (default: --threads)")
    parser.add_argument("--parallel", type=int, default=1, help="slots: requests decoded together")
    parser.add_argument("--n-ctx", type=int, default=2048, help="context tokens per slot")
    parser.add_argument("set", nargs="*", metavar="NAME=VALUE", help="other CommonParams fields")
    args = parser.parse_args(argv)
    try:
        import xllamacpp
    except ImportError:
        print("error: xllamacpp is not installed: pip install xllamacpp (or 'autointerp[cpu]')",
              file=sys.stderr, flush=True)
        return 2
    # SIGTERM/SIGINT are waited for below, not delivered as exceptions into C++ threads.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    try:
        params = build_params(args)
        server = xllamacpp.Server(params)  # loads the model, then serves HTTP on its own threads
    except (ValueError, AttributeError, RuntimeError) as exc:
        print(f"error: {type(exc).__name__}: {exc} (model {args.model})", file=sys.stderr, flush=True)
        return 1
    print(f"autointerp: llama.cpp server (xllamacpp {xllamacpp.__version__}) at {server.listening_address}, "
          f"{args.parallel} slot(s) x {args.n_ctx} tokens, {args.threads} thread(s) generating, "
          f"{params.cpuparams_batch.n_threads} reading prompts; OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '')}",
          file=sys.stderr, flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    sys.stderr.flush()
    os._exit(0)  # skip the native server's teardown: the process is going away anyway


if __name__ == "__main__":
    sys.exit(main())
