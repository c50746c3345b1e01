from autointerp.labels import language
from autointerp.schema import Context, FeatureRecord

EN = ["The quick brown fox jumps over the lazy dog near the river bank.",
      "Parliament passed the new budget after a long debate on Tuesday.",
      "She studied physics at the university and later taught mathematics."]
JA = ["東京は日本の首都であり、多くの人が住んでいます。", "彼は大学で物理学を学び、その後数学を教えました。",
      "新しい予算案は長い議論の末に国会で可決された。"]


def _ctx(text: str, max_token: str) -> Context:
    tokens = list(text[:20]) + [max_token]
    return Context(tokens=tokens, levels=[0] * 20 + [10])


def _record(contexts) -> FeatureRecord:
    return FeatureRecord(model="m", layer=0, checkpoint_step=1, feature=0, contexts=contexts)


def test_token_script():
    assert language.token_script(" dog") == "en"
    assert language.token_script("犬") == "ja"
    assert language.token_script("インチ") == "ja"
    assert language.token_script("27") == "other"
    assert language.token_script("<0x0A>") == "other"


def test_english_japanese_and_mixed_profiles():
    en = language.profile(_record([_ctx(EN[i % 3] * 2, " dog") for i in range(10)]))
    ja = language.profile(_record([_ctx(JA[i % 3] * 2, "犬") for i in range(10)]))
    mixed = language.profile(_record([_ctx(EN[i % 3] * 2, " dog") for i in range(5)]
                                     + [_ctx(JA[i % 3] * 2, "犬") for i in range(5)]))
    assert (en["trend"], en["trend_langdetect"], en["bilingual_firing"]) == ("en", "en", False)
    assert (ja["trend"], ja["trend_langdetect"], ja["bilingual_firing"]) == ("ja", "ja", False)
    assert (mixed["trend"], mixed["trend_langdetect"], mixed["bilingual_firing"]) == ("mix", "mix", True)
    assert mixed["max_token_scripts"] == {"en": 0.5, "ja": 0.5}
    assert abs(mixed["max_token_script_entropy"] - 1.0) < 1e-9 and en["max_token_script_entropy"] == 0.0


def test_other_languages_and_determinism():
    fr = "Le gouvernement a présenté un nouveau projet de loi sur l'éducation nationale hier soir."
    record = _record([Context(tokens=fr.split(" "), levels=[0] * (len(fr.split(" ")) - 1) + [10])] * 3)
    p1, p2 = language.profile(record), language.profile(record)
    assert p1 == p2
    assert p1["trend_langdetect"] == "fr"


def test_paper_rule_and_trend_threshold():
    assert language.paper_token_language(" dog") == "en"
    assert language.paper_token_language("犬") == "ja"
    assert language.trend_from_counts({"en": 46, "ja": 4}) == "en"  # 92% > 90%
    assert language.trend_from_counts({"en": 45, "ja": 5}) == "mix"  # exactly 90% is not more than 90%
    assert language.trend_from_counts({}) == "mix"


def test_empty_and_silent_records():
    p = language.profile(_record([]))
    assert p["trend"] == "mix" and p["n_activating"] == 0 and not p["bilingual_firing"]
    silent = language.profile(_record([Context(tokens=["a", "b"], levels=[0, 0])]))
    assert silent["n_activating"] == 0
