"""Feature records: the streaming top-k equals brute force; levels; negatives; dead latents."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from autointerp.records.cli import parse_latents
from autointerp.records.collect import collect_from_batches, quantise
from autointerp.sae.model import SAEConfig, TopKSAE


@dataclass
class Batch:  # the ActivationBatch interface (acts, input_ids, mask, doc_ids)
    acts: torch.Tensor
    input_ids: torch.Tensor
    mask: torch.Tensor
    doc_ids: list[int]


D_MODEL, D_SAE, K_SAE = 16, 48, 4


def make_corpus(n_docs=37, T=12, seed=0):
    """Random activations with ragged lengths (right padding), 7 docs a batch."""
    gen = torch.Generator().manual_seed(seed)
    acts = torch.randn(n_docs, T, D_MODEL, generator=gen)
    lengths = torch.randint(3, T + 1, (n_docs,), generator=gen)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    mask[::2, 0] = False  # a BOS-like leading token that is not text, as iter_activations masks it
    ids = torch.randint(0, 50, (n_docs, T), generator=gen)
    batches = [Batch(acts[i:i + 7], ids[i:i + 7], mask[i:i + 7], list(range(100 + i, 100 + min(i + 7, n_docs))))
               for i in range(0, n_docs, 7)]
    return acts, ids, mask, batches


def make_sae(seed=0):
    sae = TopKSAE(SAEConfig(d_model=D_MODEL, d_sae=D_SAE, k=K_SAE, normalize_input=True), seed=seed)
    with torch.no_grad():
        sae.b_enc.fill_(-0.1)  # some latents silent in some contexts
    return sae


def dense_acts(sae, x):
    values, indices = sae.encode(x)
    return torch.zeros(x.shape[0], D_SAE).scatter_(1, indices, values)


def decode(ids):
    return [f"t{i}" for i in ids]


def run_collect(batches, sae, n_docs, **kw):
    return collect_from_batches(batches, sae, decode, n_docs=n_docs, layer=0, model="tiny", **kw)


def test_topk_equals_brute_force():
    acts, ids, mask, batches = make_corpus()
    sae = make_sae()
    top_k = 5
    records = run_collect(batches, sae, len(acts), top_k=top_k, n_similar=3, n_random=4)
    assert [r.feature for r in records] == list(range(D_SAE))
    with torch.no_grad():
        per_doc = [dense_acts(sae, acts[q][mask[q]]) for q in range(len(acts))]  # [len_q, D_SAE]
    n_tokens = int(mask.sum())
    for r in records:
        j = r.feature
        doc_max = torch.tensor([float(a[:, j].max()) for a in per_doc])
        # brute force: by max activation, ties to the earlier document; only contexts that fire
        order = sorted((q for q in range(len(acts)) if doc_max[q] > 0), key=lambda q: (-doc_max[q], q))
        assert r.extra["context_doc_ids"] == [100 + q for q in order[:top_k]]
        similar = [100 + q for q in order[top_k:top_k + 3]]  # the next 3 below the top-k band
        n_sim = r.extra["negative_kinds"].count("similar")
        assert r.extra["negative_doc_ids"][:n_sim] == similar
        for q, ctx in zip(order[:top_k], r.contexts):
            expected = per_doc[q][:, j]
            assert ctx.tokens == decode(ids[q][mask[q]].tolist())
            assert torch.allclose(torch.tensor(ctx.activations, dtype=torch.float32), expected, rtol=1e-4, atol=1e-6)
        assert r.max_activation == pytest.approx(float(doc_max.max()) if order else 0.0, rel=1e-4)
        fired = sum(int((a[:, j] > 0).sum()) for a in per_doc)
        assert r.density == pytest.approx(fired / n_tokens)
        assert r.extra["active_contexts"] == len(order)


def test_levels_0_to_10_with_10_at_max():
    acts, ids, mask, batches = make_corpus()
    records = run_collect(batches, make_sae(), len(acts), top_k=4)
    live = [r for r in records if r.contexts]
    assert live
    for r in live:
        top = r.contexts[0]
        assert top.levels[top.max_index] == 10
        assert max(top.activations) == pytest.approx(r.max_activation)
        for ctx in r.contexts + r.negatives:
            assert all(0 <= v <= 10 for v in ctx.levels)
            # level > 0 exactly where the latent fires
            acts = ctx.activations if ctx.activations is not None else [0.0] * len(ctx.levels)  # random: silent
            assert [v > 0 for v in ctx.levels] == [a > 0 for a in acts]
        peaks = [max(c.activations) for c in r.contexts]
        assert peaks == sorted(peaks, reverse=True)


def test_quantise():
    levels = quantise(torch.tensor([0.0, 0.001, 0.5, 0.96, 1.0]), 1.0)
    assert levels.tolist() == [0, 1, 5, 10, 10]
    assert quantise(torch.tensor([0.0, 0.0]), 0.0).tolist() == [0, 0]


def test_silent_negatives_never_fire():
    acts, ids, mask, batches = make_corpus(n_docs=60)
    ids = ids % 12  # a small vocabulary, so pool contexts often share a latent's max token
    batches = [Batch(b.acts, ids[i * 7:i * 7 + len(b.doc_ids)], b.mask, b.doc_ids) for i, b in enumerate(batches)]
    sae = make_sae()
    records = run_collect(batches, sae, len(acts), top_k=3, n_similar=0, n_random=6, n_same_token=4, random_pool=30)
    with torch.no_grad():
        per_doc = [dense_acts(sae, acts[q][mask[q]]) for q in range(len(acts))]
    seen = {"random": 0, "same-token": 0}
    for r in records:
        kinds = r.extra["negative_kinds"]
        assert len(kinds) == len(r.negatives) == len(r.extra["negative_doc_ids"])
        assert kinds == sorted(kinds, key=["same-token", "random"].index)  # same-token first
        for ctx, kind, doc in zip(r.negatives, kinds, r.extra["negative_doc_ids"]):
            seen[kind] += 1
            q = doc - 100
            assert all(v == 0 for v in ctx.levels) and ctx.activations is None
            assert ctx.tokens == decode(ids[q][mask[q]].tolist())
            assert float(per_doc[q][:, r.feature].max()) <= 0  # silent on the whole context
            if kind == "same-token":  # holds the token at the latent's max in its top context
                top_doc = r.extra["context_doc_ids"][0] - 100
                top_token = ids[top_doc][mask[top_doc]][int(per_doc[top_doc][:, r.feature].argmax())]
                assert f"t{int(top_token)}" in ctx.tokens
        assert len(set(r.extra["negative_doc_ids"])) == len(r.negatives)  # no context twice
    assert seen["random"] > 0 and seen["same-token"] > 0


def test_deterministic_and_seeded():
    acts, ids, mask, batches = make_corpus()
    a = run_collect(batches, make_sae(), len(acts), top_k=3, seed=1)
    b = run_collect(batches, make_sae(), len(acts), top_k=3, seed=1)
    assert [r.to_dict() for r in a] == [r.to_dict() for r in b]


def test_dead_latents_kept_and_feature_subset():
    acts, ids, mask, batches = make_corpus()
    sae = make_sae()
    with torch.no_grad():
        sae.b_enc[5] = -100.0  # latent 5 can never fire
    records = run_collect(batches, sae, len(acts), top_k=3, features=[5, 7, 2])
    assert [r.feature for r in records] == [2, 5, 7]
    dead = records[1]
    assert dead.contexts == [] and dead.density == 0.0 and dead.max_activation == 0.0
    full = {r.feature: r for r in run_collect(batches, sae, len(acts), top_k=3)}
    for r in (records[0], records[2]):  # tracking a subset gives the same records
        assert r.to_dict() == full[r.feature].to_dict()


def test_window_centred_on_max_token():
    acts, ids, mask, batches = make_corpus(T=30)
    sae = make_sae()
    records = run_collect(batches, sae, len(acts), top_k=4, window=8)
    with torch.no_grad():
        per_doc = [dense_acts(sae, acts[q][mask[q]]) for q in range(len(acts))]
    assert any(len(per_doc[d - 100]) > 8 for r in records for d in r.extra["context_doc_ids"])
    for r in records:
        for ctx, doc in zip(r.contexts, r.extra["context_doc_ids"]):
            full = per_doc[doc - 100][:, r.feature]
            assert len(ctx.tokens) == min(8, len(full))
            # the window is centred on the document's (first) max token for this latent
            assert max(ctx.activations) == pytest.approx(float(full.max()), rel=1e-4)
            peak = int(torch.argmax(full))
            start = min(max(peak - 4, 0), max(len(full) - 8, 0))
            q = doc - 100
            assert ctx.tokens == decode(ids[q][mask[q]].tolist())[start:start + 8]


def test_empty_corpus_all_dead():
    records = run_collect([], make_sae(), 0, top_k=3)
    assert len(records) == D_SAE and all(not r.contexts and r.density == 0.0 for r in records)


def test_parse_latents():
    assert parse_latents("3") == [0, 1, 2]
    assert parse_latents("2-4,9") == [2, 3, 4, 9]
    assert parse_latents(None) is None
    from autointerp.errors import UserError
    with pytest.raises(UserError):
        parse_latents("a-b")


def test_pool_larger_than_corpus():
    """n_docs is an upper bound: pool positions past the last context are never used."""
    acts, ids, mask, batches = make_corpus(n_docs=20)
    records = run_collect(batches, make_sae(), n_docs=500, top_k=3, n_random=5, random_pool=400)
    docs = {d for r in records for d in r.extra["negative_doc_ids"]}
    assert docs and docs <= set(range(100, 120))
