"""The SAE metrics by SAELens's definitions, checked against computations written out here: which
positions each figure averages over, zero-ablation of every position, reconstruction at the LM's
own scale, dead and dense latents, the firing-density histogram. tests/test_saelens_parity.py
checks the same figures against SAELens's own run_evals."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from autointerp.sae.metrics import (DENSE, DEFINITIONS, density_histogram, measure_sae, reconstruction_metrics,
                                    replace_layer_output, special_token_ids)
from autointerp.sae.model import SAEConfig, TopKSAE

BOS, PAD, VOCAB = 0, 2, 50


def exact_sae(d: int) -> TopKSAE:
    """A real TopK SAE whose reconstruction is exact: atoms +e_i and -e_i, k = d (for each
    dimension one of the two fires with |x_i|), raw inputs."""
    sae = TopKSAE(SAEConfig(d_model=d, d_sae=2 * d, k=d, normalize_input=False), seed=None)
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye]))
        sae.W_dec.copy_(torch.cat([eye, -eye]))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def zero_sae(d: int) -> TopKSAE:
    """An SAE whose reconstruction is 0 everywhere."""
    sae = exact_sae(d)
    with torch.no_grad():
        sae.W_dec.zero_()
    return sae


def _tiny_lm():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2,
                                        initializer_range=0.5)).eval()  # peaked distributions


def _batch():
    """BOS first; row 1 holds a PAD mid-text (a special token, left out wherever it stands); row 2
    is padded from position 8."""
    ids = torch.randint(3, VOCAB, (3, 12), generator=torch.Generator().manual_seed(1))
    ids[:, 0] = BOS
    ids[1, 5] = PAD
    mask = torch.ones_like(ids)
    mask[2, 8:] = 0
    ids[2, 8:] = PAD
    return ids, mask


def _log_probs(model, ids, mask, fn=None, layer=0):
    with torch.no_grad():
        if fn is None:
            return F.log_softmax(model(input_ids=ids, attention_mask=mask).logits, -1)
        with replace_layer_output(model, layer, fn):
            return F.log_softmax(model(input_ids=ids, attention_mask=mask).logits, -1)


def test_each_figure_averages_over_the_positions_saelens_uses():
    """CE over positions whose input is a text token and that have a next token; KL over every
    text position (the last one too); the SAE spliced in at text tokens only; zero-ablation at
    every position, BOS included."""
    model, (ids, mask) = _tiny_lm(), _batch()
    result = measure_sae(zero_sae(16), model, 0, [(ids, mask)], [BOS, PAD])
    text = mask.bool() & (ids != BOS) & (ids != PAD)
    ce_at = text[:, :-1] & mask[:, 1:].bool()
    targets = ids[:, 1:][ce_at]
    clean = _log_probs(model, ids, mask)
    spliced = _log_probs(model, ids, mask, lambda h: torch.where(text[..., None], 0.0, h))
    zeroed = _log_probs(model, ids, mask, torch.zeros_like)

    def ce(lp):
        return float(F.nll_loss(lp[:, :-1][ce_at], targets))

    def kl(lp):
        return float(F.kl_div(lp[text], clean[text], log_target=True, reduction="batchmean"))

    assert result["eval_tokens"] == int(text.sum()) and result["ce_tokens"] == int(ce_at.sum())
    assert result["ce_loss_without_sae"] == pytest.approx(ce(clean), rel=1e-5)
    assert result["ce_loss_with_sae"] == pytest.approx(ce(spliced), rel=1e-5)
    assert result["ce_loss_with_ablation"] == pytest.approx(ce(zeroed), rel=1e-5)
    assert result["kl_div_with_sae"] == pytest.approx(kl(spliced), rel=1e-5)
    assert result["kl_div_with_ablation"] == pytest.approx(kl(zeroed), rel=1e-5)
    # BOS keeps its activation under the splice, not under the ablation: the two differ
    assert abs(result["ce_loss_with_sae"] - result["ce_loss_with_ablation"]) > 0.01
    gap = result["ce_loss_with_ablation"] - result["ce_loss_without_sae"]
    assert result["ce_loss_score"] == pytest.approx((result["ce_loss_with_ablation"] - result["ce_loss_with_sae"]) / gap)
    assert result["kl_div_score"] == pytest.approx(1 - result["kl_div_with_sae"] / result["kl_div_with_ablation"])
    assert set(result["definitions"]) <= set(DEFINITIONS) and result["definitions"]["kl_div_score"].startswith("SAELens")


def test_an_exact_reconstruction_changes_nothing():
    model, (ids, mask) = _tiny_lm(), _batch()
    result = measure_sae(exact_sae(16), model, 1, [(ids, mask)], [BOS, PAD])
    assert result["kl_div_with_sae"] == pytest.approx(0.0, abs=1e-6) and result["kl_div_score"] == pytest.approx(1.0)
    assert result["kl_div_with_ablation"] > 0.01 and result["ce_loss_score"] == pytest.approx(1.0)
    assert result["explained_variance"] == pytest.approx(1.0) and result["mse"] == pytest.approx(0.0, abs=1e-9)
    assert result["cossim"] == pytest.approx(1.0) and result["l2_ratio"] == pytest.approx(1.0)


def test_reconstruction_is_measured_at_the_lms_scale_and_unit_norm_ev_apart():
    sae = TopKSAE(SAEConfig(d_model=8, d_sae=16, k=2, normalize_input=True), seed=0)
    with torch.no_grad():
        sae.b_enc.zero_()
        sae.b_enc[3] = 100.0  # latent 3 wins on every token: dense
        sae.b_enc[4:] = -100.0  # latents 4.. never fire: dead
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(400, 8, generator=gen) * torch.rand(400, 1, generator=gen) * 20 + 3.0  # norms vary
    m = reconstruction_metrics(sae, [x[:200], x[200:]])
    with torch.no_grad():
        x_hat = sae(x)
        values, _ = sae.encode(x)
    ev = 1 - (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    unit = x / x.norm(dim=1, keepdim=True)
    unit_hat = x_hat / x.norm(dim=1, keepdim=True)
    unit_ev = 1 - (unit - unit_hat).pow(2).sum() / (unit - unit.mean(0)).pow(2).sum()
    assert m["explained_variance"] == pytest.approx(float(ev), rel=1e-5) and m["fvu"] == pytest.approx(1 - float(ev))
    assert m["explained_variance_unit_norm"] == pytest.approx(float(unit_ev), rel=1e-5)
    assert abs(m["explained_variance"] - m["explained_variance_unit_norm"]) > 0.01  # two different figures
    assert m["mse"] == pytest.approx(float((x - x_hat).pow(2).sum(1).mean()), rel=1e-5)
    assert m["cossim"] == pytest.approx(float(F.cosine_similarity(x_hat, x, dim=-1).mean()), rel=1e-5)
    assert m["l2_ratio"] == pytest.approx(float((x_hat.norm(dim=-1) / x.norm(dim=-1)).mean()), rel=1e-5)
    assert m["l0"] == pytest.approx(float((values != 0).sum(1).float().mean())) and 1 <= m["l0"] <= 2
    assert m["l1"] == pytest.approx(float(values.abs().sum(1).mean()), rel=1e-5) and m["eval_tokens"] == 400
    assert m["dead_fraction"] == pytest.approx(12 / 16) and m["dense_fraction"] >= 1 / 16
    hist = m["density_histogram"]
    assert sum(hist["counts"]) + hist["never"] == 16 and hist["never"] == 12
    assert hist["counts"][-1] >= 1  # latent 3 fires on every token: density 1, the top bin


def test_only_structural_special_tokens_are_left_out():
    """As SAELens's get_special_token_ids: BOS, EOS, PAD (and SEP, decoder start), not the
    tokenizer's additional special tokens, which can be text."""
    from autointerp.lm.train import train_tokenizer

    tokenizer = train_tokenizer(["the cat sat on a mat", "dogs run in parks"] * 10, vocab_size=100)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<extra>"]})
    extra = tokenizer.convert_tokens_to_ids("<extra>")
    assert extra in tokenizer.all_special_ids
    assert special_token_ids(tokenizer) == sorted({tokenizer.bos_token_id, tokenizer.eos_token_id,
                                                   tokenizer.pad_token_id})


def test_density_histogram_bins_on_a_log_scale():
    density = torch.tensor([0.0, 1e-6, 1e-3, 0.05, 0.2, 1.0], dtype=torch.float64)
    hist = density_histogram(density)
    edges = hist["log10_edges"]
    assert hist["never"] == 1 and sum(hist["counts"]) == 5 and len(hist["counts"]) == len(edges) - 1

    def bin_of(d):
        return max(i for i, e in enumerate(edges[:-1]) if torch.tensor(d).log10() >= e)

    for d in (1e-6, 1e-3, 0.05, 0.2):
        assert hist["counts"][bin_of(d)] >= 1
    assert DENSE == 0.1


def test_the_table_leaves_out_figures_an_older_metrics_json_holds_by_earlier_definitions():
    """`sae train` prints the metrics.json of SAEs already done: one written before SAELens's
    definitions has an explained_variance on unit-norm inputs, not shown under "EV"."""
    from rich.console import Console

    from autointerp.sae.metrics import metrics_table

    def rendered(m):
        console = Console(width=250, record=True)
        console.print(metrics_table([("sae", m)]))
        return console.export_text()

    old = {"explained_variance": 0.745, "l0": 32.0, "dead_fraction": 0.149}
    assert "0.745" not in rendered(old) and "32.0" in rendered(old)
    assert "0.745" in rendered({**old, "definitions": {}})
