import json
from pathlib import Path

import numpy as np
import pytest

from autointerp import granularity as G
from autointerp.schema import Context, Explanation, FeatureRecord, GRANULARITIES

DEV = Path(__file__).resolve().parents[2] / "shared/data/llmjp_sae_human_labels.dev.jsonl.gz"


def _record(max_tokens, feature=0, step=1):
    contexts = [Context(tokens=["x", "y", t, "z"], levels=[0, 1, 10, 0]) for t in max_tokens]
    return FeatureRecord(model="m", layer=0, checkpoint_step=step, feature=feature, contexts=contexts)


def test_token_feature_vs_diverse_feature():
    token = G.stat_features(_record([" dog"] * 40)).features
    diverse = G.stat_features(_record([f"w{i}" for i in range(40)])).features
    assert token["top1_share"] == 1.0 and token["distinct_ratio"] == 1 / 40
    assert diverse["top1_share"] == 1 / 40 and diverse["distinct_ratio"] == 1.0
    assert diverse["entropy_norm"] > 0.99 > token["entropy_norm"]


def test_variants_are_related():
    assert G.related("recognized", "recognised")
    assert G.related("miles", "mile")
    assert G.related("1", "one")
    assert not G.related("dog", "cat")
    if G.lexicon_available():
        assert G.related("ダーク", "dark")


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
    expl = Explanation(1, 0, "the word dog", "token", False, 0.9, {"model": "m"})
    [label] = G.build_labels([record], [expl])
    assert label.description == "the word dog" and label.explainer == {"model": "m"}
    expected = "both" if "both" in G.load_models() else "stats"
    assert label.evidence["model"] == expected


def test_model_json_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 3))
    y = ["token" if x[0] > 0 else "uninterpretable" for x in X]
    model = G.fit_model(X, y, ["a", "b", "c"])
    G.save_models({"stats": model}, tmp_path / "m.json")
    loaded = G.load_models(tmp_path / "m.json")["stats"]
    assert json.loads((tmp_path / "m.json").read_text())["format_version"] == G.MODEL_FORMAT_VERSION
    assert np.allclose(loaded.predict_proba(X), model.predict_proba(X))
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    sk = LogisticRegression(C=1.0, max_iter=5000, random_state=0).fit(StandardScaler().fit_transform(X), y)
    assert (loaded.predict_proba(X).argmax(1) == (sk.predict(StandardScaler().fit_transform(X)) == "uninterpretable")).all()


@pytest.mark.skipif(not DEV.exists(), reason=f"dev file {DEV} not present")
def test_shipped_model_reproduces_training_predictions():
    from autointerp.schema import read_records
    records = read_records(DEV)[::37]
    models = G.load_models()
    model = models["stats"]
    assert model.info.get("version")
    # Refit exactly as evals/eval_granularity.py --save does, on all dev features, and compare.
    all_records = read_records(DEV)
    X = np.array([[G.stat_features(r).features.get(n, 0.0) for n in model.feature_names] for r in all_records])
    y = [r.extra["human_granularity"] for r in all_records]
    refit = G.fit_model(X, y, model.feature_names, C=model.info["C"])
    refit.temperature = model.temperature  # fitted on out-of-fold log loss by the eval
    Xs = np.array([[G.stat_features(r).features.get(n, 0.0) for n in model.feature_names] for r in records])
    assert np.allclose(refit.predict_proba(Xs), model.predict_proba(Xs), atol=1e-6)
    labels = G.build_labels(records)
    assert [l.granularity for l in labels] == [model.classes[i] for i in model.predict_proba(Xs).argmax(1)]
    agree = np.mean([l.granularity == r.extra["human_granularity"] for l, r in zip(labels, records)])
    assert agree >= 0.6  # training-set agreement on a spread of dev features


def test_out_of_range_evidence_does_not_extrapolate():
    """A feature far outside the fitted range (a tiny model's dense latents) weighs no more than
    one at the clip: the linear model must not extrapolate without bound."""
    model = G.load_models()["stats"]
    base = model.mean.copy()
    at_clip = base + G.Z_CLIP * model.scale
    far_out = base + 30 * G.Z_CLIP * model.scale
    assert np.allclose(model.predict_proba(at_clip[None]), model.predict_proba(far_out[None]))
    inside = base + 0.5 * model.scale
    assert not np.allclose(model.predict_proba(inside[None]), model.predict_proba(at_clip[None]))
