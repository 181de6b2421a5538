"""The expected-best-of-k estimator against values worked out by hand (issue 28)."""

import pytest

from qwen_ft.study.expected_best import curve, expected_best, trials_to_plateau

SCORES = [0.50, 0.30, 0.40, 0.60, 0.20]  # sorted: 0.2 0.3 0.4 0.5 0.6


@pytest.mark.parametrize("k, expected", [
    (1, 0.40),  # the mean
    # k=2: weights (i^2 - (i-1)^2)/25 = 1,3,5,7,9 /25 -> (0.2 + 0.9 + 2.0 + 3.5 + 5.4) / 25
    (2, 12.0 / 25),
    # k=3: weights (i^3 - (i-1)^3)/125 = 1,7,19,37,61 /125
    (3, (0.2 * 1 + 0.3 * 7 + 0.4 * 19 + 0.5 * 37 + 0.6 * 61) / 125),
    (4, (0.2 * 1 + 0.3 * 15 + 0.4 * 65 + 0.5 * 175 + 0.6 * 369) / 625),
    (5, (0.2 * 1 + 0.3 * 31 + 0.4 * 211 + 0.5 * 781 + 0.6 * 2101) / 3125),
])
def test_expected_best_equals_the_hand_computed_value(k, expected):
    mean, sd = expected_best(SCORES, k)
    assert mean == pytest.approx(expected, abs=1e-12)
    assert sd > 0


def test_the_sd_at_k_1_is_the_population_sd_and_the_curve_rises():
    mean, sd = expected_best(SCORES, 1)
    assert sd == pytest.approx((sum((x - 0.4) ** 2 for x in SCORES) / 5) ** 0.5)
    means = [p["mean"] for p in curve(SCORES)]
    assert means == sorted(means) and means[-1] < max(SCORES)  # with replacement: never reaches the max
    assert trials_to_plateau(SCORES, within=0.06) == 4  # 0.5434 at k=4 is within 0.06 of 0.6; k=3 (0.52) not
    assert trials_to_plateau(SCORES, within=0.05) == 5


def test_one_score_and_bad_k():
    assert expected_best([0.7], 3) == (0.7, 0.0)
    with pytest.raises(ValueError):
        expected_best(SCORES, 0)
