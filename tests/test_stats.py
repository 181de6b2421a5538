"""qwen_ft.study.stats on cases that can be checked on paper."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from qwen_ft.study import stats
from qwen_ft.study.load import read_metrics

# ----------------------------------------------------------------------------- Holm


def test_holm_hand_computed():
    # sorted 0.01, 0.03, 0.04 -> 3 * 0.01, 2 * 0.03, max(1 * 0.04, 0.06): back in the input order
    assert stats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    # 4 * 0.01 = 0.04; 3 * 0.011 = 0.033 raised to 0.04 (monotone); 2 * 0.02 = 0.04; 0.5
    assert stats.holm([0.5, 0.011, 0.02, 0.01]) == pytest.approx([0.5, 0.04, 0.04, 0.04])
    assert stats.holm([0.6, 0.7]) == [1.0, 1.0]  # capped
    assert stats.holm([0.2]) == [0.2] and stats.holm([]) == []


# ----------------------------------------------------------------------------- bootstrap


def test_bootstrap_all_correct_is_a_point():
    assert stats.bootstrap_ci(np.ones((3, 20)), n_boot=500) == (1.0, 1.0, 1.0)


@pytest.mark.parametrize("matrix", [[[0, 1]], [[0], [1]]], ids=["two-questions", "two-seeds"])
def test_bootstrap_two_cells(matrix):
    # one 0 and one 1, resampled with replacement: means 0, 0.5, 1 with chances 1/4, 1/2, 1/4, so the
    # 2.5 and 97.5 percentiles are 0 and 1 - for questions and, separately, for seeds
    mean, lo, hi = stats.bootstrap_ci(np.array(matrix), n_boot=10_000, seed=3)
    assert (mean, lo, hi) == (0.5, 0.0, 1.0)


def test_bootstrap_one_seed_matches_direct_percentiles():
    rng = np.random.default_rng(11)
    c = (rng.random(40) < 0.4).astype(float)
    n_boot, seed = 2500, 5
    mean, lo, hi = stats.bootstrap_ci(c[None, :], n_boot=n_boot, seed=seed)
    # the documented draws: per block of 1000, seed indices then question indices; averaged directly
    direct_rng, boots = np.random.default_rng(seed), []
    for block in (1000, 1000, 500):
        direct_rng.integers(0, 1, (block, 1))
        boots.append(c[direct_rng.integers(0, 40, (block, 40))].mean(1))
    want = np.percentile(np.concatenate(boots), [2.5, 97.5])
    assert mean == pytest.approx(c.mean()) and (lo, hi) == pytest.approx(tuple(want))
    assert stats.bootstrap_ci(c[None, :], n_boot=n_boot, seed=seed) == (mean, lo, hi)  # seeded


# ----------------------------------------------------------------------------- paired differences, TOST


def _pair(n_q: int, plus: int, minus: int) -> tuple[np.ndarray, np.ndarray]:
    """One seed each: a beats b on `plus` questions, loses on `minus`, ties on the rest."""
    a, b = np.zeros((1, n_q)), np.zeros((1, n_q))
    a[0, :plus] = 1
    b[0, plus : plus + minus] = 1
    return a, b


def test_tost_hand_computed():
    a, b = _pair(400, 20, 20)  # d_q: 20 x +1, 20 x -1, 360 x 0; mean 0, sd sqrt(40/399)
    se = math.sqrt(40 / 399) / math.sqrt(400)
    for margin, equivalent in ((0.05, True), (0.02, False)):
        want = sps.t.sf(margin / se, 399)  # both one-sided tests give the same p when the mean is 0
        res = stats.paired_difference(a, b, n_boot=200, margin=margin)
        assert res["tost_p"] == pytest.approx(want, rel=1e-9)
        assert (res["tost_p"] < 0.05) is equivalent
    assert want == pytest.approx(0.104, abs=0.002)  # t = 0.02 / 0.01583 = 1.26
    # a precise difference of 4 points is not equivalent within 2, whatever the sample size
    a, b = _pair(400, 16, 0)
    assert stats.paired_difference(a, b, n_boot=200, margin=0.02)["tost_p"] > 0.5


def test_paired_difference_hand_computed():
    a = np.zeros((2, 10))
    a[0, :6], a[1, :4] = 1, 1  # seed means per question: 1 1 1 1 .5 .5 0 0 0 0
    b = np.zeros((1, 10))
    b[0, :3] = 1
    res = stats.paired_difference(a, b, n_boot=2000, seed=1, margin=0.02)
    # d_q = 0 0 0 1 .5 .5 0 0 0 0: mean 0.2, t-test against 0 by hand
    d = np.array([0, 0, 0, 1, 0.5, 0.5, 0, 0, 0, 0])
    t = d.mean() / (d.std(ddof=1) / math.sqrt(10))
    assert res["diff"] == pytest.approx(0.2)
    assert res["p"] == pytest.approx(2 * sps.t.sf(t, 9))
    assert res["ci_low"] <= 0.2 <= res["ci_high"] and res["a_seeds"] == 2 and res["b_seeds"] == 1
    # McNemar on the first seeds: a right / b wrong on questions 3, 4, 5; never the other way: 2 * 0.5 ** 3
    assert (res["a_right_b_wrong"], res["b_right_a_wrong"]) == (3, 0)
    assert res["mcnemar_p"] == pytest.approx(0.25)


def test_identical_optimizers():
    a = np.tile((np.arange(30) % 3 == 0).astype(float), (2, 1))
    res = stats.paired_difference(a, a.copy(), n_boot=300, margin=0.02)
    assert (res["diff"], res["ci_low"], res["ci_high"], res["p"], res["tost_p"]) == (0, 0, 0, 1.0, 0.0)
    with pytest.raises(ValueError, match="same questions"):
        stats.paired_difference(a, a[:, :10])


# ----------------------------------------------------------------------------- time to target


def test_time_to_target_from_metrics_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(
        '{"type": "step", "step": 10, "epoch": 0.5, "loss": 2.0, "grad_norm": 1.0, "lr": 0.001}\n'
        '{"type": "curve", "step": 20, "seconds": 8.0, "accuracy": 0.45, "n": 100}\n'
        '{"type": "curve", "step": 10, "seconds": 4.0, "accuracy": 0.30, "n": 100}\n'
        '{"type": "eval_tune", "step": 20, "score": 0.9}\n'
        '{"type": "curve", "step": 30, "seconds": 12.5, "accuracy": 0.52, "n": 100}\n'
        '{"type": "curve", "step": 40, "seconds": 16.0, "accur'
    )  # torn by a killed writer
    steps, curve = read_metrics(path)
    assert [r["step"] for r in curve] == [10, 20, 30] and len(steps) == 1
    assert stats.time_to_target(curve, 0.45) == {"step": 20, "seconds": 8.0}  # reaching counts (>=)
    assert stats.time_to_target(curve, 0.5) == {"step": 30, "seconds": 12.5}
    assert stats.time_to_target(curve, 0.6) == {"step": None, "seconds": None}  # never reached
    assert stats.time_to_target([], 0.1) == {"step": None, "seconds": None}


# ----------------------------------------------------------------------------- verdicts


def test_verdict_wording():
    res = {"diff": 0.012, "ci_low": -0.008, "ci_high": 0.031, "tost_p": 0.3, "level": 0.95}
    none = stats.verdict("AdamW", "SGD", res, 0.41, 0.02)
    assert none == "AdamW vs SGD: +1.2 points, 95 % CI -0.8..3.1, adjusted p = 0.41: no difference shown"
    worse = {"diff": -0.05, "ci_low": -0.07, "ci_high": -0.03, "tost_p": 0.99, "level": 0.95}
    assert (
        stats.verdict("AdamW", "SGD", worse, 0.0002, 0.02)
        == "AdamW vs SGD: -5.0 points, 95 % CI -7.0..-3.0, adjusted p < 0.001: SGD better"
    )
    same = {"diff": 0.002, "ci_low": -0.005, "ci_high": 0.009, "tost_p": 0.01, "level": 0.95}
    assert (
        stats.verdict("AdamW", "SGD", same, 0.6, 0.02)
        == "AdamW vs SGD: +0.2 points, 95 % CI -0.5..0.9, adjusted p = 0.6: "
        "equivalent within +-2 points (TOST p = 0.01)"
    )
    # "equivalent" only when TOST rejects: the adjusted TOST p, when given, decides
    assert stats.verdict("AdamW", "SGD", same, 0.6, 0.02, adjusted_tost_p=0.08).endswith(
        "no difference shown"
    )
    for text in (none, stats.verdict("A", "B", same, 0.6, 0.02)):
        assert "indistinguishable" not in text


# ----------------------------------------------------------------------------- performance profile


def test_performance_profile_hand_computed():
    scores = {"csqa": {"adamw": 0.50, "sgd": 0.40}, "mmlu": {"adamw": 0.30, "sgd": 0.35, "lion": 0.31}}
    prof = stats.performance_profile(scores)
    # gaps: adamw 0, 0.05; sgd 0.10, 0; lion missing on csqa (never counts there), 0.04 on mmlu
    assert [t for t, _ in prof["adamw"]] == pytest.approx([0, 0.04, 0.05, 0.10])
    assert [f for _, f in prof["adamw"]] == [0.5, 0.5, 1.0, 1.0]
    assert [f for _, f in prof["sgd"]] == [0.5, 0.5, 0.5, 1.0]
    assert [f for _, f in prof["lion"]] == [0.0, 0.5, 0.5, 0.5]
