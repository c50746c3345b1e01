"""Class shares with Wilson intervals: known values, streaming, and the sample's agreement."""

from __future__ import annotations

import pytest

from autointerp.labels.shares import ShareCounter, class_shares, is_sampled, sample_agreement, wilson


# Newcombe (1998), "Two-sided confidence intervals for the single proportion", Table II, method 3
# (Wilson score interval without continuity correction), to 4 decimals.
@pytest.mark.parametrize("k, n, lo, hi", [
    (81, 263, 0.2553, 0.3662),
    (15, 148, 0.0624, 0.1605),
    (0, 20, 0.0, 0.1611),
    (1, 29, 0.0061, 0.1718),
    (29, 29, 0.8830, 1.0),
])
def test_wilson_matches_newcombes_table(k, n, lo, hi):
    got = wilson(k, n)
    assert got == pytest.approx((lo, hi), abs=5e-5)


def test_wilson_by_hand_and_edges():
    # 5 of 10: centre 0.5, half = 1.96/(1+0.38416) * sqrt(0.025 + 0.0096040) = 0.26340
    lo, hi = wilson(5, 10)
    assert lo == pytest.approx(0.5 - 0.26340, abs=1e-4) and hi == pytest.approx(0.5 + 0.26340, abs=1e-4)
    assert wilson(0, 0) == (0.0, 1.0)  # no data: nothing known
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == 1.0
    # symmetric: k of n and n-k of n mirror each other
    a, b = wilson(3, 17), wilson(14, 17)
    assert a[0] == pytest.approx(1 - b[1]) and a[1] == pytest.approx(1 - b[0])
    # narrower with more data at the same share
    assert wilson(50, 100)[1] - wilson(50, 100)[0] < wilson(5, 10)[1] - wilson(5, 10)[0]
    with pytest.raises(ValueError):
        wilson(3, 2)


def _labels():
    # 10 latents: 6 token, 3 concept-synonym, 1 with no granularity; sampled: 2 token, 2 synonym
    out = []
    for i in range(10):
        g = "token" if i < 6 else ("concept-synonym" if i < 9 else None)
        out.append({"feature": i, "granularity": g, "sampled": i in (0, 1, 6, 7)})
    return out


def test_class_shares_counts_every_label_and_reads_the_stream_once():
    consumed = []

    def stream():
        for label in _labels():
            consumed.append(label["feature"])
            yield label

    table = class_shares(stream())
    assert consumed == list(range(10))
    assert table.n == 10
    assert table.counts == {"token": 6, "concept-synonym": 3, "unlabelled": 1}
    token = table.get("token")
    assert token.share == 0.6 and (token.lo, token.hi) == pytest.approx(wilson(6, 10))
    # a class never seen: 0 with the interval of 0 of n
    absent = table.get("concept-semantic")
    assert absent.count == 0 and absent.hi == pytest.approx(wilson(0, 10)[1])
    rows = table.rows(["token", "concept-synonym", "concept-semantic", "uninterpretable"])
    assert [r.name for r in rows] == ["token", "concept-synonym", "concept-semantic", "uninterpretable", "unlabelled"]
    assert sum(r.share for r in rows) == pytest.approx(1.0)


def test_a_counter_on_a_subset_and_on_a_boolean_field():
    labels = _labels()
    sample = class_shares(labels, where=is_sampled)
    assert sample.n == 4 and sample.counts == {"token": 2, "concept-synonym": 2}
    flags = ShareCounter("sampled")
    for label in labels:
        flags.add(label)
    assert flags.table().counts == {True: 4, False: 6}
    # old files have no `sampled` field: nobody is in the sample
    assert class_shares([{"granularity": "token"}], where=is_sampled).n == 0


def test_sample_agreement_flags_a_class_outside_the_samples_interval():
    labels = _labels()
    whole = class_shares(labels)
    # the sample's token share 2/4 (95% CI 15%-85%) holds the all-latent 60%: agreement
    agreement = sample_agreement(whole, class_shares(labels, where=is_sampled))
    assert agreement.agrees
    assert agreement.total_variation == pytest.approx(0.5 * (0.1 + 0.2 + 0.1))
    assert "consistent" in agreement.summary()
    # a sample of 30 token-only latents cannot come from 60% token: it differs, and says where
    skewed = class_shares([{"granularity": "token"}] * 30)
    disagreement = sample_agreement(whole, skewed, classes=["token", "concept-synonym"])
    assert not disagreement.agrees
    assert [c.name for c in disagreement.differing] == ["token", "concept-synonym"]
    assert "differs in token 100%" in disagreement.summary()
    # an empty sample says so rather than agreeing
    empty = sample_agreement(whole, class_shares([]))
    assert not empty.agrees and empty.total_variation is None and "no LLM-described sample" in empty.summary()
