"""Start and supervise an OpenAI-compatible server: llama.cpp's or vLLM's.

    with start_server() as server:          # llama.cpp + SmolLM2-135M-Instruct, no download
        client = LLMClient(server.base_url, server.model, check_alive=server.check)
    with start_server("vllm") as server:    # vLLM (CPU or GPU) + the same SmolLM2

llama.cpp is its own C++ server from xllamacpp's prebuilt wheel (no compiler step), run in a
child process by autointerp.llm.llamacpp: parallel slots with continuous batching, OpenAI's
response_format json_schema, logprobs. vLLM is its OpenAI server from a venv of its own
(autointerp.llm.vllm: where it is, its command line, its CPU settings). Either process's output
goes to a log file; if it dies, `check()` raises a UserError with the exit code and the last log
lines instead of a generic connection error.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import httpx
import typer

from autointerp import options as O
from autointerp.errors import UserError
from autointerp.llm import vllm as vllm_lib
from autointerp.llm.vllm import VLLMConfig
from autointerp.lm.gguf import SHORT_NAMES, find_smollm2_gguf, gguf_path, resolve_lm

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


DEFAULT_N_CTX = 2048  # llama-cpp: context tokens per slot


def default_n_ctx(engine: str | None) -> int:
    """Context tokens per request when --n-ctx is not given: llama.cpp's per slot, vLLM's
    --max-model-len (VLLMConfig's)."""
    return VLLMConfig.max_model_len if engine == "vllm" else DEFAULT_N_CTX


def build_command(engine: str, model: str | None, host: str, port: int, n_threads: int | None = None,
                  n_ctx: int | None = None, extra_args: Sequence[str] = (), parallel: int | None = None,
                  n_threads_batch: int | None = None, vllm: VLLMConfig | None = None) -> tuple[list[str], str]:
    """The server's command line and the model name clients must send. n_ctx is per request
    (llama-cpp: per slot; vllm: --max-model-len), default_n_ctx(engine) when None; extra_args go
    to the server as is (llama-cpp: NAME=VALUE fields of xllamacpp's CommonParams, e.g.
    n_batch=256). llama-cpp threads: n_threads generate, n_threads_batch read prompts; unset, the
    defaults above, and a given n_threads alone caps both (the CPU budget the caller asked for).
    vllm: the rest of its settings in `vllm` (model, n_ctx and extra_args, when given, override
    its fields)."""
    if engine == "llama-cpp":
        n_ctx = n_ctx or DEFAULT_N_CTX
        gguf = (gguf_path(model) if model in SHORT_NAMES else Path(model)) if model else find_smollm2_gguf()
        if not gguf.is_file():
            raise UserError(f"{gguf}: no such GGUF file")
        bad = [a for a in extra_args if "=" not in a or a.startswith("-")]
        if bad:
            raise UserError(f"--server-arg for llama-cpp takes NAME=VALUE (a field of xllamacpp's CommonParams, "
                            f"e.g. n_batch=256), got {' '.join(bad)}")
        alias = served_alias(model, gguf)
        threads = n_threads or default_threads()
        threads_batch = n_threads_batch or n_threads or default_batch_threads()
        cmd = [sys.executable, "-m", "autointerp.llm.llamacpp", "--model", str(gguf), "--alias", alias,
               "--host", host, "--port", str(port), "--threads", str(threads), "--threads-batch",
               str(threads_batch), "--parallel", str(parallel or default_parallel()), "--n-ctx", str(n_ctx),
               *extra_args]
        return cmd, alias
    if engine == "vllm":
        if n_threads or n_threads_batch:
            raise UserError("--threads / --threads-batch apply to --engine llama-cpp (vLLM on a CPU uses every "
                            "core but one)")
        if parallel:
            raise UserError("--parallel applies to --engine llama-cpp (vLLM schedules its own batches)")
        config = vllm_config(vllm, model, n_ctx, extra_args)
        installation = vllm_lib.find_installation(config.python)
        return vllm_lib.command(config, installation, host, port, *vllm_source(config.model))
    raise UserError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")


def served_alias(model: str | None, gguf: Path) -> str:
    """The name a GGUF is served as, by either engine: the default SmolLM2 (no --llm, or its
    short name) keeps the embedded server's name, another short name is its own name, a file its
    stem."""
    if model in (None, "smollm2-135m"):
        return DEFAULT_MODEL_ALIAS
    return model if model in SHORT_NAMES else gguf.stem


def vllm_source(model: str) -> tuple[str, str | None]:
    """(what vLLM loads, the name to serve it as; None: vLLM's, the name as given). A GGUF or a
    short name is converted once into a Hugging Face folder (a minute, the first time)."""
    gguf = gguf_path(model)
    if gguf is None:
        return model, None
    return resolve_lm(model), served_alias(model, gguf)


def vllm_config(config: VLLMConfig | None, model: str | None, n_ctx: int | None,
                extra_args: Sequence[str]) -> VLLMConfig:
    """`config` (default VLLMConfig()) with the settings every engine takes, where given."""
    config = config or VLLMConfig()
    changes: dict = {}
    if model:
        changes["model"] = model
    if n_ctx:
        changes["max_model_len"] = n_ctx
    if extra_args:
        changes["extra_args"] = tuple(config.extra_args) + tuple(extra_args)
    return replace(config, **changes)


def flag_value(cmd: Sequence[str], name: str) -> str | None:
    """The value after `name` in a command line (None when absent)."""
    args = list(cmd)
    return args[args.index(name) + 1] if name in args and args.index(name) + 1 < len(args) else None


def threads_summary(cmd: Sequence[str]) -> str:
    """How a llama-cpp command line uses threads, as logs and benchmarks print it."""
    return (f"{flag_value(cmd, '--threads')} thread(s) generating, {flag_value(cmd, '--threads-batch')} "
            f"reading prompts")


@dataclass
class Server:
    base_url: str
    model: str
    engine: str
    process: subprocess.Popen
    log_path: Path
    command: list[str] = field(default_factory=list)
    startup_seconds: float | None = None  # from the start to /v1/models answering

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
        """Stop the server's process group (its own session: vLLM's engine processes too), and
        sweep what is left of it when the server itself is already gone: a killed vLLM server
        leaves its engine core and worker running."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


def startup_phase(engine: str, log_text: str) -> str:
    """How far a server's start has got, from its log so far."""
    return vllm_lib.phase(log_text) if engine == "vllm" else "loading the model"


def print_progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def wait_until_ready(server: Server, timeout: float, progress: Callable[[str], None] | None = None) -> None:
    """Poll /v1/models until it answers; on the way, `progress` gets a line at each start-up
    phase (vLLM on a CPU takes minutes) and one when the server is ready."""
    started = time.monotonic()
    deadline = started + timeout
    shown = None
    with httpx.Client(timeout=2.0) as http:
        while time.monotonic() < deadline:
            server.check()
            try:
                if http.get(server.base_url + "/models").status_code == 200:
                    server.startup_seconds = time.monotonic() - started
                    if progress:
                        progress(f"{server.engine}: ready in {server.startup_seconds:.0f} s")
                    return
            except httpx.HTTPError:
                pass
            if progress:
                with contextlib.suppress(OSError):
                    now = startup_phase(server.engine, server.log_path.read_text(errors="replace"))
                    if now != shown:
                        progress(f"{server.engine}: {now} ({time.monotonic() - started:.0f} s)")
                        shown = now
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
                 port: int | None = None, n_threads: int | None = None, n_ctx: int | None = None,
                 extra_args: Sequence[str] = (), startup_timeout: float | None = None,
                 log_path: str | Path | None = None, parallel: int | None = None,
                 n_threads_batch: int | None = None, vllm: VLLMConfig | None = None,
                 progress: Callable[[str], None] | None = None) -> Iterator[Server]:
    """Spawn the server, wait until /v1/models answers (`progress` gets a line per start-up
    phase), yield it, stop it on exit. vllm: the rest of vLLM's settings (model, n_ctx and
    extra_args, when given, override its fields)."""
    if port is None:
        port = free_port(host)
    elif port_in_use(host, port):
        raise UserError(f"port {port} on {host} is already in use (another server?); choose another "
                        f"--port, or point --server at the server already there")
    env = server_env()
    if engine == "llama-cpp" and importlib.util.find_spec("xllamacpp") is None:
        raise UserError("xllamacpp is not installed (llama.cpp's server, a prebuilt wheel): "
                        "pip install xllamacpp, or pip install 'autointerp[cpu]'")
    if engine == "vllm":
        vllm = vllm_config(vllm, model, n_ctx, extra_args)
        cmd, served = build_command(engine, None, host, port, parallel=parallel, n_threads=n_threads,
                                    n_threads_batch=n_threads_batch, vllm=vllm)
        env = vllm_lib.environment(vllm, vllm_lib.find_installation(vllm.python), env)
        startup_timeout = startup_timeout or vllm.startup_timeout
    else:
        cmd, served = build_command(engine, model, host, port, n_threads, n_ctx, extra_args, parallel,
                                    n_threads_batch)
    if log_path is None:
        fd, name = tempfile.mkstemp(prefix=f"autointerp-{engine}-", suffix=".log")
        os.close(fd)
        log_path = name
    log_path = Path(log_path)
    with open(log_path, "ab") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True,  # Ctrl-C reaches us only; we stop it cleanly
                                   preexec_fn=_die_with_parent, env=env)
    server = Server(base_url=f"http://{host}:{port}/v1", model=served, engine=engine, process=process,
                    log_path=log_path, command=cmd)
    try:
        with _sigterm_as_exit():
            wait_until_ready(server, startup_timeout or 120.0, progress)
            yield server
    finally:
        server.stop()


@dataclass(frozen=True)
class ServedModel:
    """A model a server lists at /v1/models."""

    id: str
    max_model_len: int | None = None  # tokens per request, where the server says (vLLM does)


def list_models(base_url: str, timeout: float = 10.0) -> list[ServedModel]:
    """The models a server lists at /v1/models (httpx errors and ValueError for a bad answer)."""
    response = httpx.get(base_url.rstrip("/") + "/models", timeout=timeout)
    response.raise_for_status()
    data = response.json().get("data")
    if not isinstance(data, list):
        raise ValueError(f"no model list in {response.text[:80]!r}")
    return [ServedModel(str(m["id"]), m.get("max_model_len") if isinstance(m.get("max_model_len"), int) else None)
            for m in data]


def server_context(base_url: str, models: Sequence[ServedModel], model: str | None = None,
                   timeout: float = 5.0) -> int | None:
    """Tokens per request the server allows for `model` (default: the first listed): vLLM's
    max_model_len in /v1/models, else llama.cpp's per-slot n_ctx in /props; None when neither says."""
    chosen = next((m for m in models if m.id == model), models[0] if models else None)
    if chosen is not None and chosen.max_model_len:
        return chosen.max_model_len
    from autointerp.llm.client import server_root

    try:
        props = httpx.get(server_root(base_url) + "/props", timeout=timeout).json()
        n_ctx = props["default_generation_settings"]["n_ctx"]
        return n_ctx if isinstance(n_ctx, int) and n_ctx > 0 else None
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return None


def served_model(base_url: str, timeout: float = 10.0) -> str:
    """The first model a server lists at /v1/models."""
    try:
        return list_models(base_url, timeout)[0].id
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise UserError(f"could not list models at {base_url}/models ({type(exc).__name__}: {exc}); "
                        "is the server up? pass --llm to skip this check") from None


@contextlib.contextmanager
def endpoint(base_url: str | None, model: str | None, engine: str | None, threads: int | None,
             n_ctx: int | None, needed: bool = True, parallel: int | None = None, threads_batch: int | None = None,
             vllm: VLLMConfig | None = None) -> Iterator[tuple[str, str, str, Callable[[], None] | None]]:
    """(base URL, model, engine, liveness check) of the server to use: the one at base_url, else
    an embedded one started here (its start-up phases printed). Both engines take OpenAI's
    response_format json_schema."""
    if not needed:  # everything is on disk already: start nothing, contact nothing
        yield base_url or "(no server: nothing to send)", model or "(unused)", engine or "llama-cpp", None
        return
    if base_url:
        yield base_url, model or served_model(base_url), engine or "openai-compatible", None
        return
    engine = engine or "llama-cpp"
    with start_server(engine, model, n_threads=threads, n_ctx=n_ctx, parallel=parallel, n_threads_batch=threads_batch,
                      vllm=vllm, progress=print_progress if engine == "vllm" else None) as server:
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
    vllm_python: str = O.vllm_python_option(),
    dtype: str = typer.Option(None, help="vllm: weights' dtype (default: bfloat16 without a GPU, vLLM's auto with "
                                         "one)."),
    kv_cache_gib: int = typer.Option(VLLMConfig.kv_cache_gib, "--kv-cache-gib", min=1,
                                     help="vllm without a GPU: KV-cache memory in GiB (VLLM_CPU_KVCACHE_SPACE)."),
    tensor_parallel_size: int = typer.Option(None, help="vllm: GPUs to split each model over."),
    data_parallel_size: int = typer.Option(None, help="vllm: model replicas."),
    server_arg: list[str] = typer.Option([], "--server-arg",
                                         help="Extra server argument (repeatable): vllm's own flags as is; for "
                                              "llama-cpp NAME=VALUE, a field of xllamacpp's CommonParams "
                                              "(e.g. n_batch=256)."),
) -> None:
    """Start an OpenAI-compatible server, print its base URL, and run until Ctrl-C."""
    config = None
    if engine == "vllm":
        config = VLLMConfig(python=vllm_python, dtype=dtype, kv_cache_gib=kv_cache_gib,
                            tensor_parallel_size=tensor_parallel_size, data_parallel_size=data_parallel_size)
    elif tensor_parallel_size or data_parallel_size or vllm_python or dtype:
        raise UserError("--tensor-parallel-size, --data-parallel-size, --vllm-python and --dtype apply to "
                        "--engine vllm only")
    for name, value in (("--threads", threads), ("--threads-batch", threads_batch), ("--parallel", parallel),
                        ("--n-ctx", n_ctx)):
        if value is not None and value < 1:
            raise UserError(f"{name} must be >= 1, got {value}")
    print(f"starting {engine} server on {host}:{port} ...", flush=True)
    with start_server(engine, llm, host, port, threads, n_ctx, server_arg, parallel=parallel,
                      n_threads_batch=threads_batch, vllm=config,
                      progress=print_progress if engine == "vllm" else None) as server:  # llama.cpp: ~1 s
        if engine == "llama-cpp":
            print(f"llama.cpp (xllamacpp): {flag_value(server.command, '--parallel')} slot(s) x "
                  f"{flag_value(server.command, '--n-ctx')} tokens, {threads_summary(server.command)}", flush=True)
        else:
            found = vllm_lib.find_installation(config.python)
            print(f"vLLM {found.version} ({'vllm-cpu, ' + str(config.kv_cache_gib) + ' GiB KV cache' if found.cpu else 'GPU'}"
                  f", {found.python}): {flag_value(server.command, '--max-model-len')} tokens per request, dtype "
                  f"{flag_value(server.command, '--dtype') or 'auto'}", flush=True)
        print(f"serving {server.model} at {server.base_url}  (log: {server.log_path})", flush=True)
        print(f"use: autointerp label RUN_DIR --server {server.base_url} --llm {server.model} --engine {server.engine}",
              flush=True)
        try:
            while True:
                server.check()
                time.sleep(1.0)
        except KeyboardInterrupt:
            print("stopping server", flush=True)
