"""`autointerp sae train / metrics` end to end on a tiny random Llama and a small text corpus."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from autointerp.sae import load_sae
from autointerp.sae.metrics import measure_sae, replace_layer_output, special_token_ids

WORDS = "the cat sat on a mat while dogs run in parks and birds sing over green hills".split()


def tiny_corpus(path: Path, n: int = 120) -> Path:
    gen = torch.Generator().manual_seed(0)
    lines = [" ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (12,), generator=gen)) for _ in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return path


def tiny_llama(directory: Path, corpus: Path, d_model: int = 16, seed: int = 0) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    from autointerp.lm.train import train_tokenizer

    tokenizer = train_tokenizer(corpus.read_text().splitlines(), vocab_size=300)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=d_model, intermediate_size=32,
                                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                         pad_token_id=tokenizer.pad_token_id))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "autointerp.cli", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"})


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sae_cli")
    corpus = tiny_corpus(root / "corpus.txt")
    run = root / "run"
    for step, seed in ((10, 0), (100, 1)):
        tiny_llama(run / "lm" / f"step-{step}", corpus, seed=seed)
    return root, corpus, run


TRAIN_ARGS = ["--k", "4", "--expansion", "4", "--batch-tokens", "256", "--train-tokens", "2048",
              "--eval-docs", "20", "--threads", "1"]


@pytest.mark.slow  # ~30 s: two SAEs trained through the CLI
def test_train_over_a_run_is_resumable(setup):
    root, corpus, run = setup
    first = _cli("sae", "train", str(run), "--layer", "0", "--corpus", str(corpus), *TRAIN_ARGS)
    assert first.returncode == 0, first.stderr
    for step in (10, 100):
        folder = run / f"step-{step}" / "sae"
        metrics = json.loads((folder / "metrics.json").read_text())
        assert 0 < metrics["fvu"] < 1.5 and metrics["l0"] <= 4 and metrics["train_tokens"] == 2048
        assert {"ce_loss_without_sae", "ce_loss_with_sae", "ce_loss_with_ablation", "ce_loss_score", "delta_ce",
                "kl_div_score", "dead_fraction"} <= metrics.keys()
        assert metrics["definitions"]["ce_loss_score"].startswith("SAELens: ")
        sae = load_sae(folder)
        assert (sae.cfg.d_model, sae.cfg.d_sae, sae.cfg.layer, sae.cfg.checkpoint_step) == (16, 64, 0, step)
    assert "step 10" in first.stdout and "CE score" in first.stdout
    assert json.loads((run / "manifest.json").read_text())["stages"]["sae"]["k"] == 4

    stamp = (run / "step-10" / "sae" / "sae.safetensors").stat().st_mtime_ns
    again = _cli("sae", "train", str(run), "--layer", "0", "--corpus", str(corpus), *TRAIN_ARGS)
    assert again.returncode == 0 and "(done)" in again.stdout
    assert (run / "step-10" / "sae" / "sae.safetensors").stat().st_mtime_ns == stamp

    metrics_json = run / "step-100" / "sae" / "metrics.json"
    before = metrics_json.read_bytes()
    shown = _cli("sae", "metrics", str(run / "step-100" / "sae"), "--corpus", str(corpus), "--eval-docs", "20")
    assert shown.returncode == 0, shown.stderr
    assert "CE+SAE" in shown.stdout and "step-100" in shown.stdout and "not written" in shown.stdout
    assert metrics_json.read_bytes() == before  # only --write writes
    legacy = {k: v for k, v in json.loads(before).items() if k != "definitions"}
    legacy.update(ce_loss_recovered=0.5, kl_score=0.5)  # a metrics.json from before SAELens's definitions
    metrics_json.write_text(json.dumps(legacy))
    written = _cli("sae", "metrics", str(run / "step-100" / "sae"), "--corpus", str(corpus), "--write")
    assert written.returncode == 0, written.stderr
    assert "replaced the held-out metrics" in written.stdout
    rewritten = json.loads(metrics_json.read_text())
    assert rewritten["train_tokens"] == 2048 and "definitions" in rewritten  # training record kept, figures new
    assert "ce_loss_recovered" not in rewritten and "kl_score" not in rewritten


@pytest.mark.slow  # ~15 s of CLI start-ups
def test_bad_input_exits_with_one_line(setup, tmp_path):
    root, corpus, run = setup
    too_big_k = _cli("sae", "train", "--model", str(run / "lm" / "step-10"), "--out", str(tmp_path / "x"),
                     "--corpus", str(corpus), "--k", "100", "--expansion", "1", "--train-tokens", "512")
    assert too_big_k.returncode == 1 and "k=100 > d_sae=16" in too_big_k.stderr
    assert len(too_big_k.stderr.strip().splitlines()) == 1

    other = tiny_llama(tmp_path / "wide", corpus, d_model=32)
    (tmp_path / "pk").mkdir()
    torch.save({"W_enc": torch.zeros(2, 2)}, tmp_path / "pk" / "sae.pt")
    refused = _cli("sae", "metrics", str(tmp_path / "pk"), "--model", str(other), "--layer", "0")
    assert refused.returncode == 1 and "--trust-pickle" in refused.stderr

    if not (run / "step-10" / "sae").exists():
        pytest.skip("needs the SAEs of test_train_over_a_run_is_resumable")
    mismatch = _cli("sae", "metrics", str(run / "step-10" / "sae"), "--model", str(other),
                    "--corpus", str(corpus), "--eval-docs", "5")
    assert mismatch.returncode == 1 and "d_model 16" in mismatch.stderr and "32" in mismatch.stderr


def test_splice_hook_replaces_the_layer_output(setup):
    """Identity splice = clean loss; zero splice != clean; an SAE that reconstructs exactly = clean."""
    from autointerp.lm.activations import load_lm

    root, corpus, run = setup
    model, tokenizer = load_lm(str(run / "lm" / "step-10"))
    ids = tokenizer(["the cat sat on a mat", "dogs run in parks"], padding=True, return_tensors="pt")
    batch = [(ids["input_ids"], ids["attention_mask"])]
    with torch.no_grad():
        clean = model(**ids).logits
        with replace_layer_output(model, 0, lambda h: h):
            same = model(**ids).logits
        with replace_layer_output(model, 0, torch.zeros_like):
            zeroed = model(**ids).logits
    assert torch.equal(clean, same) and not torch.allclose(clean, zeroed)

    from test_sae_metrics import exact_sae

    result = measure_sae(exact_sae(16), model, 0, batch, special_token_ids(tokenizer))
    assert result["delta_ce"] == pytest.approx(0.0, abs=1e-6) and result["kl_div_with_sae"] == pytest.approx(0.0, abs=1e-7)
    assert result["ce_loss_with_ablation"] != result["ce_loss_without_sae"]
    assert result["ce_loss_score"] == pytest.approx(1.0) and result["explained_variance"] == pytest.approx(1.0)


@pytest.mark.slow  # ~20 s: two SAEs of one model, one pass of it
def test_layers_of_one_model_train_from_one_pass_into_layer_sites(setup, tmp_path, monkeypatch):
    """`sae train RUN --model M --layer 0,1` writes RUN/layer-0/sae and RUN/layer-1/sae; the two
    SAEs read the activations of one pass of the LM and equal SAEs trained one layer at a time."""
    from typer.testing import CliRunner

    from autointerp.lm import activations
    from autointerp.sae.cli import cli as sae_cli

    root, corpus, run = setup
    model = str(run / "lm" / "step-10")
    passes = []
    real = activations.iter_activations

    def counted(*args, **kwargs):
        passes.append(args[3] if len(args) > 3 else kwargs.get("layer"))
        return real(*args, **kwargs)

    monkeypatch.setattr(activations, "iter_activations", counted)
    both = tmp_path / "both"
    result = CliRunner().invoke(sae_cli, ["train", str(both), "--model", model, "--layer", "0,1",
                                          "--corpus", str(corpus), *TRAIN_ARGS])
    assert result.exit_code == 0, result.output
    training_passes = [p for p in passes if not isinstance(p, int)]
    assert training_passes == [[0, 1]], passes  # one pass for both layers (metrics read held-out docs apart)
    for layer in (0, 1):
        sae = load_sae(both / f"layer-{layer}" / "sae")
        assert (sae.cfg.layer, sae.cfg.checkpoint_step) == (layer, None)
    one = tmp_path / "one"
    result = CliRunner().invoke(sae_cli, ["train", str(one), "--model", model, "--layer", "1",
                                          "--corpus", str(corpus), *TRAIN_ARGS])
    assert result.exit_code == 0, result.output
    a, b = load_sae(both / "layer-1" / "sae"), load_sae(one / "layer-1" / "sae")
    assert torch.equal(a.W_enc, b.W_enc)  # the same stream of activations, the same SAE
