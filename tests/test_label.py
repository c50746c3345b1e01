"""`autointerp label`: every live latent labelled statistically, an LLM sample stratified by class,
the control, resume, and a down server found before anything heavy loads (fake servers)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
from fakeserver import FakeServer  # noqa: E402

from autointerp.labels import decision as granularity
from autointerp.labels import evidence

from autointerp.labels import sampling

from autointerp.labels import statlabels  # noqa: E402
from autointerp.cli import app  # noqa: E402
from autointerp.jsonl import iter_jsonl, to_json_line, write_jsonl  # noqa: E402
from autointerp.schema import Context, FeatureRecord, Key, Label, row_key  # noqa: E402
from autointerp.labels.statlabels import iter_stat_label_lines  # noqa: E402

DEV = Path(__file__).resolve().parents[2] / "shared/data/llmjp_sae_human_labels.dev.jsonl.gz"


def dev_records(n: int, step: int | None = None) -> list[FeatureRecord]:
    if not DEV.exists():
        pytest.skip(f"human-labelled dev data not found at {DEV}")
    out = []
    for r in iter_jsonl(DEV, FeatureRecord.from_dict):
        if step is None or r.checkpoint_step == step:
            out.append(r)
        if len(out) == n:
            break
    return out


def write_run(tmp_path: Path, n: int = 24) -> tuple[Path, list[FeatureRecord]]:
    """A run with one checkpoint: n dev latents of one step and a dead latent."""
    records = dev_records(n)
    step = records[0].checkpoint_step
    records = [r for r in records if r.checkpoint_step == step]
    records.append(FeatureRecord(model="m", layer=0, checkpoint_step=step, feature=99_999, contexts=[]))
    run = tmp_path / "run"
    write_jsonl(run / f"step-{step}" / "records.jsonl", records)
    return run, records


def labels_of(run: Path) -> list[Label]:
    return [Label.from_dict(json.loads(l)) for p in sorted(run.glob("step-*/labels.jsonl"))
            for l in p.read_text().splitlines()]


def fill(schema: dict) -> object:
    """A valid answer for a scorer's JSON schema (0/1 lists, integer levels)."""
    if schema.get("type") == "array":
        n = schema.get("minItems", 1)
        return [i % 2 for i in range(n)]
    return {k: fill(v) for k, v in schema.get("properties", {}).items()}


def scorer_answer(request: dict) -> str:
    fmt = request.get("response_format") or {}
    schema = (fmt.get("json_schema") or {}).get("schema")
    return json.dumps(fill(schema) if schema else [1, 0, 1, 0, 1])


# ---- the sample ----------------------------------------------------------------------------------

def test_stratified_sample_is_seeded_and_covers_every_class():
    classes = {Key(1, 0, i): "uninterpretable" for i in range(500)}
    classes |= {Key(1, 0, 500 + i): "token" for i in range(60)}
    classes[Key(1, 0, 900)] = "concept-synonym"  # one rare latent
    a, strata = sampling.sample_stratified(classes, 10, seed=3)
    assert a == sampling.sample_stratified(classes, 10, seed=3)[0]  # seeded
    assert a != sampling.sample_stratified(classes, 10, seed=4)[0]
    assert len(a) == 10 and len(set(a)) == 10 and a == sorted(a)
    drawn = Counter(classes[k] for k in a)
    assert set(drawn) == {"uninterpretable", "token", "concept-synonym"}  # every class present, the rare one too
    assert drawn == Counter(strata) and drawn["uninterpretable"] > drawn["token"] >= 1
    # fewer latents asked for than classes present: still one of each
    assert set(Counter(classes[k] for k in sampling.sample_stratified(classes, 1, 0)[0])) == set(drawn)
    everything, _ = sampling.sample_stratified(classes, None, 0)
    assert len(everything) == len(classes)


# ---- statistical labels --------------------------------------------------------------------------

def test_streamed_labels_equal_in_memory_ones_with_evidence_summary(tmp_path, monkeypatch):
    records = dev_records(40)
    path = tmp_path / "records.jsonl"
    write_jsonl(path, records)
    monkeypatch.setattr(statlabels, "HEAD", 1)  # the workers label all but the first chunk
    streamed = list(iter_stat_label_lines(path, workers=2, chunk=7))
    in_memory = [to_json_line(l) for l in granularity.iter_labels(records)]
    assert streamed == in_memory
    for line, record in zip(streamed, records):
        label = Label.from_dict(json.loads(line))
        assert label.evidence_summary == evidence.evidence_summary(record) != ""


def test_evidence_summary_names_the_top_token_with_its_count():
    def ctx(token):
        return Context(tokens=["x", token, "y"], levels=[0, 10, 0])

    record = FeatureRecord(model="m", layer=0, checkpoint_step=1, feature=0,
                           contexts=[ctx(" more")] * 10 + [ctx("また")] * 7 + [ctx(" dog")] * 3)
    summary = evidence.evidence_summary(record)
    assert summary.startswith("“ more” 10/20")
    assert "“また” 7/20" in summary and summary.endswith("en+ja")


def test_old_label_lines_still_read():
    old = {"checkpoint_step": 1, "feature": 2, "description": "x", "granularity": "token", "cross_lingual": True,
           "language": "mix", "language_profile": {"cross_lingual": True}, "scores": {"simulation": 0.1},
           "confidence": 0.5, "explainer": {}}
    label = Label.from_dict(old)
    assert label.bilingual_firing is True  # the old flag, renamed
    assert label.cross_lingual is False  # the paper's meaning needs a concept-synonym latent
    assert (label.sampled, label.scores_noise, label.evidence_summary) == (False, False, "")


# ---- the command ---------------------------------------------------------------------------------

def test_score_stats_only_labels_the_live_latents_as_label_does_and_counts_the_dead_apart(tmp_path):
    run, records = write_run(tmp_path)
    dead = [r for r in records if not r.contexts]
    assert dead  # the fixture has a dead latent
    result = CliRunner().invoke(app, ["score", str(run), "--stats-only"])
    assert result.exit_code == 0, result.output
    assert f"{len(dead)} dead latents counted apart" in " ".join(result.output.split())
    stats_only = {l.key: l.granularity for l in labels_of(run)}
    assert sorted(stats_only) == sorted(r.key for r in records if r.contexts)  # no line for a dead latent
    with FakeServer() as server:
        result = CliRunner().invoke(app, ["label", str(run), "--server", server.base_url, "--features", "2",
                                          "--no-score"])
        assert result.exit_code == 0, result.output
    assert sorted(l.key for l in labels_of(run)) == sorted(stats_only)


def test_label_writes_one_line_per_live_latent_sampled_only_on_the_sample(tmp_path):
    run, records = write_run(tmp_path)
    live = [r for r in records if r.contexts]
    with FakeServer() as server:
        result = CliRunner().invoke(app, ["label", str(run), "--server", server.base_url, "--features", "5",
                                          "--no-score"])
        assert result.exit_code == 0, result.output
        sent = len(server.bodies)
    labels = labels_of(run)
    assert sorted(l.key for l in labels) == sorted(r.key for r in live)  # every live latent, the dead one not
    sampled = [l for l in labels if l.sampled]
    assert sent == len(sampled) >= 5
    stat_classes = {}
    for line in iter_stat_label_lines(next(run.glob("step-*/records.jsonl")), workers=1):
        d = json.loads(line)
        stat_classes[row_key(d)] = d["granularity"]
    assert {stat_classes[l.key] for l in sampled} == {stat_classes[r.key] for r in live}  # every class present
    for label in labels:
        assert label.evidence_summary
        if label.sampled:
            assert label.description == "Paris." and label.explainer["model"] == "fake-model"
        else:
            assert label.description == "" and label.scores == {} and label.explainer == {}
    stage = json.loads((run / "manifest.json").read_text())["stages"]["label"]
    assert stage["features"] == 5 and stage["sample"]["n"] == len(sampled) and stage["sample"]["seed"] == 0
    assert sum(stage["sample"]["strata"].values()) == len(sampled)
    assert stage["llm"] == {"model": "fake-model", "engine": "openai-compatible", "base_url": server.base_url}
    assert "95% CI" in result.output and "LLM-described" in result.output


@pytest.mark.parametrize("served", [{"max_model_len": 300}, {"props_n_ctx": 300}])
def test_label_fits_prompts_to_the_context_the_server_reports_and_says_when_it_trims(tmp_path, served):
    """vLLM's max_model_len (llama.cpp's /props n_ctx) decides how long the explainer's prompts
    may be, over a larger --n-ctx; trimmed prompts are counted and kept on each explanation."""
    run, _ = write_run(tmp_path, n=8)
    with FakeServer(**served) as server:  # /tokenize: 1 token per 4 bytes
        result = CliRunner().invoke(app, ["label", str(run), "--server", server.base_url, "--features", "3",
                                          "--no-score", "--n-ctx", "4096"])
        assert result.exit_code == 0, result.output
        prompts = [b["prompt"] for b in server.bodies if "prompt" in b]
    stage = json.loads((run / "manifest.json").read_text())["stages"]["label"]
    assert stage["n_ctx"] == 300 and "more than the server's 300 tokens" in result.output
    budget = 300 - 48 - 48  # the answer's 48 tokens and the chat template's allowance
    assert prompts and all(len(p.encode()) // 4 <= budget for p in prompts)
    explanations = [json.loads(l) for l in next(run.glob("step-*/explanations.jsonl")).read_text().splitlines()]
    trimmed = [e for e in explanations if e["trimmed"]]
    assert trimmed and all(e["contexts"] < 10 for e in trimmed)
    assert f"{len(trimmed)} of {len(explanations)} explainer prompts trimmed to fit 300 tokens" in result.output


def test_label_counts_a_latent_left_without_a_description_as_not_described(tmp_path):
    """An answer that stays invalid after the re-ask leaves an empty description with `error`;
    the summary line does not count that latent as LLM-described and says so."""
    run, _ = write_run(tmp_path)
    first: list[str] = []

    def empty_for_the_first_prompt(request: dict) -> str:  # its ask and its re-ask
        first[:] = first or [request["prompt"]]
        return "" if request["prompt"] == first[0] else " Paris."

    with FakeServer(completion_text=empty_for_the_first_prompt) as server:
        result = CliRunner().invoke(app, ["label", str(run), "--server", server.base_url, "--features", "5",
                                          "--no-score"])
        assert result.exit_code == 0, result.output
    sampled = [l for l in labels_of(run) if l.sampled]
    failed = [l for l in sampled if not l.description]
    assert len(failed) == 1 and failed[0].error
    assert f"{len(sampled) - 1} LLM-described; 1 sampled latent(s) left without a description" in " ".join(
        result.output.split())


def test_label_scores_the_sample_and_runs_the_control(tmp_path):
    run, records = write_run(tmp_path, n=30)
    with FakeServer(answer=scorer_answer) as server:
        result = CliRunner().invoke(app, ["label", str(run), "--server", server.base_url, "--features", "12",
                                          "--engine", "openai-compatible", "--concurrency", "8"])
        assert result.exit_code == 0, result.output
    stage = json.loads((run / "manifest.json").read_text())["stages"]["label"]
    control = stage["control"]
    assert control["n_latents"] >= 10 and set(control["methods"]) >= {"detection", "fuzzing"}
    assert (run / "control.jsonl").exists()
    sampled = [l for l in labels_of(run) if l.sampled]
    assert len(sampled) >= 12
    for label in sampled:
        assert {"simulation", "detection", "fuzzing", "ci95", "auc", "n"} <= set(label.scores)
        assert label.scores_noise == stage["scores_noise"]
    assert all(l.scores == {} and not l.scores_noise for l in labels_of(run) if not l.sampled)
    assert "shuffled" in result.output


def test_label_resumes_sending_only_what_is_missing(tmp_path):
    run, _ = write_run(tmp_path)
    args = ["label", str(run), "--features", "6", "--no-score"]
    with FakeServer() as server:
        assert CliRunner().invoke(app, [*args, "--server", server.base_url]).exit_code == 0
        first = len(server.bodies)
    before = {l.key: l.to_dict() for l in labels_of(run)}
    expl = next(run.glob("step-*/explanations.jsonl"))
    lines = expl.read_text().splitlines()
    expl.write_text("\n".join(lines[:2]) + "\n" + lines[2][:20])  # stopped mid-line after two latents
    (run / "cache.sqlite").unlink()  # so the resumed requests really reach the server
    with FakeServer() as server:
        result = CliRunner().invoke(app, [*args, "--server", server.base_url])
        assert result.exit_code == 0, result.output
        assert len(server.bodies) == first - 2  # only the latents without an explanation
    assert "kept from an earlier run" not in result.output  # the same prompt and sampling
    assert {l.key: l.to_dict() for l in labels_of(run)} == before
    # everything done: no server needed at all (a closed port would fail)
    again = CliRunner().invoke(app, [*args, "--server", "http://127.0.0.1:9/v1"])
    assert again.exit_code == 0, again.output
    assert "no server needed" in again.output


def test_resume_says_how_many_descriptions_another_setup_wrote(tmp_path):
    """A resumed run keeps finished descriptions; those an earlier prompt or sampling wrote are
    counted and named, and the rebuild without a server stays quiet about them."""
    run, _ = write_run(tmp_path)
    args = ["label", str(run), "--features", "6", "--no-score"]
    with FakeServer() as server:
        assert CliRunner().invoke(app, [*args, "--server", server.base_url]).exit_code == 0
    expl = next(run.glob("step-*/explanations.jsonl"))
    rows = [json.loads(line) for line in expl.read_text().splitlines()]
    for row in rows[:2]:
        row["explainer"]["prompt_sha256"] = "an earlier prompt"
    expl.write_text("".join(json.dumps(row) + "\n" for row in rows[:-1]))  # and one latent still to do
    (run / "cache.sqlite").unlink()
    with FakeServer() as server:
        result = CliRunner().invoke(app, [*args, "--server", server.base_url])
        assert result.exit_code == 0, result.output
        assert len(server.bodies) >= 1
    assert "2 description(s) kept from an earlier run" in " ".join(result.output.split())
    again = CliRunner().invoke(app, [*args, "--server", "http://127.0.0.1:9/v1"])
    assert "no server needed" in again.output and "kept from an earlier run" not in again.output


def test_a_sample_smaller_than_the_classes_takes_one_of_each_and_says_so(tmp_path):
    run, _ = write_run(tmp_path)
    with FakeServer() as server:
        result = CliRunner().invoke(app, ["label", str(run), "--features", "1", "--no-score",
                                          "--server", server.base_url])
    assert result.exit_code == 0, result.output
    for step_labels in _labels_by_step(run).values():
        classes = {l.granularity for l in step_labels}
        assert len(classes) > 1  # else the case is not exercised
        assert sorted(l.granularity for l in step_labels if l.sampled) == sorted(classes)
    assert "is fewer than the" in result.output and "one of each" in result.output


def _labels_by_step(run):
    by_step = {}
    for label in labels_of(run):
        by_step.setdefault(label.checkpoint_step, []).append(label)
    return by_step


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed once the with block ends: nothing listens there


def _autointerp(*args: str) -> tuple[subprocess.CompletedProcess, float]:
    """The real command in its own process: (result, wall seconds, Python's start included)."""
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "autointerp.cli", *args], capture_output=True, text=True,
                            timeout=60)
    return result, time.perf_counter() - started


def test_a_down_server_fails_in_one_line_within_5_seconds(tmp_path):
    run, _ = write_run(tmp_path)
    url = f"http://127.0.0.1:{_closed_port()}/v1"
    result, seconds = _autointerp("label", str(run), "--server", url, "--retries", "0")
    assert result.returncode == 1, result.stderr
    assert seconds < 5.0, seconds
    assert url in result.stderr and "does not answer" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not list(run.glob("step-*/labels.jsonl"))  # nothing heavy ran before the check


def test_a_down_server_fails_before_an_sae_is_collected(tmp_path):
    sae = tmp_path / "my-sae"
    sae.mkdir()
    (sae / "cfg.json").write_text("{}")
    (sae / "sae_weights.safetensors").write_bytes(b"")  # a SAELens folder by its names: nothing is loaded
    url = f"http://127.0.0.1:{_closed_port()}/v1"
    result, seconds = _autointerp("label", str(sae), "--model", "gpt2", "--corpus", "debian-reference",
                                  "--server", url)
    assert result.returncode == 1 and seconds < 5.0, (seconds, result.stderr)
    assert "does not answer" in result.stderr
    assert not (tmp_path / "my-sae-labels").exists()


def test_label_usage_mistakes_exit_2(tmp_path):
    run, _ = write_run(tmp_path)
    for args in (["--features", "zero"], ["--features", "0"], ["--no-such-option"]):
        result = CliRunner().invoke(app, ["label", str(run), *args])
        assert result.exit_code == 2, (args, result.output)


def test_label_an_sae_folder_collects_its_records_then_labels(tmp_path):
    """`label SAE_DIR --model M --corpus C`: records collected first (beside the SAE, said where),
    then every live latent labelled; a second run reuses the records."""
    from autointerp.lm import train as lm
    from autointerp.sae import SAEConfig, TopKSAE, save_sae

    texts = ["The package manager resolves dependencies.", "パッケージ管理システムは依存関係を解決します。",
             "Use apt to install a package.", "設定ファイルは /etc にあります。"] * 4
    tokenizer = lm.train_tokenizer(texts, vocab_size=300)
    model_dir = tmp_path / "tiny-lm"
    model = lm.build_model(lm.TrainConfig(d_model=32, layers=2, heads=2, seed=1), tokenizer).eval()
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    save_sae(TopKSAE(SAEConfig(d_model=32, d_sae=16, k=3, layer=1), seed=1), tmp_path / "my-sae")
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"{t} ({i})"}, ensure_ascii=False) + "\n"
                              for i, t in enumerate(texts)))
    args = ["label", str(tmp_path / "my-sae"), "--model", str(model_dir), "--corpus", str(corpus),
            "--features", "3", "--no-score"]
    with FakeServer() as server:
        result = CliRunner().invoke(app, [*args, "--server", server.base_url])
        assert result.exit_code == 0, result.output
        records_path = tmp_path / "my-sae-labels" / "records.jsonl.zst"
        assert records_path.is_file() and str(records_path) in " ".join(result.output.split())
        from autointerp.records.read import read_records

        live = [r for r in read_records(records_path) if r.contexts]
        labels = [Label.from_dict(json.loads(l))
                  for l in (tmp_path / "my-sae-labels" / "labels.jsonl").read_text().splitlines()]
        assert sorted(l.feature for l in labels) == sorted(r.feature for r in live) and live
        assert 1 <= sum(l.sampled for l in labels) <= len(live)
        again = CliRunner().invoke(app, [*args, "--server", server.base_url])
        assert again.exit_code == 0 and "exist; labelling them" in " ".join(again.output.split())


def test_label_killed_midway_resumes_with_each_latent_once(tmp_path):
    """SIGKILL mid-explain: the rerun sends only what is missing and every sampled latent ends up
    with exactly one explanation and one labelled line."""
    import os
    import signal

    run, records = write_run(tmp_path)
    out = next(run.glob("step-*")) / "explanations.jsonl"
    with FakeServer(delay=0.4) as server:
        cmd = [sys.executable, "-m", "autointerp.cli", "label", str(run), "--server", server.base_url,
               "--features", "8", "--concurrency", "1", "--no-score"]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and (not out.exists() or len(out.read_text().splitlines()) < 3):
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        written = len(out.read_text().splitlines())
        before = len(server.bodies)
        rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert rerun.returncode == 0, rerun.stderr
    labels = labels_of(run)
    sampled = [l.key for l in labels if l.sampled]
    assert 3 <= written < len(sampled)
    explained = [row_key(d) for d in map(json.loads, out.read_text().splitlines())]
    assert sorted(explained) == sorted(sampled)  # each exactly once
    assert len(server.bodies) - before <= len(sampled) - written + 1  # at most the one in flight again
    assert len(labels) == len([r for r in records if r.contexts])
