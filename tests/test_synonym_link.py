"""The synonym link (issue 33): one word's forms are not synonyms, function words link nothing,
a link is measured by the share of the contexts its words cover, fragments are no partners,
and the gate keeps concept-synonym to latents whose link holds. Small hand-made records."""

import numpy as np
import pytest

from autointerp.labels import decision as G
from autointerp.labels import dictionary as D
from autointerp.labels import evidence as E
from autointerp.labels import fit as F
from autointerp.labels import relations as R
from autointerp.schema import GRANULARITIES, Context, FeatureRecord

present = {k for k, s in D.evidence_sources().items() if s["available"]}
needs_ja = pytest.mark.skipif(not D.group_sources("link") <= present, reason="the ja extra is not installed")


def _record(max_tokens, feature=0):
    contexts = [Context(tokens=["x", " y", t, " z"], levels=[0, 1, 10, 0]) for t in max_tokens]
    return FeatureRecord(model="m", layer=0, checkpoint_step=1, feature=feature, contexts=contexts)


@needs_ja
def test_inflections_are_one_word_not_a_synonym():
    assert R.same_word("running", "run") and R.same_word("runs", "run") and R.same_word("provided", "provides")
    assert R.same_word("recognised", "recognized") and R.same_word("packages", "package")
    assert R.same_word("後の", "後に")  # UniDic's lemma
    assert R.same_word("使", "使い") and R.same_word("重要", "重要な")  # the same stem, kana after it
    assert not R.same_word("dog", "cat") and not R.same_word("install", "instance")
    ev = E.stat_features(_record([" run"] * 30 + [" running"] * 15 + [" runs"] * 5))
    f = ev.features
    assert f["lemma_top1_share"] == 1.0 and f["inflection_share"] == 0.4
    assert ev.link.partners == [] and f["link_coverage"] == 0.0 and f["link_holds"] == 0.0
    # one word's forms beside a translation: the forms are the top word, the translation its partner
    ev = E.stat_features(_record([" line"] * 30 + [" lines"] * 5 + ["ライン"] * 10 + [" dog"] * 5))
    assert [t for t, _ in ev.link.top] == ["line", "lines"] and ev.link.partners == [[("ライン", 10)]]
    assert ev.link.covered == 45 and ev.features["link_holds"] == 1.0


@needs_ja
def test_function_words_link_nothing():
    # English: the closed classes; Japanese: UniDic's parts of speech (particles, auxiliaries, light verbs)
    assert D.is_function_word("the") and D.is_function_word("and") and not D.is_function_word("network")
    assert D.is_function_word("が") and D.is_function_word("です") and D.is_function_word("します")
    assert not D.is_function_word("ユーザー") and not D.is_function_word("犬")
    # JMdict has が = "the self, the ego"; the link is not made
    assert not any(R.linked("the", "が", s) for s in (*R.LINK_SOURCES, "gloss_same_script"))
    ev = E.stat_features(_record([" the"] * 30 + ["が"] * 20))
    assert ev.link.partners == [] and ev.features["gloss_ja_en_share"] == 0.0
    assert ev.features["function_share"] == 1.0
    ev = E.stat_features(_record(["です"] * 28 + ["します"] * 5 + ["れます"] * 3 + [" x"] * 14))
    assert ev.link.partners == [] and ev.features["link_holds"] == 0.0


@needs_ja
def test_link_coverage_is_measured_not_only_its_presence():
    weak = E.stat_features(_record([" network"] * 10 + ["1"] * 5 + ["0"] * 3 + ["ネットワーク"] * 3
                                   + [f" w{i}" for i in range(29)]))
    assert weak.link.partners == [[("ネットワーク", 3)]] and weak.link.covered == 13
    f = weak.features
    assert f["link_coverage"] == 13 / 50 and f["link_partner_share"] == 3 / 50 and f["link_two"] == 1.0
    assert f["link_holds"] == 0.0  # the words of the meaning cover less than half
    strong = E.stat_features(_record([" network"] * 30 + ["ネットワーク"] * 12 + [" x"] * 8)).features
    assert strong["link_coverage"] == 42 / 50 and strong["link_holds"] == 1.0
    one_off = E.stat_features(_record(["In"] * 48 + ["イン"] * 1 + [" x"])).features
    assert one_off["link_two"] == 0.0 and one_off["link_holds"] == 0.0  # one context is chance
    line = E.evidence_summary(_record([" network"] * 30 + ["ネットワーク"] * 12 + [" x"] * 8))
    assert "“ネットワーク” 12/50 (" in line and "covers 42/50)" in line


@needs_ja
def test_same_language_senses_and_single_kanji():
    assert R.linked("発売", "リリース", "gloss_same_script")  # a shared JMdict sense: release
    assert R.linked("周囲", "周り", "gloss_same_script")
    assert not R.linked("本名", "通称", "gloss_same_script")  # 'name' is a gloss word, not a shared sense
    # English near-synonyms share JMdict senses too loosely (command ~ control): not linked
    assert not R.linked("command", "control", "gloss_same_script") and not R.linked("search", "depends", "gloss_same_script")
    assert "rescue" in D.kanji_meanings("救")  # KANJIDIC: no JMdict entry of its own
    assert R.linked("rescue", "救", "gloss_ja_en") and R.linked("save", "救", "gloss_en_ja")
    link = R.synonym_link([("発売", 42), ("刊行", 4), ("リリース", 3)], 50)
    assert link.partners == [[("リリース", 3)]] and link.covered == 45  # 刊行 ~ リリース: no chains
    assert R.synonym_link([("救", 20), ("rescue", 10), ("save", 8)], 50).text.startswith("KANJIDIC: 救 = ")


def test_fragments_are_found_in_context():
    assert E._glued(["re", "cogn", "ized"], 1) and E._glued([" the", " run", "ning"], 1)
    assert not E._glued([" the", " run", " fast"], 1) and not E._glued(["(", "filter", ")"], 1)
    assert E._glued(["ディ", "レクト", "リ"], 1) and not E._glued(["の", "ファイル", "システム"], 1)
    pieces = [Context(tokens=["recogn", "ized", " x"], levels=[10, 0, 0])] * 10
    words = [Context(tokens=[" dog", " x"], levels=[10, 0])] * 10
    f = E.stat_features(FeatureRecord("m", 0, 1, 0, pieces + words)).features
    assert f["fragment_share"] == 0.5 and f["fragment_top1"] == 1.0


@needs_ja
def test_a_fragment_is_no_partner():
    # プレ of 不良プレス is no "pre"; the same プレ standing alone would be
    pieces = [Context(tokens=["不良", "プレ", "スの"], levels=[0, 10, 0])] * 10
    pre = [Context(tokens=[" the", " pre", "-"], levels=[0, 10, 0])] * 30
    ev = E.stat_features(FeatureRecord("m", 0, 1, 0, pre + pieces))
    assert ev.link.partners == [] and ev.features["link_holds"] == 0.0


def _gated_model(features):
    """A model that would call every latent concept-synonym, with the synonym gate on link_holds."""
    coef = np.zeros((4, len(features)))
    intercept = np.array([0.0 if c != "concept-synonym" else 5.0 for c in GRANULARITIES])
    return G.GranularityModel(feature_names=features, classes=list(GRANULARITIES), mean=np.zeros(len(features)),
                              scale=np.ones(len(features)), coef=coef, intercept=intercept,
                              gate=dict(F.SYNONYM_GATE))


def test_the_gate_rules_out_synonym_without_a_link_that_holds():
    model = _gated_model(["top1_share", "link_holds"])
    proba = model.predict_proba(np.array([[0.5, 1.0], [0.5, 0.0]]))
    syn = GRANULARITIES.index("concept-synonym")
    assert proba[0].argmax() == syn and proba[1][syn] == 0.0
    again = G.GranularityModel.from_dict(model.to_dict())  # the shipped JSON keeps the gate
    assert again.gate == {"concept-synonym": "link_holds"}
    assert np.allclose(again.predict_proba(np.array([[0.5, 0.0]])), proba[1:])


def test_fitting_with_the_gate_keeps_link_and_gates_the_model():
    rng = np.random.default_rng(0)
    names = [*E.EVIDENCE_GROUPS["core"], *E.EVIDENCE_GROUPS["link"]]
    y = [GRANULARITIES[i % 4] for i in range(80)]
    X = rng.normal(size=(80, len(names)))
    holds = names.index("link_holds")
    X[:, holds] = [1.0 if c == "concept-synonym" else float(i % 3 == 0) for i, c in enumerate(y)]
    gid = list(range(80))
    choice = F.select(X, y, gid, range(80), names, ["link"], gate=True)
    assert choice.gate and "link" in choice.groups
    model = F.fit_choice(X, y, range(80), names, choice)
    assert model.gate == F.SYNONYM_GATE
    pred = F.predicted_classes(model.logits(X[:, F.columns(names, choice.groups)]))
    assert not any(p == "concept-synonym" for p, h in zip(pred, X[:, holds]) if h == 0)


def test_shipped_model_gates_synonym():
    stats = G.load_models()["stats"]
    if "link" in (stats.groups or []):
        assert stats.gate == F.SYNONYM_GATE and stats.info["choice"]["gate"] is True
