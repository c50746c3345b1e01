"""The streaming layer extractor: equality with output_hidden_states, token strings, shards, CLI errors."""

import sys
from pathlib import Path

import pytest
import torch

from autointerp.lm import activations as A
from autointerp import cli
from autointerp.lm import train as lm
from autointerp.lm.corpus import Document

DOCS = [Document("The package manager resolves dependencies between packages.", "en", "t", 0),
        Document("パッケージ管理システムは依存関係を解決します。鬱蒼とした森。", "ja", "t", 1),
        Document("short", "en", "t", 2),
        Document("A" * 300, "en", "t", 3)]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer():
    texts = ["The package manager resolves dependencies.", "パッケージ管理システムは依存関係を解決します。"] * 20
    return lm.train_tokenizer(texts, vocab_size=400)


@pytest.fixture(scope="module")
def llama(tokenizer, tmp_path_factory):
    """A randomly initialised 3-layer Llama saved as a checkpoint folder."""
    model = lm.build_model(lm.TrainConfig(d_model=32, layers=3, heads=2), tokenizer).eval()
    path = tmp_path_factory.mktemp("ckpt")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model, path


def _other_architectures(vocab: int):
    from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    return [GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=128, n_embd=32, n_layer=3, n_head=2)),
            GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=3,
                                             num_attention_heads=2, intermediate_size=64))]


def _check_equals_hidden_states(model, tokenizer, max_tokens=16):
    model.eval()
    n = A.num_layers(model)
    assert n == 3
    for layer in range(n - 1):  # the last entry of hidden_states has the final norm applied
        batches = list(A.iter_activations(model, tokenizer, DOCS, layer, batch_size=3, max_tokens=max_tokens))
        assert [b.doc_ids for b in batches] == [[0, 1, 2], [3]]
        for batch in batches:
            assert batch.acts.shape == (*batch.input_ids.shape, A.d_model(model))
            assert batch.input_ids.shape[1] <= max_tokens
            for row in range(len(batch.doc_ids)):
                ids = tokenizer(DOCS[batch.doc_ids[row]].text, truncation=True, max_length=max_tokens)["input_ids"]
                # a hand-written forward pass, one unpadded document at a time
                with torch.no_grad():
                    hidden = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[layer + 1][0]
                got = batch.acts[row, :len(ids)]
                assert torch.allclose(got, hidden, atol=1e-5), (type(model).__name__, layer)
                assert batch.mask[row, len(ids):].sum() == 0  # padding is masked
                assert (batch.input_ids[row, len(ids):] == tokenizer.pad_token_id).all()  # right-padded


def test_llama_activations_equal_hidden_states(llama, tokenizer):
    model, _ = llama
    _check_equals_hidden_states(model, tokenizer)


def test_other_architectures_find_their_layers_and_match(tokenizer):
    for model in _other_architectures(len(tokenizer)):
        _check_equals_hidden_states(model, tokenizer)


def test_forward_stops_after_the_layer(llama, tokenizer):
    model, _ = llama
    calls = []
    handle = A.decoder_layers(model)[2].register_forward_hook(lambda *a: calls.append(1))
    try:
        list(A.iter_activations(model, tokenizer, DOCS, layer=0))
    finally:
        handle.remove()
    assert calls == []


def test_mask_excludes_bos_and_padding(llama, tokenizer):
    model, _ = llama
    (batch,) = A.iter_activations(model, tokenizer, DOCS, layer=1, batch_size=4, max_tokens=64)
    assert (batch.input_ids[:, 0] == tokenizer.bos_token_id).all() and not batch.mask[:, 0].any()
    lengths = [len(tokenizer(d.text)["input_ids"][:64]) for d in DOCS]
    assert batch.mask.sum(dim=1).tolist() == [n - 1 for n in lengths]


def test_token_strings_are_readable_and_join_to_the_text(tokenizer):
    for text in [DOCS[0].text, DOCS[1].text, "日本語 and English 混在"]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        strings = A.token_strings(tokenizer, ids)
        assert len(strings) == len(ids)
        assert "".join(strings) == text
        assert not any("\ufffd" in s for s in strings)
    ids = tokenizer("パッケージ", add_special_tokens=False)["input_ids"]
    assert any(len(s) >= 2 for s in A.token_strings(tokenizer, ids))  # learned multi-character tokens


def test_token_strings_fast_path_equals_transformers_decode(tokenizer):
    """The Rust decoder path gives each token the same string as transformers' own decode."""
    class SlowTokenizer:  # the same tokenizer seen through transformers' decode only
        batch_decode = staticmethod(tokenizer.batch_decode)
        decode = staticmethod(tokenizer.decode)

    assert tokenizer.backend_tokenizer is not None
    for text in [DOCS[0].text, DOCS[1].text, "日本語 and English 混在 ダーク", "  spaces\n\nand 改行。"]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert A.token_strings(tokenizer, ids) == A.token_strings(SlowTokenizer(), ids)


def _run_cli(args, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["autointerp", *args])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    return exit_info.value.code, capsys.readouterr()


def test_cli_writes_shards_that_match_and_resumes(llama, tmp_path, monkeypatch, capsys):
    model, path = llama
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("\n".join('{"text": "%s"}' % d.text for d in DOCS))
    out = tmp_path / "acts"
    args = ["activations", "--model", str(path), "--layer", "1", "--corpus", str(corpus),
            "--batch-size", "3", "--seq-len", "16", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", ["autointerp", *args])
    cli.main()
    assert "docs=4" in capsys.readouterr().out
    shards = list(A.iter_shards(out))
    expected = list(A.iter_activations(model, A.load_lm(str(path))[1], DOCS, 1, batch_size=3, max_tokens=16))
    assert len(shards) == len(expected) == 2
    for got, want in zip(shards, expected):
        assert torch.allclose(got.acts, want.acts, atol=1e-6) and torch.equal(got.mask, want.mask)
    first = out / "shard-00000.safetensors"
    first.unlink()  # as if stopped after shard 1: the rerun writes only the missing one
    mtime = (out / "shard-00001.safetensors").stat().st_mtime_ns
    cli.main()
    assert first.exists() and (out / "shard-00001.safetensors").stat().st_mtime_ns == mtime


@pytest.mark.parametrize("problem", ["missing corpus", "empty corpus", "no weights", "layer out of range"])
def test_bad_input_is_a_one_line_error(problem, llama, tmp_path, monkeypatch, capsys):
    _, path = llama
    corpus = tmp_path / "c.txt"
    corpus.write_text("some text\n")
    model, layer, expect = str(path), "0", ""
    if problem == "missing corpus":
        corpus, expect = tmp_path / "missing.txt", "missing.txt' not found"
    elif problem == "empty corpus":
        corpus.write_text("\n\n"); expect = "no documents"
    elif problem == "no weights":
        empty = tmp_path / "model"
        empty.mkdir()
        (empty / "config.json").write_text("{}")
        model, expect = str(empty), "has no weights"
    else:
        layer, expect = "3", "layer 3 out of range"
    code, captured = _run_cli(["activations", "--model", model, "--layer", layer, "--corpus", str(corpus)],
                              monkeypatch, capsys)
    assert code == 1
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and expect in lines[0] and "Traceback" not in captured.err


def test_entry_point_reports_a_missing_corpus_in_one_line(tmp_path):
    import subprocess

    exe = Path(sys.executable).with_name("autointerp")
    result = subprocess.run([str(exe), "activations", "--model", str(tmp_path), "--layer", "0",
                             "--corpus", str(tmp_path / "nope.jsonl")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and "nope.jsonl" in result.stderr
