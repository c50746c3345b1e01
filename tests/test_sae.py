"""TopK SAE: sparse kernels vs dense reference, training on a known dictionary, save/load, errors."""

from __future__ import annotations

import json

import pytest
import torch

from autointerp.errors import UserError
from autointerp.sae import SAEConfig, TopKSAE, TrainConfig, load_sae, reconstruction_metrics, save_sae, train_sae
from autointerp.sae.model import scatter_outer, sparse_decode, topk_encode
from autointerp.sae.train import geometric_median, shuffled_batches


@pytest.fixture(autouse=True)
def _one_thread():
    """Small tensors: one thread avoids spin-waiting on a shared 2-core machine (several x faster)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _rand(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_topk_encode_gradients_match_dense_reference():
    n, d, m, k, k_aux = 9, 6, 20, 4, 3
    x, w, b = _rand(n, d, seed=1), _rand(m, d, seed=2), _rand(m, seed=3) * 0.1
    aux_mask = torch.zeros(m, dtype=torch.bool)
    aux_mask[::3] = True
    r1, r2 = _rand(n, k, seed=4), _rand(n, k_aux, seed=5)

    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    values, idx, aux_values, aux_idx = topk_encode(*leaves, k, aux_mask, k_aux)
    ((values * r1).sum() + (aux_values * r2).sum()).backward()
    ours = [t.grad for t in leaves]

    ref_leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    linear = ref_leaves[0] @ ref_leaves[1].t() + ref_leaves[2]  # dense [n, m]
    pre = torch.relu(linear)
    assert torch.equal(torch.sort(idx, 1).values, torch.sort(pre.topk(k, dim=1).indices, 1).values)
    assert bool(aux_mask[aux_idx].all())
    # AuxK latents: ReLU forward, straight-through backward (dead latents sit below 0)
    aux_linear = linear.gather(1, aux_idx)
    aux_ref = aux_linear + (aux_linear.relu() - aux_linear).detach()
    torch.testing.assert_close(aux_values, aux_ref.detach())
    ((pre.gather(1, idx) * r1).sum() + (aux_ref * r2).sum()).backward()
    for got, want in zip(ours, (t.grad for t in ref_leaves)):
        torch.testing.assert_close(got, want)


def test_sparse_decode_gradients_match_dense_reference():
    n, d, m, k = 7, 5, 16, 3
    values = _rand(n, k, seed=1).requires_grad_()
    idx = torch.stack([torch.randperm(m, generator=torch.Generator().manual_seed(i))[:k] for i in range(n)])
    w = _rand(m, d, seed=2).requires_grad_()
    grad_out = _rand(n, d, seed=3)
    (sparse_decode(values, idx, w) * grad_out).sum().backward()

    values2, w2 = values.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    dense = torch.zeros(n, m, dtype=torch.float64).scatter(1, idx, values2)
    (dense @ w2 * grad_out).sum().backward()
    torch.testing.assert_close(values.grad, values2.grad)
    torch.testing.assert_close(w.grad, w2.grad)


def test_scatter_outer_handles_repeated_latents():
    idx = torch.tensor([[0, 2], [2, 1], [2, 0]])
    weights = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    dense = torch.tensor([[1.0], [10.0], [100.0]])
    out = scatter_outer(idx, weights, dense, 4)
    assert out.squeeze(1).tolist() == [1 + 600, 40, 2 + 30 + 500, 0]


def test_geometric_median_resists_outliers():
    points = torch.cat([torch.zeros(50, 3), torch.full((5, 3), 100.0)])
    assert geometric_median(points).norm() < 1.0 < points.mean(0).norm()


def test_shuffle_buffer_mixes_documents_and_keeps_every_token():
    chunks = [torch.full((64, 2), float(i)) for i in range(40)]  # 40 "documents" of 64 tokens
    batches = list(shuffled_batches(chunks, batch_size=64, buffer_tokens=1024, seed=0))
    seen = torch.cat(batches)[:, 0]
    assert len(batches) == 40 and sorted(seen.tolist()) == sorted(torch.cat(chunks)[:, 0].tolist())
    assert all(len(set(b[:, 0].tolist())) > 5 for b in batches)  # no batch is one document


def _dictionary_data(seed=1, d=32, atoms=64, active=2):
    gen = torch.Generator().manual_seed(seed)
    dictionary = torch.randn(atoms, d, generator=gen)
    dictionary /= dictionary.norm(dim=1, keepdim=True)

    def sample(n):
        idx = torch.rand(n, atoms, generator=gen).argsort(1)[:, :active]
        coef = torch.rand(n, active, generator=gen) * 1.5 + 0.5
        return (coef[:, :, None] * dictionary[idx]).sum(1)
    return dictionary, sample


def test_recovers_known_dictionary():
    dictionary, sample = _dictionary_data()
    chunks = [sample(1000) for _ in range(60)]
    sae, result = train_sae(chunks, SAEConfig(d_model=32, d_sae=128, k=4),
                            TrainConfig(batch_size=256, lr=1e-2, dead_tokens=1280, buffer_tokens=16384))
    metrics = reconstruction_metrics(sae, [sample(4000)])
    cosine = (dictionary @ sae.W_dec.detach().t()).max(dim=1).values
    assert metrics["fvu"] < 0.05, metrics
    assert (cosine > 0.9).float().mean() > 0.8, cosine
    assert metrics["l0"] <= 4 and result.tokens == 60_000 - 60_000 % 256
    # decoder atoms stay unit norm
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(128))


def test_training_is_deterministic():
    _, sample = _dictionary_data(seed=3, d=16, atoms=32)
    chunks = [sample(500) for _ in range(8)]
    cfg = SAEConfig(d_model=16, d_sae=64, k=4)
    runs = [train_sae(chunks, cfg, TrainConfig(batch_size=500, seed=7))[0] for _ in range(2)]
    assert torch.equal(runs[0].W_enc, runs[1].W_enc) and torch.equal(runs[0].b_dec, runs[1].b_dec)


def test_auxk_revives_dead_latents():
    """Half the latents start with b_enc = -2 (never fire): only the AuxK loss brings some back."""
    _, sample = _dictionary_data(seed=4, d=16, atoms=32)
    chunks = [sample(1000) for _ in range(30)]
    cfg = SAEConfig(d_model=16, d_sae=64, k=4)
    revived = {}
    for alpha in (0.0, 1.0):
        sae = TopKSAE(cfg, seed=0)
        with torch.no_grad():
            sae.b_enc[32:] = -2.0
        sae, _ = train_sae(chunks, cfg, TrainConfig(batch_size=500, lr=1e-2, dead_tokens=2000, auxk_alpha=alpha),
                           sae=sae)
        values, indices = sae.encode(sample(5000))
        revived[alpha] = int((indices[values > 0] >= 32).sum())
    assert revived[0.0] == 0 < revived[1.0], revived


def test_forward_returns_inputs_scale():
    sae = TopKSAE(SAEConfig(d_model=8, d_sae=32, k=32))  # k = d_sae: every latent may fire
    x = _rand(4, 8, dtype=torch.float32) * 50
    out = sae(x)
    assert out.shape == x.shape
    # same direction reconstruction, scaled back by each input's norm
    unit = sae.decode(*sae.encode(x))
    torch.testing.assert_close(out, unit * x.norm(dim=1, keepdim=True))


def test_save_load_round_trip_is_exact(tmp_path):
    cfg = SAEConfig(d_model=12, d_sae=48, k=5, model="m", revision="r", layer=1, checkpoint_step=100)
    sae = TopKSAE(cfg, seed=3)
    with torch.no_grad():
        sae.b_enc.normal_()
        sae.b_dec.normal_()
    save_sae(sae, tmp_path / "sae")
    loaded = load_sae(tmp_path / "sae")
    assert loaded.cfg == cfg
    for a, b in zip(sae.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)
    x = _rand(10, 12, dtype=torch.float32)
    for a, b in zip(sae.encode(x), loaded.encode(x)):
        assert torch.equal(a, b)


def test_bad_inputs_are_one_line_user_errors(tmp_path):
    sae = TopKSAE(SAEConfig(d_model=8, d_sae=16, k=4))
    save_sae(sae, tmp_path / "ok")
    with pytest.raises(UserError, match="k=20 > d_sae=16"):
        SAEConfig(d_model=8, d_sae=16, k=20)

    # truncated safetensors
    (tmp_path / "trunc").mkdir()
    (tmp_path / "trunc" / "config.json").write_text((tmp_path / "ok" / "config.json").read_text())
    data = (tmp_path / "ok" / "sae.safetensors").read_bytes()
    (tmp_path / "trunc" / "sae.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="corrupt or truncated"):
        load_sae(tmp_path / "trunc")

    # config shapes do not match the weights
    cfg = json.loads((tmp_path / "ok" / "config.json").read_text())
    cfg["d_sae"] = 32
    (tmp_path / "ok" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="shape"):
        load_sae(tmp_path / "ok")

    with pytest.raises(UserError, match="no such"):
        load_sae(tmp_path / "missing")

    with pytest.raises(UserError, match="d_model 9"):
        reconstruction_metrics(sae, [torch.zeros(3, 9)])


def test_pickle_refused_unless_trusted(tmp_path):
    sae = TopKSAE(SAEConfig(d_model=8, d_sae=16, k=4), seed=1)
    save_sae(sae, tmp_path)
    (tmp_path / "sae.safetensors").unlink()  # leave only the pickle + config
    torch.save(sae.state_dict(), tmp_path / "sae.pt")
    for target in (tmp_path, tmp_path / "sae.pt"):
        with pytest.raises(UserError, match="--trust-pickle"):
            load_sae(target)
    loaded = load_sae(tmp_path / "sae.pt", trust_pickle=True)
    x = _rand(5, 8, dtype=torch.float32)
    assert torch.equal(loaded.encode(x)[1], sae.encode(x)[1])
