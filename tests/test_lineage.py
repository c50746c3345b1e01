"""Feature lineage: sparse accumulation, matching, the null threshold, decisions, the report view."""

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from autointerp import run as runlib
from autointerp.cli import app
from autointerp.errors import UserError
from autointerp.jsonl import write_jsonl
from autointerp.lineage import match as lineage
from autointerp.lineage import sites, view
from autointerp.lineage.match import Codes, LineageRow
from autointerp.run import Site


def random_codes(n_tokens: int, n_latents: int, k: int, seed: int, zipf: float = 1.1) -> Codes:
    """TopK-like codes: k distinct latents per token, skewed frequencies, some zero slots."""
    gen = torch.Generator().manual_seed(seed)
    weights = 1.0 / torch.arange(1, n_latents + 1, dtype=torch.float64) ** zipf
    idx = torch.multinomial(weights.expand(n_tokens, -1), k, replacement=False, generator=gen)
    vals = torch.rand(n_tokens, k, generator=gen) * 3
    vals[torch.rand(n_tokens, k, generator=gen) < 0.1] = 0.0  # fewer than k positive on some tokens
    return Codes(vals.float(), idx.to(torch.int32), n_latents)


def test_moments_and_sparse_cross_products_equal_a_dense_computation(one_thread):
    a, b = random_codes(300, 40, 5, seed=1), random_codes(300, 30, 4, seed=2)
    dense = lineage.dense_correlation(a, b)
    # tiny blocks and chunks: many groups and sub-chunks must add up to the same numbers
    m = lineage.match(a, b, group_bytes=8 * 30 * 3, entries_per_chunk=7)
    finite = torch.nan_to_num(dense, nan=-math.inf)
    top = finite.topk(2, dim=0)
    live_b = m.moments_b.live
    assert live_b.sum() > 20
    torch.testing.assert_close(m.best_corr[live_b], top.values[0][live_b], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(m.second_corr[live_b], top.values[1][live_b], rtol=1e-9, atol=1e-9)
    assert torch.equal(m.best[live_b], top.indices[0][live_b])
    # population moments equal the dense ones
    x = torch.zeros(300, 40, dtype=torch.float64).scatter_add_(1, a.indices.long(), a.values.double())
    torch.testing.assert_close(m.moments_a.mean, x.mean(0))
    torch.testing.assert_close(m.moments_a.std, x.std(0, unbiased=False))


def test_a_shuffled_token_order_is_the_same_as_shuffling_b_itself(one_thread):
    a, b = random_codes(200, 25, 4, seed=3), random_codes(200, 25, 4, seed=4)
    perm = torch.randperm(200, generator=torch.Generator().manual_seed(0))
    via_order = lineage.match(a, b, b_order=perm)
    shuffled = Codes(b.values[perm], b.indices[perm], b.n_latents)
    direct = lineage.match(a, shuffled)
    torch.testing.assert_close(via_order.best_corr, direct.best_corr)


def test_permuted_self_match_recovers_the_permutation_exactly(one_thread):
    a = random_codes(2000, 64, 6, seed=5)
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(1))
    b = a.permuted(perm)  # latent i of A is latent perm[i] of B
    result = lineage.lineage_pair(a, b, 10, 100)
    live = result.rows
    assert len(live) == int(lineage.moments(a).live.sum()) > 50
    inverse = torch.argsort(perm)
    for row in live:
        assert not row.new
        assert row.parent_feature == int(inverse[row.feature])
        assert row.correlation == pytest.approx(1.0, abs=1e-4)


def test_margin_and_new_decisions_on_a_constructed_case(one_thread):
    # 400 tokens; A has latents 0,1,2 with known patterns; B latent 0 copies A0, B latent 1 is
    # half A1 half A2 (ambiguous parent: small margin), B latent 2 is independent noise (new).
    gen = torch.Generator().manual_seed(0)
    T = 4000
    fire = torch.rand(T, 3, generator=gen) < 0.2
    a_vals = fire.float() * (1 + torch.rand(T, 3, generator=gen))
    a = Codes(a_vals, torch.arange(3, dtype=torch.int32).expand(T, 3).contiguous(), 3)
    b0 = a_vals[:, 0]
    b1 = torch.where(torch.arange(T) % 2 == 0, a_vals[:, 1], a_vals[:, 2])
    b2 = (torch.rand(T, generator=gen) < 0.2).float() * (1 + torch.rand(T, generator=gen))
    b = Codes(torch.stack([b0, b1, b2], 1), torch.arange(3, dtype=torch.int32).expand(T, 3).contiguous(), 3)
    rows = {r.feature: r for r in lineage.lineage_pair(a, b, 1, 2, quantile=0.99, bins=1).rows}

    m = lineage.match(a, b)
    dense = lineage.dense_correlation(a, b)
    assert rows[0].parent_feature == 0 and not rows[0].new
    assert rows[0].correlation == pytest.approx(1.0, abs=1e-6)
    assert rows[0].margin == pytest.approx(float(dense[0, 0] - dense[1:, 0].max()), abs=1e-4)
    assert rows[1].parent_feature in (1, 2) and not rows[1].new
    assert rows[1].margin == pytest.approx(abs(float(dense[1, 1] - dense[2, 1])), abs=1e-4)
    assert rows[1].margin < 0.1 < rows[0].margin  # ambiguous vs clear parent
    assert rows[2].new and rows[2].parent_feature is None
    assert rows[2].candidate_feature == int(m.best[2])
    assert rows[2].correlation <= rows[2].threshold


def test_new_is_decided_against_the_threshold():
    m = lineage.Match(best=torch.tensor([0, 1, -1]), best_corr=torch.tensor([0.5, 0.2, -math.inf], dtype=torch.float64),
                      second=torch.tensor([1, 0, -1]), second_corr=torch.tensor([0.1, -math.inf, -math.inf], dtype=torch.float64),
                      moments_a=None, moments_b=lineage.Moments(10, torch.ones(3), torch.ones(3), torch.ones(3, dtype=torch.long)))
    rows = lineage.decide(m, torch.tensor([0.3, 0.3, 0.3], dtype=torch.float64), 1, 2)
    assert [r.new for r in rows] == [False, True, True]
    assert rows[0].parent_feature == 0 and rows[0].margin == pytest.approx(0.4)
    assert rows[1].parent_feature is None and rows[1].candidate_feature == 1 and rows[1].margin is None
    assert rows[2].candidate_feature is None


def test_null_threshold_is_per_firing_band():
    fired = torch.tensor([1] * 50 + [100] * 50)
    null_best = torch.cat([torch.linspace(0.5, 0.9, 50), torch.linspace(0.01, 0.05, 50)]).double()
    thr, bands = lineage.null_thresholds(null_best, fired, torch.ones(100, dtype=torch.bool), quantile=0.9, bins=4)
    assert len(bands) == 2
    assert 0.8 < float(thr[0]) < 0.9 and 0.04 < float(thr[-1]) <= 0.05
    assert sum(b["latents"] for b in bands) == 100


def _row(feature, parent, new):
    return LineageRow(checkpoint_step=2, feature=feature, parent_step=1, parent_feature=None if new else parent,
                      correlation=0.9, margin=0.1, new=new, candidate_feature=parent, second_feature=None,
                      threshold=0.2, fired=5)


def test_transition_matrix_counts_add_up_to_the_live_latents():
    rows = [_row(0, 0, False), _row(1, 0, False), _row(2, 1, False), _row(3, 2, True), _row(4, 7, False)]
    class_a = {0: "token", 1: "concept-semantic", 2: "token"}  # 7 has no class -> unknown
    class_b = {0: "token", 1: "concept-synonym", 2: "concept-semantic", 3: "uninterpretable", 4: "token"}
    matrix = view.transition_matrix(rows, class_a, class_b)
    assert sum(sum(row.values()) for row in matrix.values()) == len(rows)
    assert matrix["token"] == {"token": 1, "concept-synonym": 1}
    assert matrix["new"] == {"uninterpretable": 1}
    assert matrix["unknown"] == {"token": 1}


def test_lineage_on_imported_records_says_why_in_one_line(tmp_path):
    (tmp_path / "step-10").mkdir()
    (tmp_path / "step-10" / "records.jsonl").write_text("")
    result = CliRunner().invoke(app, ["lineage", str(tmp_path)])
    assert result.exit_code != 0
    assert isinstance(result.exception, UserError)
    assert "records alone" in str(result.exception) and "\n" not in str(result.exception)


def test_rows_round_trip_through_jsonl(tmp_path):
    rows = [_row(0, 3, False), _row(1, 4, True)]
    (tmp_path / "step-2").mkdir()
    write_jsonl(tmp_path / "step-2" / "lineage.jsonl", rows)
    back = view.read_rows(tmp_path, Site(step=2))
    assert back == rows
    assert json.loads((tmp_path / "step-2" / "lineage.jsonl").read_text().splitlines()[1])["parent_feature"] is None


# --------------------------------------------------------------------------- end to end on a tiny run

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Two checkpoints of one tiny Llama; step 20's SAE is step 10's with its latents permuted, so
    the lineage the CLI finds must be exactly that permutation."""
    import shutil

    from test_sae_cli import tiny_corpus, tiny_llama

    from autointerp.sae import SAEConfig, TopKSAE, save_sae

    root = tmp_path_factory.mktemp("lineage")
    corpus = tiny_corpus(root / "corpus.txt", n=60)
    run = root / "run"
    tiny_llama(run / "lm" / "step-10", corpus)
    shutil.copytree(run / "lm" / "step-10", run / "lm" / "step-20")
    sae = TopKSAE(SAEConfig(d_model=16, d_sae=48, k=4, model="unused", layer=0, checkpoint_step=10), seed=0)
    with torch.no_grad():
        sae.b_enc.uniform_(-0.1, 0.1)
    save_sae(sae, run / "step-10" / "sae")
    perm = torch.randperm(48, generator=torch.Generator().manual_seed(3))  # old latent i -> new latent perm[i]
    moved = TopKSAE(SAEConfig(d_model=16, d_sae=48, k=4, model="unused", layer=0, checkpoint_step=20), seed=None)
    inverse = torch.argsort(perm)
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec"):
            getattr(moved, name).copy_(getattr(sae, name)[inverse])
        moved.b_dec.copy_(sae.b_dec)
    save_sae(moved, run / "step-20" / "sae")
    collected = CliRunner().invoke(app, ["collect", str(run), "--corpus", str(corpus), "--top-k", "5"])
    assert collected.exit_code == 0, collected.output  # records: the report's cards and classes
    return run, corpus, perm


def test_cli_lineage_recovers_a_permuted_sae_and_the_report_links_it(tiny_run, one_thread):
    from autointerp.report.build import build_report

    run, corpus, perm = tiny_run
    result = CliRunner().invoke(app, ["lineage", str(run), "--corpus", str(corpus), "--sample", "all"])
    assert result.exit_code == 0, result.output
    rows = view.read_rows(run, Site(step=20))
    meta = view.read_meta(run, Site(step=20))
    assert rows and meta["live_b"] == len(rows) and meta["tokens"] > 500
    assert all(not r.new and r.parent_step == 10 and r.parent_feature == int(torch.argsort(perm)[r.feature])
               and r.correlation == pytest.approx(1.0, abs=1e-4) for r in rows)
    assert "10 -> 20" in result.output
    # a second run with the same settings is skipped; --force redoes it
    stamp = (run / "step-20" / "lineage.jsonl").stat().st_mtime_ns
    assert CliRunner().invoke(app, ["lineage", str(run), "--corpus", str(corpus), "--sample", "all"]).exit_code == 0
    assert (run / "step-20" / "lineage.jsonl").stat().st_mtime_ns == stamp

    index = build_report(run)
    html = index.read_text()
    assert 'id="lineage"' in html and f"<b>{len(rows)}</b>" in html  # the matrix total is every live latent
    page20 = (index.parent / "step-20.html").read_text()
    row = rows[0]
    assert f'href="step-10.html#f{row.parent_feature}"' in page20
    page10 = (index.parent / "step-10.html").read_text()
    assert f'href="step-20.html#f{row.feature}"' in page10 and f'id="f{row.parent_feature}"' in page10


def test_classes_come_from_labels_where_labelled_else_the_statistical_decision(tiny_run):
    from autointerp.records.read import read_records
    from autointerp.schema import Label

    run = tiny_run[0]
    records = read_records(runlib.records_file(run / "step-10"))
    first = view.latent_classes(run, Site(step=10))
    assert len(first) == len(records) and {c.source for c in first.values()} == {"stats"}
    assert (run / "step-10" / view.CLASSES_CACHE).exists()
    feature = records[0].feature
    other = "concept-synonym" if first[feature].granularity != "concept-synonym" else "token"
    labels = run / "step-10" / "labels.jsonl"
    write_jsonl(labels, [Label(checkpoint_step=10, feature=feature, description="", granularity=other,
                               cross_lingual=False, language="en", language_profile={}, scores={},
                               confidence=1.0, explainer={})])
    try:
        again = view.latent_classes(run, Site(step=10))  # the cache is keyed on labels.jsonl too
        assert again[feature].granularity == other and again[feature].source == "label"
        assert sum(c.source == "stats" for c in again.values()) == len(records) - 1
    finally:
        labels.unlink()


def test_checkpoints_without_a_local_lm_use_the_model_and_revision_in_the_sae_config(tmp_path):
    # a run over Hugging Face revisions: no RUN/lm/step-N, the SAE config names the hub model
    for step in (1000, 2000):
        folder = tmp_path / f"step-{step}" / "sae"
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps({"model": "EleutherAI/pythia-70m", "revision": f"step{step}",
                                                        "layer": 3, "d_model": 512, "d_sae": 8192, "k": 32}))
    found = sites.find_sites(tmp_path)
    assert [(c.step, c.model, c.revision, c.layer) for c in found] == [
        (1000, "EleutherAI/pythia-70m", "step1000", 3), (2000, "EleutherAI/pythia-70m", "step2000", 3)]
    (tmp_path / "lm" / "step-1000").mkdir(parents=True)  # a local checkpoint wins, as in collect
    assert sites.find_sites(tmp_path)[0].model == str(tmp_path / "lm" / "step-1000")
    (tmp_path / "step-2000" / "sae" / "config.json").write_text(json.dumps({"layer": 3}))
    with pytest.raises(UserError, match="no LM for step 2000"):
        sites.find_sites(tmp_path)


def test_layers_of_one_model_are_matched_layer_to_layer_from_one_pass(tiny_run, tmp_path, monkeypatch, one_thread):
    """A run of one model's layers (layer-0, layer-1): lineage matches layer 1's latents to layer
    0's. The tiny Llama's decoder layer 1 is made the identity (its attention and MLP outputs
    zeroed), so its residual stream equals layer 0's; layer 1's SAE is layer 0's with its latents
    permuted, and lineage must recover the permutation, from one forward pass for both layers."""

    from autointerp.lm import activations
    from autointerp.lm.activations import load_lm
    from autointerp.sae import SAEConfig, TopKSAE, load_sae, save_sae

    run, corpus, _ = tiny_run
    model, tokenizer = load_lm(str(run / "lm" / "step-10"))
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight.zero_()
        model.model.layers[1].mlp.down_proj.weight.zero_()
    lm = tmp_path / "lm-identity-layer-1"
    model.save_pretrained(lm)
    tokenizer.save_pretrained(lm)
    layers_run = tmp_path / "layers"
    sae0 = load_sae(run / "step-10" / "sae")
    sae0.cfg.model, sae0.cfg.checkpoint_step = str(lm), None
    save_sae(sae0, layers_run / "layer-0" / "sae")
    perm = torch.randperm(48, generator=torch.Generator().manual_seed(5))
    moved = TopKSAE(SAEConfig(d_model=16, d_sae=48, k=4, model=str(lm), layer=1), seed=None)
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec"):
            getattr(moved, name).copy_(getattr(sae0, name)[torch.argsort(perm)])
        moved.b_dec.copy_(sae0.b_dec)
    save_sae(moved, layers_run / "layer-1" / "sae")
    passes = []
    real = activations.iter_activations

    def counted(*args, **kwargs):
        passes.append(args[3])
        return real(*args, **kwargs)

    monkeypatch.setattr(activations, "iter_activations", counted)
    result = CliRunner().invoke(app, ["lineage", str(layers_run), "--corpus", str(corpus), "--sample", "all"])
    assert result.exit_code == 0, result.output
    assert passes == [[0, 1]]  # both layers' codes from one forward pass
    rows = view.read_rows(layers_run, Site(layer=1))
    meta = view.read_meta(layers_run, Site(layer=1))
    assert rows and meta["parent_layer"] == 0 and meta["layer"] == 1 and meta["parent_step"] is None
    assert all(not r.new and r.parent_layer == 0 and r.layer == 1
               and r.parent_feature == int(torch.argsort(perm)[r.feature])
               and r.correlation == pytest.approx(1.0, abs=1e-4) for r in rows)
    assert "layer 0 -> 1" in result.output
    assert not (layers_run / "layer-0" / "lineage.jsonl").exists()  # the first layer has no parent
