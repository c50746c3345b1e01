"""Tokenizer, tiny LM training, checkpoints and resume."""

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from autointerp.lm import train as lm
from autointerp.lm.corpus import DEBIAN_REFERENCE_DIR, load_corpus

pytestmark = pytest.mark.skipif(
    not (DEBIAN_REFERENCE_DIR / "debian-reference.ja.txt.gz").exists(),
    reason="Debian Reference not installed (apt-get install debian-reference-en debian-reference-ja)")

TEXTS = ["The package manager resolves dependencies.", "パッケージ管理システムは依存関係を解決します。",
         "鬱蒼とした森 (rare kanji, unseen in training) and émigré ünïcödé", "  spaces\tand\nnewlines  "]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer():
    docs = load_corpus(limit=200)
    return lm.train_tokenizer([d.text for d in docs], vocab_size=512)


def test_tokenizer_round_trips_english_and_japanese(tokenizer, tmp_path: Path):
    from transformers import AutoTokenizer

    for text in TEXTS:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
    with_bos = tokenizer(TEXTS[1])["input_ids"]
    assert with_bos[0] == tokenizer.bos_token_id
    assert tokenizer.decode(with_bos, skip_special_tokens=True) == TEXTS[1]
    # saved and loaded back the transformers way, it encodes identically
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert [loaded(t)["input_ids"] for t in TEXTS] == [tokenizer(t)["input_ids"] for t in TEXTS]


def test_tokenizer_learns_japanese_merges(tokenizer):
    # a common Japanese word takes fewer tokens than its UTF-8 bytes (3 a character)
    ids = tokenizer("パッケージ", add_special_tokens=False)["input_ids"]
    assert len(ids) < len("パッケージ".encode())


def test_batches_are_a_pure_function_of_seed_and_step():
    stream = torch.arange(10_000)
    a = lm.batch_for_step(stream, 7, 8, 16, seed=1)
    assert torch.equal(a, lm.batch_for_step(stream, 7, 8, 16, seed=1))
    assert not torch.equal(a, lm.batch_for_step(stream, 8, 8, 16, seed=1))
    assert not torch.equal(a, lm.batch_for_step(stream, 7, 8, 16, seed=2))
    assert a.shape == (8, 16) and torch.all(a[:, 1:] - a[:, :-1] == 1)  # contiguous windows


def test_checkpoint_steps_default_to_powers_of_ten_plus_final():
    assert lm.TrainConfig(steps=600).checkpoint_steps() == [10, 100, 600]
    assert lm.TrainConfig(steps=1000, checkpoints=[5, 50, 5000]).checkpoint_steps() == [5, 50, 1000]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run, with the logits of the in-memory model at each checkpoint."""
    out = tmp_path_factory.mktemp("lm")
    probe = torch.tensor([[1, 5, 9, 40, 200, 7, 3, 300]])
    logits = {}

    def on_checkpoint(step, model):
        with torch.no_grad():
            logits[step] = model(input_ids=probe).logits.clone()

    log = lm.train(lm.TINY, out, on_checkpoint=on_checkpoint)
    return out, log, probe, logits


def test_loss_falls_over_training(trained):
    out, log, _, _ = trained
    evals = [e["eval_loss"] for e in log["checkpoints"]]
    assert [e["step"] for e in log["checkpoints"]] == [0, 10, 20, 30]
    assert all(b < a for a, b in zip(evals, evals[1:])), evals
    assert evals[-1] < evals[0] - 0.5
    assert (out / "train_log.json").exists()


def test_checkpoints_load_back_with_the_same_logits(trained):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _, probe, logits = trained
    assert sorted(logits) == [10, 20, 30]
    for step, expected in logits.items():
        model = AutoModelForCausalLM.from_pretrained(out / f"step-{step}").eval()
        with torch.no_grad():
            assert torch.equal(model(input_ids=probe).logits, expected)
        assert len(AutoTokenizer.from_pretrained(out / f"step-{step}")) == model.config.vocab_size
    assert not (out / "last").exists()  # the final checkpoint supersedes the resume point


def test_resume_gives_the_same_final_weights(trained, tmp_path: Path):
    from safetensors.torch import load_file

    out, _, _, _ = trained
    config = replace(lm.TINY, save_every=5)

    class Stop(Exception):
        pass

    def stop_at_17(step, loss):
        if step == 17:
            raise Stop

    with pytest.raises(Stop):
        lm.train(config, tmp_path, on_step=stop_at_17)
    assert lm.latest_resume_point(tmp_path) == tmp_path / "last"  # saved at step 15
    seen = []
    lm.train(config, tmp_path, on_step=lambda step, loss: seen.append(step))
    assert seen[0] == 16 and seen[-1] == 30
    a = load_file(str(out / "step-30" / "model.safetensors"))
    b = load_file(str(tmp_path / "step-30" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_other_settings_is_refused(trained):
    from autointerp.errors import UserError

    out, _, _, _ = trained
    with pytest.raises(UserError, match="lr"):
        lm.train(replace(lm.TINY, lr=0.5), out)


def test_cli_trains_prints_the_table_and_refuses_bad_checkpoints(tmp_path, monkeypatch, capsys):
    import sys

    from autointerp import cli

    monkeypatch.setattr(sys, "argv", ["autointerp", "lm", "train", "--tiny", "--out", str(tmp_path)])
    cli.main()
    table = capsys.readouterr().out
    assert "eval loss" in table and "│   30 │" in table
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-10", "step-20", "step-30"]

    monkeypatch.setattr(sys, "argv", ["autointerp", "lm", "train", "--steps", "10,x", "--out", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "Invalid value for '--steps'" in err and "Traceback" not in err
