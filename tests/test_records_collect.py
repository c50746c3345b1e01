"""`collect` end to end on a tiny Llama + TopK SAE: records match a brute-force pass over the
model's hidden states; `autointerp collect --sae/--run` writes, resumes and reports errors."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from autointerp.lm import train as lm
from autointerp.lm.activations import load_lm
from autointerp.cli import app
from autointerp.errors import UserError
from autointerp.records.collect import collect
from autointerp.sae import SAEConfig, TopKSAE, save_sae
from autointerp.records.read import read_records

TEXTS = ["The package manager resolves dependencies between packages.",
         "パッケージ管理システムは依存関係を解決します。",
         "Use apt to install a package and dpkg to inspect it.",
         "設定ファイルは /etc にあります。",
         "The kernel boots, then systemd starts the services.",
         "ネットワークの設定を確認してください。"] * 4
LAYER = 1


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """RUN/lm/step-{10,20}/ (tiny random Llamas), RUN/step-{10,20}/sae/, a JSONL corpus."""
    root = tmp_path_factory.mktemp("collect")
    tokenizer = lm.train_tokenizer(TEXTS, vocab_size=300)
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"{t} ({i})"}, ensure_ascii=False) + "\n" for i, t in enumerate(TEXTS)))
    run = root / "run"
    for step in (10, 20):
        model = lm.build_model(lm.TrainConfig(d_model=32, layers=2, heads=2, seed=step), tokenizer).eval()
        ckpt = run / "lm" / f"step-{step}"
        model.save_pretrained(ckpt)
        tokenizer.save_pretrained(ckpt)
        sae = TopKSAE(SAEConfig(d_model=32, d_sae=24, k=3, model=str(ckpt), layer=LAYER, checkpoint_step=step), seed=step)
        save_sae(sae, run / f"step-{step}" / "sae")
    return run, corpus


def test_collect_matches_hidden_states(setup):
    run, corpus = setup
    from autointerp.lm.corpus import load_corpus

    docs = load_corpus(str(corpus))
    model, tokenizer = load_lm(str(run / "lm/step-10"))
    sae = TopKSAE(SAEConfig(d_model=32, d_sae=24, k=3), seed=10)
    records = collect(model, tokenizer, sae, docs, LAYER, top_k=4, batch_size=5, n_random=3, n_similar=2)
    assert len(records) == 24 and sum(len(r.contexts) for r in records) >= 24
    # brute force: one unpadded document at a time through output_hidden_states, BOS dropped
    per_doc = {}
    with torch.no_grad():
        for d in docs:
            ids = tokenizer(d.text, truncation=True, max_length=64)["input_ids"][1:]  # drop BOS
            hidden = model(input_ids=torch.tensor([[tokenizer.bos_token_id] + ids]), output_hidden_states=True).hidden_states[LAYER + 1][0, 1:]
            v, i = sae.encode(hidden)
            per_doc[d.doc_id] = (torch.zeros(len(ids), 24).scatter_(1, i, v), ids, d.text)
    order = [d.doc_id for d in docs]
    for r in records:
        doc_max = {q: float(a[:, r.feature].max()) for q, (a, _, _) in per_doc.items()}
        expect = sorted((q for q in order if doc_max[q] > 0), key=lambda q: (-doc_max[q], order.index(q)))[:4]
        got = r.extra["context_doc_ids"]
        assert [doc_max[q] for q in got] == pytest.approx([doc_max[q] for q in expect], rel=1e-4)
        for q, ctx in zip(got, r.contexts):
            acts, ids, text = per_doc[q]
            assert torch.allclose(torch.tensor(ctx.activations, dtype=torch.float32), acts[:, r.feature], rtol=1e-3, atol=1e-5)
            assert "".join(ctx.tokens) in text  # readable token strings of the document's text
        for ctx, kind in zip(r.negatives, r.extra["negative_kinds"]):
            assert kind in ("similar", "random")
            if kind == "random":
                assert ctx.activations is None and all(v == 0 for v in ctx.levels)


runner = CliRunner()


def test_cli_collect_run_resumes_and_forces(setup):
    run, corpus = setup
    args = ["collect", str(run), "--corpus", str(corpus), "--top-k", "3", "--latents", "8"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    for step in (10, 20):
        records = read_records(run / f"step-{step}/records.jsonl.zst")  # collect writes the compact form
        assert [r.feature for r in records] == list(range(8))
        assert {r.checkpoint_step for r in records} == {step} and {r.layer for r in records} == {LAYER}
    stamp = (run / "step-10/records.jsonl.zst").stat().st_mtime_ns
    result = runner.invoke(app, args)  # resumable: existing records are kept
    assert result.exit_code == 0 and (run / "step-10/records.jsonl.zst").stat().st_mtime_ns == stamp
    result = runner.invoke(app, args + ["--force", "--steps", "10", "--latents", "2"])
    assert result.exit_code == 0
    assert [r.feature for r in read_records(run / "step-10/records.jsonl.zst")] == [0, 1]
    manifest = json.loads((run / "manifest.json").read_text())
    assert "collect" in manifest["stages"]


def test_cli_collect_single_sae(setup, tmp_path):
    run, corpus = setup
    out = tmp_path / "r.jsonl"
    result = runner.invoke(app, ["collect", str(run / "step-20/sae"), "--model", str(run / "lm/step-20"),
                                 "--corpus", str(corpus), "--out", str(out), "--latents", "3-5", "--docs", "6"])
    assert result.exit_code == 0, result.output
    records = read_records(out)
    assert [r.feature for r in records] == [3, 4, 5]
    assert all(r.extra["n_tokens"] > 0 and set(r.extra["context_doc_ids"]) <= set(range(6)) for r in records)


def test_cli_collect_errors(setup, tmp_path):
    run, corpus = setup
    result = runner.invoke(app, ["collect", "--corpus", str(corpus)])
    assert result.exit_code == 2 and "Missing argument 'TARGET'" in result.output
    result = runner.invoke(app, ["collect", str(tmp_path), "--corpus", str(corpus)])
    assert isinstance(result.exception, UserError) and "is an empty folder, not a run folder" in str(result.exception)
    (tmp_path / "imported/step-5").mkdir(parents=True)
    (tmp_path / "imported/step-5/records.jsonl").write_text('{"feature": 0, "contexts": []}\n')
    result = runner.invoke(app, ["collect", str(tmp_path / "imported"), "--corpus", str(corpus)])
    assert isinstance(result.exception, UserError) and "no step-N/sae" in str(result.exception)
    bad = tmp_path / "bad"
    (bad / "step-5/sae").mkdir(parents=True)
    (bad / "step-5/sae/config.json").write_text("{}")
    result = runner.invoke(app, ["collect", str(bad), "--corpus", str(corpus), "--on-error", "skip"])
    assert isinstance(result.exception, UserError) and "1 checkpoint(s) failed" in str(result.exception)
    assert not any((bad / "step-5").glob("records.jsonl*"))
