"""The comparison's statistics against textbook values."""

import pytest

from specdraft.pipeline.statistics import can_reject, holm, seed_test

# Student's sleep data (Cushny & Peebles 1905): extra hours of sleep, drug 2 minus drug 1, ten
# patients. R: t.test(extra ~ group, data = sleep, paired = TRUE) gives t = -4.0621, df = 9,
# p-value = 0.002833, 95 % CI -2.4598858 -0.7001142 (group 1 minus group 2).
SLEEP_DIFFS = [1.2, 2.4, 1.3, 1.3, 0.0, 1.0, 1.8, 0.8, 4.6, 1.4]


def test_seed_test_matches_the_textbook_paired_t_test():
    result = seed_test(SLEEP_DIFFS)
    assert result["n_seeds"] == 10
    assert result["mean_diff"] == pytest.approx(1.58)
    assert result["t"] == pytest.approx(4.0621, abs=1e-4)
    assert result["p_seed"] == pytest.approx(0.002833, abs=1e-6)
    assert result["ci95"] == pytest.approx([0.7001142, 2.4598858], abs=1e-6)
    assert result["effect_size"] == pytest.approx(1.58 / 1.2299955, abs=1e-6)


def test_a_sign_flipped_difference_flips_the_interval_not_the_p_value():
    plus, minus = seed_test(SLEEP_DIFFS), seed_test([-d for d in SLEEP_DIFFS])
    assert minus["p_seed"] == pytest.approx(plus["p_seed"])
    assert minus["mean_diff"] == pytest.approx(-1.58)
    assert minus["ci95"] == pytest.approx([-2.4598858, -0.7001142], abs=1e-6)
    assert minus["ci95"][1] < 0 < plus["ci95"][0]


def test_three_seed_means_from_the_issue():
    # The LK hybrid's seed means minus forward KL's on the real pair (issue 29): p ~ 0.017.
    result = seed_test([0.0117, 0.0128, 0.0080])
    assert result["p_seed"] == pytest.approx(0.0175, abs=2e-4)
    assert result["ci95"][0] > 0


def test_no_p_value_without_a_variance_to_judge_against():
    assert seed_test([0.01])["p_seed"] is None
    assert seed_test([0.01, 0.01, 0.01])["p_seed"] is None
    assert seed_test([])["mean_diff"] is None


def test_holm_step_down_by_hand():
    # sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> monotone 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, None, 0.9]) == [pytest.approx(1.0), None, pytest.approx(1.0)]


def test_a_sign_flip_test_over_four_pairs_cannot_reject():
    assert not can_reject(4)  # smallest p 2/16 = 0.125
    assert can_reject(6)  # 2/64 = 0.031
    assert not can_reject(0)
