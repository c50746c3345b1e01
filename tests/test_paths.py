"""A run folder can be moved and opened from any working directory: paths saved in run files are
relative to the file's folder inside the run, and older runs (absolute or cwd-relative paths) still load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from autointerp import run as runlib
from autointerp.cli import app
from autointerp.errors import UserError
from autointerp.records.read import read_records

from test_sae_cli import tiny_corpus, tiny_llama

runner = CliRunner()


def test_saved_paths_round_trip(tmp_path):
    run = tmp_path / "run"
    (run / "lm" / "step-5").mkdir(parents=True)
    (run / "step-5" / "sae").mkdir(parents=True)
    outside = tmp_path / "corpus.txt"
    outside.write_text("x")
    sae_dir = run / "step-5" / "sae"
    assert runlib.saved_path(run / "lm" / "step-5", sae_dir, root=run) == "../../lm/step-5"
    assert runlib.saved_path(outside, run) == str(outside.resolve())  # outside the run: absolute
    assert runlib.saved_path("gpt2", run) == "gpt2" and runlib.saved_path("debian-reference", run) == "debian-reference"
    assert runlib.load_saved("step-5/sae", run) == str(run / "step-5" / "sae")
    assert runlib.load_saved("hf:wikitext", run) == "hf:wikitext"
    assert Path(runlib.resolve_model("../../lm/step-5", sae_dir)) == run / "lm" / "step-5"
    # a cwd-relative path of an older run, opened from elsewhere: RUN/lm/step-N of the SAE's run
    assert Path(runlib.resolve_model("runs/old/lm/step-5", sae_dir)) == run / "lm" / "step-5"
    assert runlib.resolve_model("EleutherAI/pythia-70m", sae_dir) == "EleutherAI/pythia-70m"  # a hub id
    with pytest.raises(UserError) as err:
        runlib.resolve_model("runs/old/lm/step-9", sae_dir)
    assert "runs/old/lm/step-9" in str(err.value) and "tried" in str(err.value) and "--model" in str(err.value)


@pytest.fixture(scope="module")
def moved(tmp_path_factory):
    """A run made by `sae train run` from one folder, then moved elsewhere."""
    root = tmp_path_factory.mktemp("paths")
    work = root / "work"
    work.mkdir()
    corpus = tiny_corpus(root / "corpus.txt", n=60)
    tiny_llama(work / "run" / "lm" / "step-10", corpus)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        result = runner.invoke(app, ["sae", "train", "run", "--layer", "0", "--corpus", str(corpus),
                                     "--k", "2", "--expansion", "2", "--batch-tokens", "128", "--train-tokens", "256",
                                     "--eval-docs", "5", "--threads", "1"])
    assert result.exit_code == 0, (result.output, result.exception)
    (root / "elsewhere").mkdir()
    shutil.move(str(work / "run"), str(root / "elsewhere" / "moved"))
    (root / "cwd").mkdir()
    return root, root / "elsewhere" / "moved", corpus


def test_sae_train_saves_the_model_relative_to_the_sae_folder(moved):
    _, run, _ = moved
    config = json.loads((run / "step-10" / "sae" / "config.json").read_text())
    assert config["model"] == "../../lm/step-10"


def test_a_moved_run_opens_from_another_folder(moved, monkeypatch):
    root, run, corpus = moved
    monkeypatch.chdir(root / "cwd")
    shown = runner.invoke(app, ["sae", "metrics", "../elsewhere/moved/step-10/sae", "--corpus", str(corpus),
                                "--eval-docs", "5", "--no-write"])
    assert shown.exit_code == 0, (shown.output, shown.exception)
    collected = runner.invoke(app, ["collect", "../elsewhere/moved/step-10/sae", "--out", "r.jsonl",
                                    "--corpus", str(corpus), "--top-k", "2", "--docs", "20", "--threads", "1"])
    assert collected.exit_code == 0, (collected.output, collected.exception)
    collected = runner.invoke(app, ["collect", "../elsewhere/moved", "--corpus", str(corpus),
                                    "--top-k", "2", "--docs", "20", "--threads", "1"])
    assert collected.exit_code == 0, (collected.output, collected.exception)
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["stages"]["collect"]["checkpoints"]["step-10"]["records"] == "step-10/records.jsonl.zst"
    assert read_records(runlib.records_file(run / "step-10"))[0].model == "lm/step-10"


def test_an_old_run_with_cwd_relative_paths_still_loads(moved, monkeypatch, tmp_path):
    root, run, corpus = moved
    old = tmp_path / "old"
    shutil.copytree(run, old)
    config_path = old / "step-10" / "sae" / "config.json"
    config = json.loads(config_path.read_text())
    config["model"] = "runs/demo/lm/step-10"  # what `sae train --run runs/demo` wrote before
    config_path.write_text(json.dumps(config))
    monkeypatch.chdir(root / "cwd")
    shown = runner.invoke(app, ["sae", "metrics", str(old / "step-10" / "sae"), "--corpus", str(corpus),
                                "--eval-docs", "5", "--no-write"])
    assert shown.exit_code == 0, (shown.output, shown.exception)

    config["model"] = "runs/demo/lm/step-99"  # nowhere: say what was tried and how to go on
    config_path.write_text(json.dumps(config))
    failed = runner.invoke(app, ["sae", "metrics", str(old / "step-10" / "sae"), "--corpus", str(corpus)])
    message = str(failed.exception)
    assert isinstance(failed.exception, UserError) and "runs/demo/lm/step-99" in message
    assert "tried" in message and "pass --model" in message
    fixed = runner.invoke(app, ["sae", "metrics", str(old / "step-10" / "sae"), "--model", str(old / "lm" / "step-10"),
                                "--corpus", str(corpus), "--eval-docs", "5", "--no-write"])
    assert fixed.exit_code == 0, (fixed.output, fixed.exception)
