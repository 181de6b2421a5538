"""Expected best score after k trials (Dodge et al. 2019, "Show Your Work", section 3).

From N observed trial scores, the expected maximum of k trials drawn from them (with replacement, the
paper's estimator) is sum_i v_(i) * [(i/N)^k - ((i-1)/N)^k] over the sorted scores v_(1) <= ... <= v_(N);
its variance uses the same weights on v^2. A curve that is still rising at the budget used says an
optimizer's ranking depends on how much tuning it got.
"""

from __future__ import annotations

import math


def expected_best(scores: list[float], k: int) -> tuple[float, float]:
    """(expected maximum of k trials, its standard deviation) from the observed `scores`."""
    if not scores:
        raise ValueError("no trial scores")
    if k < 1:
        raise ValueError(f"k must be >= 1 (got {k})")
    v = sorted(scores)
    n = len(v)
    weights = [(i / n) ** k - ((i - 1) / n) ** k for i in range(1, n + 1)]
    mean = sum(w * x for w, x in zip(weights, v))
    second = sum(w * x * x for w, x in zip(weights, v))
    return mean, math.sqrt(max(0.0, second - mean * mean))


def curve(scores: list[float], k_max: int | None = None) -> list[dict]:
    """[{"k", "mean", "sd"}] for k = 1..k_max (default: the number of scores)."""
    return [{"k": k, "mean": m, "sd": s}
            for k in range(1, (k_max or len(scores)) + 1) for m, s in [expected_best(scores, k)]]


def trials_to_plateau(scores: list[float], within: float = 0.01) -> int:
    """The smallest k whose expected best is within `within` (e.g. 1 point = 0.01) of the best score seen."""
    top = max(scores)
    for k in range(1, len(scores) + 1):
        if expected_best(scores, k)[0] >= top - within:
            return k
    return len(scores)
