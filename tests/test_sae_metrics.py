"""The SAE core metrics (SAEBench's): KL and CE scores through the real LM head, cosine and L2
ratio of reconstructions, dense and dead latents, the firing-density histogram."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from autointerp.sae.metrics import DENSE, delta_ce, density_histogram, reconstruction_metrics
from autointerp.sae.model import SAEConfig, TopKSAE


def _tiny_lm():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2,
                                        initializer_range=0.5)).eval()  # peaked distributions


class _Identity(torch.nn.Module):
    """An "SAE" whose reconstruction is exact."""

    device = torch.device("cpu")

    def forward(self, x):
        return x


class _Shifted(_Identity):
    def forward(self, x):
        return x + 0.3


def _batch():
    ids = torch.randint(1, 50, (3, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[2, 8:] = 0  # padding is never a target
    return ids, mask


def test_a_perfect_reconstruction_changes_nothing_and_zeroing_recovers_nothing():
    model, (ids, mask) = _tiny_lm(), _batch()
    perfect = delta_ce(model, _Identity(), 0, [(ids, mask)])
    assert perfect["kl_sae"] == pytest.approx(0.0, abs=1e-6) and perfect["kl_score"] == pytest.approx(1.0)
    assert perfect["kl_zero"] > 0.01 and perfect["ce_loss_recovered"] == pytest.approx(1.0)

    class Zero(_Identity):
        def forward(self, x):
            return torch.zeros_like(x)

    zeroed = delta_ce(model, Zero(), 0, [(ids, mask)])
    assert zeroed["kl_score"] == pytest.approx(0.0, abs=1e-6) and zeroed["kl_sae"] == pytest.approx(zeroed["kl_zero"])


def test_kl_is_the_mean_kl_divergence_over_the_real_next_token_positions():
    from autointerp.sae.metrics import replace_layer_output

    model, (ids, mask) = _tiny_lm(), _batch()
    result = delta_ce(model, _Shifted(), 1, [(ids, mask)])
    with torch.no_grad():
        clean = F.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1], -1)
        with replace_layer_output(model, 1, lambda h: h + 0.3):
            scaled = F.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1], -1)
    keep = mask[:, 1:].bool()
    expected = F.kl_div(scaled[keep], clean[keep], log_target=True, reduction="batchmean")
    assert result["kl_sae"] == pytest.approx(float(expected), rel=1e-5)
    assert 0 < result["kl_score"] < 1


def test_positions_outside_the_splice_mask_keep_their_activations():
    """BOS and other special tokens are not spliced (SAEBench's rule): a reconstruction that only
    differs at a position left out of the mask changes nothing."""
    model, (ids, mask) = _tiny_lm(), _batch()
    where = mask.bool().clone()
    where[:, 0] = False

    class BreaksFirst(_Identity):
        def forward(self, x):  # x: [B*T, d]; the first position of each row gets garbage
            out = x.clone()
            out.view(3, 12, -1)[:, 0] = 100.0
            return out

    kept = delta_ce(model, BreaksFirst(), 0, [(ids, mask, where)])
    spliced = delta_ce(model, BreaksFirst(), 0, [(ids, mask)])
    assert kept["kl_sae"] == pytest.approx(0.0, abs=1e-6) and spliced["kl_sae"] > 0.01


def test_reconstruction_space_density_and_dense_latents():
    sae = TopKSAE(SAEConfig(d_model=8, d_sae=16, k=2, normalize_input=True), seed=0)
    with torch.no_grad():
        sae.b_enc.zero_()
        sae.b_enc[3] = 100.0  # latent 3 wins on every token: dense
        sae.b_enc[4:] = -100.0  # latents 4.. never fire: dead
    x = torch.randn(400, 8, generator=torch.Generator().manual_seed(0)) * 7.0
    m = reconstruction_metrics(sae, [x[:200], x[200:]])
    hist = m["density_histogram"]
    assert sum(hist["counts"]) + hist["never"] == 16 and hist["never"] == 12
    assert hist["counts"][-1] >= 1  # latent 3 fires on every token: density 1, the top bin
    assert m["dead_fraction"] == pytest.approx(12 / 16) and m["dense_fraction"] >= 1 / 16
    with torch.no_grad():
        raw_hat = sae(x)
    cos = F.cosine_similarity(raw_hat, x, dim=-1).mean()
    assert m["cosine_similarity"] == pytest.approx(float(cos), rel=1e-5)  # in the model's own space
    assert m["l2_ratio"] == pytest.approx(float((raw_hat.norm(dim=-1) / x.norm(dim=-1)).mean()), rel=1e-5)


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
