import json
import random

import pytest

from autointerp.interp import score
from autointerp.interp.control import compare_control, control_sample, derangement, run_control, shuffled_assignment
from autointerp.jsonl import iter_jsonl
from autointerp.schema import Key, Scores

from test_score import ScriptedClient, make_record


@pytest.mark.parametrize("n", [2, 3, 4, 5, 7, 10, 31])
def test_derangement_never_leaves_a_latent_its_own_description(n):
    for seed in range(300 if n <= 3 else 60):
        perm = derangement(n, random.Random(seed))
        assert sorted(perm) == list(range(n))
        assert all(p != i for i, p in enumerate(perm)), (n, seed, perm)
    with pytest.raises(ValueError):
        derangement(1, random.Random(0))


def test_derangement_is_seeded_and_varied():
    assert derangement(6, random.Random(3)) == derangement(6, random.Random(3))
    assert len({tuple(derangement(4, random.Random(s))) for s in range(200)}) == 9  # all 9 of D(4)
    assert derangement(2, random.Random(0)) == [1, 0]


def test_shuffle_avoids_equal_description_texts():
    texts = ["dog", "dog", "cat", "cat", "sun", "sun"]
    for seed in range(50):
        perm = shuffled_assignment(texts, random.Random(seed))
        assert all(p != i and texts[p] != texts[i] for i, p in enumerate(perm))
    # impossible to avoid (all the same text): still a derangement
    perm = shuffled_assignment(["x"] * 3, random.Random(0))
    assert all(p != i for i, p in enumerate(perm))


def test_control_sample_fraction_minimum_and_all_if_fewer():
    records = [make_record(i) for i in range(60)]
    descriptions = {r.key: f"the word w{r.feature}" for r in records}
    scored = {r.key for r in records}
    assert len(control_sample(records, descriptions, scored, 0.2, 10, 0)) == 12
    assert len(control_sample(records, descriptions, scored, 0.1, 10, 0)) == 10
    assert len(control_sample(records[:7], descriptions, scored, 0.2, 10, 0)) == 7
    # only latents with a description and a matched score
    descriptions[Key(5, 0, 0)] = ""
    sample = control_sample(records[:7], descriptions, scored - {Key(5, 0, 1)}, 0.2, 10, 0)
    assert {r.feature for r in sample} == {2, 3, 4, 5, 6}
    a = control_sample(records, descriptions, scored, 0.2, 10, 1)
    assert a == control_sample(records, descriptions, scored, 0.2, 10, 1)
    assert a != control_sample(records, descriptions, scored, 0.2, 10, 2)


def _world(n=12):
    records = [make_record(i, token=f" w{i}", same_token=False) for i in range(n)]
    descriptions = {r.key: f"the word w{r.feature}" for r in records}
    return records, descriptions


def test_control_scores_shuffled_descriptions_in_their_own_file(tmp_path):
    records, descriptions = _world()
    client = ScriptedClient()
    settings = score.ScoreSettings(bootstrap=100)
    scores_path, control_path = tmp_path / "scores.jsonl", tmp_path / "control.jsonl"
    matched = score.score_records(records, descriptions, client, scores_path, settings)
    before = scores_path.read_text()
    control = run_control(records, descriptions, matched, client, control_path, settings, 0.2, 10, seed=0)
    assert scores_path.read_text() == before  # the matched scores' file is untouched
    shuffled = list(iter_jsonl(control_path, Scores.from_dict))
    assert len(shuffled) == control.n_latents == 10
    for s in shuffled:
        own = descriptions[s.key]
        used = tuple(s.simulator["description_from"])
        assert used != s.key and s.simulator["description_sha256"] != score.description_sha(own)
        assert s.simulator["description_sha256"] == score.description_sha(descriptions[used])
    # the scripted simulator is perfect with the matched description and blind with another one
    det = control.methods["detection"]
    assert det["metric"] == "auc" and det["matched"] == 1.0 and det["shuffled"] == 0.5
    assert det["gap"] == 0.5 and det["signal"] and det["verdict"].startswith("detection discriminates (gap 0.50")
    assert control.methods["simulation"]["signal"] and not control.noise
    d = control.to_dict()
    assert d["noise"] is False and set(d["methods"]) == {"simulation", "detection", "fuzzing"}
    assert json.loads(json.dumps(d)) == d
    # resumable: a second run sends nothing and gives the same result
    n = len(client.requests)
    again = run_control(records, descriptions, matched, client, control_path, settings, 0.2, 10, seed=0)
    assert len(client.requests) == n and again.to_dict() == d


def test_control_of_a_constant_simulator_is_noise(tmp_path):
    records, descriptions = _world()
    client = ScriptedClient(constant=True)
    settings = score.ScoreSettings(bootstrap=50)
    matched = score.score_records(records, descriptions, client, tmp_path / "scores.jsonl", settings)
    control = run_control(records, descriptions, matched, client, tmp_path / "control.jsonl", settings)
    assert control.noise
    assert all(not m["signal"] and m["gap"] == 0.0 for m in control.methods.values())
    assert "scripted do not beat shuffled descriptions" in control.verdict and "noise" in control.verdict
    assert "detection from scripted does not beat shuffled descriptions (gap 0.00, 95% CI 0.00–0.00; " \
           "sign-flip p 1.000, Holm over 3 methods 1.000)" in control.methods["detection"]["verdict"]


def test_compare_control_hand_computed():
    def s(key, det, auc=None):
        return Scores(5, key, detection=det, auc={} if auc is None else {"detection": auc})

    matched = {(5, i): s(i, v) for i, v in enumerate([0.9, 0.8, 0.7, 0.6] * 3)}
    shuffled = {(5, i): s(i, v) for i, v in enumerate([0.5, 0.6, 0.7, 0.8] * 3)}
    out = compare_control(matched, shuffled, ["detection"], "m", seed=0)["detection"]
    # gaps 0.4, 0.2, 0.0, -0.2 (x3): mean 0.1; balanced accuracy since no latent has an AUC
    assert out["metric"] == "balanced accuracy" and out["n"] == 12
    assert out["matched"] == pytest.approx(0.75) and out["shuffled"] == pytest.approx(0.65)
    assert out["gap"] == pytest.approx(0.1)
    lo, hi = out["ci95"]
    assert -0.2 <= lo < 0.1 < hi <= 0.4 and not out["signal"]
    assert "does not beat shuffled descriptions (gap 0.10" in out["verdict"]
    # worse than shuffled: the interval lies below 0
    low = {(5, i): s(i, 0.5 + 0.01 * i) for i in range(10)}
    high = {(5, i): s(i, 0.8 - 0.01 * i) for i in range(10)}
    worse = compare_control(low, high, ["detection"], "m", 0)["detection"]
    assert worse["ci95"][1] < 0 and "higher than matched" in worse["verdict"] and "−" in worse["verdict"]
    # a clear gap on fewer than MIN_CONTROL_PAIRS latents is no verdict of signal
    small = compare_control({(5, i): s(i, 0.9) for i in range(3)}, {(5, i): s(i, 0.5 + 0.01 * i) for i in range(3)},
                            ["detection"], "m", 0)["detection"]
    assert small["ci95"][0] > 0 and not small["signal"] and "too few for a verdict" in small["verdict"]
    # too few latents
    few = compare_control({Key(5, 0, 0): s(0, 1.0)}, {Key(5, 0, 0): s(0, 0.5)}, ["detection"], "m", 0)["detection"]
    assert few["gap"] is None and not few["signal"] and "too few" in few["verdict"]


def test_control_needs_two_latents(tmp_path):
    records, descriptions = _world(1)
    control = run_control(records, descriptions, [Scores(5, 0, detection=1.0, layer=0)], ScriptedClient(),
                          tmp_path / "c.jsonl", score.ScoreSettings())
    assert control.noise and control.n_latents == 1 and not (tmp_path / "c.jsonl").exists()
    assert "too few" in control.methods["detection"]["verdict"]


def test_sign_flip_p_is_exact_and_holm_keeps_the_order():
    from autointerp.interp.scorers.metrics import holm, sign_flip_p

    # all ten gaps positive: only the all-plus pattern of 2^10 reaches the observed sum
    assert sign_flip_p([0.5] * 10) == pytest.approx(1 / 1024)
    # one negative gap among ten equal ones: patterns reaching sum >= 8 units: C(10,0) + C(10,1) = 11
    assert sign_flip_p([1.0] * 9 + [-1.0]) == pytest.approx(11 / 1024)
    assert sign_flip_p([0.0] * 10) == 1.0  # no gap at all: no evidence
    # beyond the exact range: Monte Carlo, seeded, close to the normal approximation
    gaps = [0.3 if i % 3 else -0.2 for i in range(40)]
    p = sign_flip_p(gaps, seed=1)
    assert p == sign_flip_p(gaps, seed=1) and 0.0 < p < 0.05
    adjusted = holm({"a": 0.01, "b": 0.04, "c": 0.03})
    assert adjusted == pytest.approx({"a": 0.03, "b": 0.06, "c": 0.06})  # 3*0.01, max(2*0.03, .03), max(.04, .06)


def test_one_interval_clear_of_zero_among_three_methods_is_not_signal():
    """The demo-real case: simulation's bootstrap interval excludes 0 on 10 latents, detection's and
    fuzzing's do not; after Holm's correction over three methods that is no verdict of signal
    unless the sign-flip test is strong enough on its own."""
    def s(key, sim):
        return Scores(5, key, simulation=sim)

    gaps = [0.06, 0.01, 0.03, -0.03, 0.04, 0.03, -0.02, 0.05, -0.01, 0.08]  # sign-flip p = 41/1024
    matched = {(5, i): s(i, 0.1 + g) for i, g in enumerate(gaps)}
    shuffled = {(5, i): s(i, 0.1) for i in range(len(gaps))}
    alone = compare_control(matched, shuffled, ["simulation"], "m", 0)["simulation"]
    assert alone["ci95"][0] > 0 and alone["signal"]  # tested alone it is signal
    trio = {k: Scores(5, k[1], simulation=v.simulation, detection=0.5, fuzzing=0.5) for k, v in matched.items()}
    out = compare_control(trio, {k: Scores(5, k[1], simulation=0.1, detection=0.5, fuzzing=0.5) for k in shuffled},
                          ["simulation", "detection", "fuzzing"], "m", 0)
    sim = out["simulation"]
    assert sim["p"] == pytest.approx(41 / 1024, abs=1e-5) and sim["p_holm"] == pytest.approx(3 * 41 / 1024, abs=1e-4)
    assert sim["ci95"][0] > 0 and not sim["signal"]
    assert "interval lies above 0, but the test corrected for the 3 methods tested does not reject" in sim["verdict"]
