"""The screen's decision rule (evals/screen_explainers.py): a pair replaces the default only where
its gap interval lies above the default's gap and above 0, with no method clearly worse."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "evals"))
from screen_explainers import DEFAULT, decide  # noqa: E402


def m(gap, lo, hi, n=40):
    return {"gap": gap, "ci95": [lo, hi], "n": n}


BASE = {"detection": m(-0.006, -0.021, 0.007), "fuzzing": m(-0.005, -0.011, 0.001),
        "simulation": m(0.004, -0.028, 0.038)}


def test_keeps_the_default_when_nothing_beats_it():
    pair, lines = decide({DEFAULT: BASE, ("gemma", "smollm2"): dict(BASE)})
    assert pair == DEFAULT
    assert "no method" in lines[0]


def test_changes_where_the_interval_lies_above_the_default_gap_and_zero():
    better = dict(BASE, detection=m(0.05, 0.02, 0.08))
    pair, lines = decide({DEFAULT: BASE, ("smollm2", "gemma"): better, ("gemma", "gemma"): dict(BASE)})
    assert pair == ("smollm2", "gemma")
    assert "detection +0.050" in lines[0]


def test_a_lower_bound_above_the_default_gap_but_below_zero_is_not_enough():
    noise = dict(BASE, detection=m(0.01, -0.004, 0.03))  # beats -0.006, still straddles 0
    pair, lines = decide({DEFAULT: BASE, ("gemma", "smollm2"): noise})
    assert pair == DEFAULT and "but not above 0" in lines[0]


def test_a_win_with_a_loss_or_too_few_features_changes_nothing():
    mixed = dict(BASE, detection=m(0.05, 0.02, 0.08), fuzzing=m(-0.05, -0.08, -0.02))
    few = dict(BASE, detection=m(0.05, 0.02, 0.08, n=4))
    pair, lines = decide({DEFAULT: BASE, ("gemma", "smollm2"): mixed, ("gemma", "gemma"): few})
    assert pair == DEFAULT
    assert "worse on fuzzing" in lines[0]
    assert "not above 0 (or too few features) on detection" in lines[1]


def test_the_most_wins_decide_between_candidates():
    one = dict(BASE, detection=m(0.05, 0.02, 0.08))
    two = dict(BASE, detection=m(0.03, 0.01, 0.05), fuzzing=m(0.03, 0.01, 0.05))
    assert decide({DEFAULT: BASE, ("gemma", "smollm2"): one, ("gemma", "gemma"): two})[0] == ("gemma", "gemma")
