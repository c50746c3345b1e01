"""Start and supervise an OpenAI-compatible server: llama.cpp on CPU, vLLM on GPU.

    with start_server() as server:          # llama.cpp + SmolLM2-135M-Instruct, no download
        client = LLMClient(server.base_url, server.model, check_alive=server.check)

On CPU the server is llama.cpp's own C++ server from xllamacpp's prebuilt wheel (no compiler
step), run in a child process by autointerp.llm.llamacpp: parallel slots with continuous
batching, OpenAI's response_format json_schema, logprobs. The process's output goes to a log
file; if it dies, `check()` raises a UserError with the exit code and the last log lines
instead of a generic connection error.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import httpx
import typer

from autointerp import options as O
from autointerp.errors import UserError
from autointerp.lm.gguf import SHORT_NAMES, find_smollm2_gguf, gguf_path

ENGINES = ("llama-cpp", "vllm")
DEFAULT_MODEL_ALIAS = "smollm2-135m-instruct"


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_threads() -> int:
    """Threads that generate (one token at a time: small steps, a barrier per op): one core fewer
    than available, at least 1. On 2 cores a second generating thread gained ~15% with a core
    free, was 1.5x slower with both cores busy, and changed greedy answers (docs/label.md)."""
    return max(1, available_cores() - 1)


def default_batch_threads() -> int:
    """Threads that read the prompt (most of an explain request's work: big matrix products that
    split evenly; they leave the answers as they are): every core. With waiting threads asleep
    (OMP_WAIT_POLICY=PASSIVE, set for the server) 2 threads read a prompt 1.9x as fast as 1 with a
    core free and about as fast as 1 with both cores busy; spinning instead, they were 1.3x slower
    than 1 there (docs/label.md)."""
    return available_cores()


def server_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The llama.cpp server's environment: its threads wait asleep between ops
    (OMP_WAIT_POLICY=PASSIVE; xllamacpp's llama.cpp runs its threads with OpenMP, where
    llama.cpp's own --poll does not apply) unless the caller chose a policy."""
    env = dict(os.environ if environ is None else environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


def default_parallel() -> int:
    """Server slots. On <= 4 cores one slot: a 135M model already keeps them busy, and slots
    only split the same cores (measured: no gain on 2 cores); more on bigger machines."""
    cores = available_cores()
    return 1 if cores <= 4 else min(8, cores // 4)


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # as servers bind: a port whose last server just stopped (TIME_WAIT) is free, a listener is not
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def build_command(engine: str, model: str | None, host: str, port: int, n_threads: int | None = None,
                  n_ctx: int = 2048, extra_args: Sequence[str] = (), parallel: int | None = None,
                  n_threads_batch: int | None = None) -> tuple[list[str], str]:
    """The server's command line and the model name clients must send. n_ctx is per request
    (llama-cpp: per slot; vllm: --max-model-len); extra_args go to the server as is
    (llama-cpp: NAME=VALUE fields of xllamacpp's CommonParams, e.g. n_batch=256). llama-cpp
    threads: n_threads generate, n_threads_batch read prompts; unset, the defaults above, and a
    given n_threads alone caps both (the CPU budget the caller asked for)."""
    if engine == "llama-cpp":
        gguf = (gguf_path(model) if model in SHORT_NAMES else Path(model)) if model else find_smollm2_gguf()
        if not gguf.is_file():
            raise UserError(f"{gguf}: no such GGUF file")
        bad = [a for a in extra_args if "=" not in a or a.startswith("-")]
        if bad:
            raise UserError(f"--server-arg for llama-cpp takes NAME=VALUE (a field of xllamacpp's CommonParams, "
                            f"e.g. n_batch=256), got {' '.join(bad)}")
        # the smollm2-135m short name is the default file, so it keeps the default's name
        alias = (DEFAULT_MODEL_ALIAS if model in (None, "smollm2-135m") else model if model in SHORT_NAMES
                 else gguf.stem)
        threads = n_threads or default_threads()
        threads_batch = n_threads_batch or n_threads or default_batch_threads()
        cmd = [sys.executable, "-m", "autointerp.llm.llamacpp", "--model", str(gguf), "--alias", alias,
               "--host", host, "--port", str(port), "--threads", str(threads), "--threads-batch",
               str(threads_batch), "--parallel", str(parallel or default_parallel()), "--n-ctx", str(n_ctx),
               *extra_args]
        return cmd, alias
    if engine == "vllm":
        if n_threads_batch:
            raise UserError("--threads-batch applies to --engine llama-cpp")
        if parallel:
            raise UserError("--parallel applies to --engine llama-cpp (vLLM schedules its own batches)")
        if not model:
            raise UserError("--engine vllm needs --llm (a Hugging Face model id or local path)")
        exe = shutil.which("vllm")
        prefix = [exe] if exe else [sys.executable, "-m", "vllm.entrypoints.cli.main"]
        cmd = [*prefix, "serve", model, "--host", host, "--port", str(port), "--max-model-len", str(n_ctx),
               *extra_args]
        return cmd, _served_name(model, extra_args)
    raise UserError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")


def vllm_parallel_args(tensor_parallel: int | None = None, data_parallel: int | None = None) -> list[str]:
    """vLLM's own flags for spreading one model over several GPUs."""
    args: list[str] = []
    if tensor_parallel:
        args += ["--tensor-parallel-size", str(tensor_parallel)]
    if data_parallel:
        args += ["--data-parallel-size", str(data_parallel)]
    return args


def flag_value(cmd: Sequence[str], name: str) -> str | None:
    """The value after `name` in a command line (None when absent)."""
    args = list(cmd)
    return args[args.index(name) + 1] if name in args and args.index(name) + 1 < len(args) else None


def threads_summary(cmd: Sequence[str]) -> str:
    """How a llama-cpp command line uses threads, as logs and benchmarks print it."""
    return (f"{flag_value(cmd, '--threads')} thread(s) generating, {flag_value(cmd, '--threads-batch')} "
            f"reading prompts")


def _served_name(model: str, extra_args: Sequence[str]) -> str:
    args = list(extra_args)
    for i, arg in enumerate(args):
        if arg == "--served-model-name" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--served-model-name="):
            return arg.split("=", 1)[1]
    return model


@dataclass
class Server:
    base_url: str
    model: str
    engine: str
    process: subprocess.Popen
    log_path: Path
    command: list[str] = field(default_factory=list)

    def log_tail(self, lines: int = 8) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:] if line.strip())

    def check(self) -> None:
        """Raise a UserError naming the exit code and last log lines if the process has died."""
        code = self.process.poll()
        if code is not None:
            raise UserError(f"the {self.engine} server died (exit code {code}); last log lines: "
                            f"{self.log_tail() or '(empty log)'}; full log: {self.log_path}")

    def stop(self, grace: float = 10.0) -> None:
        if self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)  # its own process group: children too
        try:
            self.process.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def wait_until_ready(server: Server, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=2.0) as http:
        while time.monotonic() < deadline:
            server.check()
            try:
                if http.get(server.base_url + "/models").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
    server.stop()
    raise UserError(f"the {server.engine} server did not answer {server.base_url}/models within {timeout:.0f} s; "
                    f"last log lines: {server.log_tail() or '(empty log)'}")


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the parent dies (Linux), so a killed
    `autointerp` never leaves an orphaned server holding the port and the CPU."""
    with contextlib.suppress(Exception):
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@contextlib.contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so the server is stopped cleanly."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def start_server(engine: str = "llama-cpp", model: str | None = None, host: str = "127.0.0.1",
                 port: int | None = None, n_threads: int | None = None, n_ctx: int = 2048,
                 extra_args: Sequence[str] = (), startup_timeout: float | None = None,
                 log_path: str | Path | None = None, parallel: int | None = None,
                 n_threads_batch: int | None = None) -> Iterator[Server]:
    """Spawn the server, wait until /v1/models answers, yield it, stop it on exit."""
    if port is None:
        port = free_port(host)
    elif port_in_use(host, port):
        raise UserError(f"port {port} on {host} is already in use (another server?); choose another "
                        f"--port, or point --server at the server already there")
    if engine == "llama-cpp" and importlib.util.find_spec("xllamacpp") is None:
        raise UserError("xllamacpp is not installed (llama.cpp's server, a prebuilt wheel): "
                        "pip install xllamacpp, or pip install 'autointerp[cpu]'")
    cmd, served = build_command(engine, model, host, port, n_threads, n_ctx, extra_args, parallel, n_threads_batch)
    if log_path is None:
        fd, name = tempfile.mkstemp(prefix=f"autointerp-{engine}-", suffix=".log")
        os.close(fd)
        log_path = name
    log_path = Path(log_path)
    with open(log_path, "ab") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True,  # Ctrl-C reaches us only; we stop it cleanly
                                   preexec_fn=_die_with_parent, env=server_env())
    server = Server(base_url=f"http://{host}:{port}/v1", model=served, engine=engine, process=process,
                    log_path=log_path, command=cmd)
    try:
        with _sigterm_as_exit():
            wait_until_ready(server, startup_timeout or (120.0 if engine == "llama-cpp" else 900.0))
            yield server
    finally:
        server.stop()


def served_model(base_url: str, timeout: float = 10.0) -> str:
    """The first model a server lists at /v1/models."""
    try:
        response = httpx.get(base_url.rstrip("/") + "/models", timeout=timeout)
        response.raise_for_status()
        return response.json()["data"][0]["id"]
    except (httpx.HTTPError, ValueError, KeyError, IndexError) as exc:
        raise UserError(f"could not list models at {base_url}/models ({type(exc).__name__}: {exc}); "
                        "is the server up? pass --llm to skip this check") from None


@contextlib.contextmanager
def endpoint(base_url: str | None, model: str | None, engine: str | None, threads: int | None,
             n_ctx: int, needed: bool = True, parallel: int | None = None, threads_batch: int | None = None
             ) -> Iterator[tuple[str, str, str, Callable[[], None] | None]]:
    """(base URL, model, engine, liveness check) of the server to use: the one at base_url, else
    an embedded one started here. Both engines take OpenAI's response_format json_schema."""
    if not needed:  # everything is on disk already: start nothing, contact nothing
        yield base_url or "(no server: nothing to send)", model or "(unused)", engine or "llama-cpp", None
        return
    if base_url:
        yield base_url, model or served_model(base_url), engine or "openai-compatible", None
        return
    engine = engine or "llama-cpp"
    with start_server(engine, model, n_threads=threads, n_ctx=n_ctx, parallel=parallel,
                      n_threads_batch=threads_batch) as server:
        yield server.base_url, server.model, engine, server.check


def cli(
    engine: str = O.engine_option("llama-cpp"),
    llm: str = O.llm_option(),
    host: str = typer.Option("127.0.0.1", help="Interface to listen on."),
    port: int = typer.Option(8080, help="Port to listen on; refused when already in use."),
    threads: int = typer.Option(None, help="llama-cpp: CPU threads that generate (default: the cores available "
                                           "minus one, at least 1); alone it also caps --threads-batch."),
    threads_batch: int = typer.Option(None, "--threads-batch",
                                      help="llama-cpp: CPU threads that read prompts, most of the work (default: "
                                           "--threads if given, else every core available)."),
    parallel: int = typer.Option(None, help="llama-cpp: slots, requests decoded together (default: 1 on <= 4 "
                                            "cores, else cores/4, at most 8)."),
    n_ctx: int = O.n_ctx_option(),
    tensor_parallel_size: int = typer.Option(None, help="vllm: GPUs to split each model over."),
    data_parallel_size: int = typer.Option(None, help="vllm: model replicas."),
    server_arg: list[str] = typer.Option([], "--server-arg",
                                         help="Extra server argument (repeatable): vllm's own flags as is; for "
                                              "llama-cpp NAME=VALUE, a field of xllamacpp's CommonParams "
                                              "(e.g. n_batch=256)."),
) -> None:
    """Start an OpenAI-compatible server, print its base URL, and run until Ctrl-C."""
    extra = list(server_arg)
    if engine == "vllm":
        extra = vllm_parallel_args(tensor_parallel_size, data_parallel_size) + extra
    elif tensor_parallel_size or data_parallel_size:
        raise UserError("--tensor-parallel-size / --data-parallel-size apply to --engine vllm only")
    for name, value in (("--threads", threads), ("--threads-batch", threads_batch), ("--parallel", parallel),
                        ("--n-ctx", n_ctx)):
        if value is not None and value < 1:
            raise UserError(f"{name} must be >= 1, got {value}")
    print(f"starting {engine} server on {host}:{port} ...", flush=True)
    with start_server(engine, llm, host, port, threads, n_ctx, extra, parallel=parallel,
                      n_threads_batch=threads_batch) as server:
        if engine == "llama-cpp":
            print(f"llama.cpp (xllamacpp): {flag_value(server.command, '--parallel')} slot(s) x "
                  f"{flag_value(server.command, '--n-ctx')} tokens, {threads_summary(server.command)}", flush=True)
        print(f"serving {server.model} at {server.base_url}  (log: {server.log_path})", flush=True)
        print(f"use: autointerp label RUN_DIR --server {server.base_url} --llm {server.model} --engine {server.engine}",
              flush=True)
        try:
            while True:
                server.check()
                time.sleep(1.0)
        except KeyboardInterrupt:
            print("stopping server", flush=True)
