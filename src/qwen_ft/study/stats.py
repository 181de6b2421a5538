"""The study's statistics: bootstrap CIs, paired differences, Holm, TOST, time-to-target, verdicts.

Pure functions of arrays and lists (numpy/scipy only, seeded); the report formats what they return.
Accuracies are fractions in [0, 1]; "points" are percentage points (0.02 = 2 points).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats as sps

_CHUNK = 1000  # bootstrap replicates drawn per block: bounds memory at _CHUNK x questions counts


def _counts(idx: np.ndarray, size: int) -> np.ndarray:
    """Rows of resampled indices -> rows of how often each index was drawn."""
    rows = idx.shape[0]
    flat = (idx + size * np.arange(rows)[:, None]).ravel()
    return np.bincount(flat, minlength=rows * size).reshape(rows, size)


def _resampled_means(m: np.ndarray, q_counts: np.ndarray, s_idx: np.ndarray) -> np.ndarray:
    """Mean of m [seeds x questions] over resampled questions (as counts) and resampled seeds (as indices)."""
    per_seed = q_counts @ m.T / m.shape[1]  # replicate x seed: each seed's mean over the resampled questions
    s_counts = _counts(s_idx, m.shape[0])
    return (per_seed * s_counts).sum(1) / m.shape[0]


def _as_matrix(correct) -> np.ndarray:
    m = np.asarray(correct, dtype=float)
    if m.ndim == 1:
        m = m[None, :]
    if m.ndim != 2 or m.size == 0:
        raise ValueError(f"expected a non-empty [seeds x questions] matrix, got shape {m.shape}")
    return m


def bootstrap_ci(
    correct, n_boot: int = 10_000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """(mean, lo, hi): percentile bootstrap of the accuracy over seeds AND questions.

    Each replicate draws the seeds with replacement (rng.integers(0, S, (block, S))), then the questions
    (rng.integers(0, Q, (block, Q))), in blocks of 1000 replicates; the mean is the observed one.
    """
    m = _as_matrix(correct)
    n_seeds, n_q = m.shape
    rng = np.random.default_rng(seed)
    boots = []
    for start in range(0, n_boot, _CHUNK):
        block = min(_CHUNK, n_boot - start)
        s_idx = rng.integers(0, n_seeds, (block, n_seeds))
        q_idx = rng.integers(0, n_q, (block, n_q))
        boots.append(_resampled_means(m, _counts(q_idx, n_q), s_idx))
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(np.concatenate(boots), [tail, 100 - tail])
    return float(m.mean()), float(lo), float(hi)


def _t_pvalue(d: np.ndarray, popmean: float, alternative: str) -> float:
    """One-sample t-test p-value; a zero-variance sample decides by its (constant) value alone."""
    if len(d) < 2 or np.ptp(d) == 0:
        diff = float(d.mean()) - popmean
        hit = {"two-sided": diff != 0, "greater": diff > 0, "less": diff < 0}[alternative]
        return 0.0 if hit else 1.0
    return float(sps.ttest_1samp(d, popmean, alternative=alternative).pvalue)


def tost_pvalue(d: np.ndarray, margin: float) -> float:
    """Two one-sided t-tests of mean(d) inside (-margin, +margin): the larger of the two p-values."""
    d = np.asarray(d, dtype=float)
    return max(_t_pvalue(d, -margin, "greater"), _t_pvalue(d, margin, "less"))


def paired_difference(
    a, b, n_boot: int = 10_000, seed: int = 0, margin: float = 0.02, level: float = 0.95
) -> dict:
    """a - b on the same questions; a, b are [seeds x questions] 0/1 matrices (seed counts may differ).

    d_q is the per-question difference of the seed-averaged correctness. The CI resamples the questions
    jointly for a and b and each side's seeds independently; p is a paired two-sided t-test on d_q,
    tost_p the equivalence test within +-margin on d_q, mcnemar_p the exact McNemar test on the two
    first seeds (a secondary figure: one seed each, no seed variance).
    """
    a, b = _as_matrix(a), _as_matrix(b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a and b must score the same questions: {a.shape[1]} vs {b.shape[1]}")
    n_q = a.shape[1]
    d = a.mean(0) - b.mean(0)
    rng = np.random.default_rng(seed)
    boots = []
    for start in range(0, n_boot, _CHUNK):
        block = min(_CHUNK, n_boot - start)
        sa = rng.integers(0, a.shape[0], (block, a.shape[0]))
        sb = rng.integers(0, b.shape[0], (block, b.shape[0]))
        q = _counts(rng.integers(0, n_q, (block, n_q)), n_q)
        boots.append(_resampled_means(a, q, sa) - _resampled_means(b, q, sb))
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(np.concatenate(boots), [tail, 100 - tail])
    only_a = int(((a[0] == 1) & (b[0] == 0)).sum())
    only_b = int(((a[0] == 0) & (b[0] == 1)).sum())
    mcnemar = float(sps.binomtest(only_a, only_a + only_b).pvalue) if only_a + only_b else 1.0
    return {
        "diff": float(d.mean()),
        "ci_low": float(lo),
        "ci_high": float(hi),
        "level": level,
        "p": _t_pvalue(d, 0.0, "two-sided"),
        "tost_p": tost_pvalue(d, margin),
        "margin": margin,
        "mcnemar_p": mcnemar,
        "a_right_b_wrong": only_a,
        "b_right_a_wrong": only_b,
        "n_questions": n_q,
        "a_seeds": a.shape[0],
        "b_seeds": b.shape[0],
    }


def holm(pvalues: list[float]) -> list[float]:
    """Holm-Bonferroni step-down adjusted p-values, in the input order (monotone, capped at 1).

    Hand-written (a few lines) because statsmodels' multipletests is not a dependency.
    """
    p = np.asarray(pvalues, dtype=float)
    m = len(p)
    if m == 0:
        return []
    order = np.argsort(p, kind="stable")
    stepped = np.maximum.accumulate((m - np.arange(m)) * p[order])
    out = np.empty(m)
    out[order] = np.minimum(stepped, 1.0)
    return [float(x) for x in out]


def time_to_target(curve: list[dict], target: float) -> dict:
    """First curve point (by step) whose accuracy reaches target: {"step", "seconds"}, both None if never."""
    for point in sorted(curve, key=lambda r: r["step"]):
        if point["accuracy"] >= target:
            return {"step": int(point["step"]), "seconds": point.get("seconds")}
    return {"step": None, "seconds": None}


def _p(p: float) -> str:
    return "< 0.001" if p < 0.001 else f"= {p:.2g}"


def verdict(
    a: str,
    b: str,
    res: dict,
    adjusted_p: float,
    margin: float,
    alpha: float = 0.05,
    adjusted_tost_p: float | None = None,
) -> str:
    """One sentence per pair. "better" needs the adjusted p below alpha; "equivalent" needs TOST to reject
    at alpha (the adjusted TOST p when given); anything else is "no difference shown"."""
    tost = res["tost_p"] if adjusted_tost_p is None else adjusted_tost_p
    head = (
        f"{a} vs {b}: {100 * res['diff']:+.1f} points, {100 * res.get('level', 0.95):.0f} % CI "
        f"{100 * res['ci_low']:.1f}..{100 * res['ci_high']:.1f}, adjusted p {_p(adjusted_p)}"
    )
    within = f"within +-{100 * margin:g} points (TOST p {_p(tost)})"
    if adjusted_p < alpha:
        better = a if res["diff"] > 0 else b
        return f"{head}: {better} better" + (f", by less than the margin: {within}" if tost < alpha else "")
    if tost < alpha:
        return f"{head}: equivalent {within}"
    return f"{head}: no difference shown"


def performance_profile(
    scores: dict[str, dict[str, float]], taus: list[float] | None = None
) -> dict[str, list[tuple[float, float]]]:
    """Dolan-More profile on the accuracy gap to the best optimizer of each workload.

    scores: workload -> optimizer -> accuracy. For each optimizer, (tau, fraction of workloads on which its
    gap to that workload's best is <= tau); an optimizer missing from a workload never counts there.
    taus default to every gap that occurs (and 0), so the profile's steps are exact.
    """
    workloads = list(scores)
    opts = list(dict.fromkeys(o for w in workloads for o in scores[w]))
    gaps = {o: [] for o in opts}
    for w in workloads:
        best = max(scores[w].values())
        for o in opts:
            gaps[o].append(best - scores[w][o] if o in scores[w] else math.inf)
    if taus is None:
        taus = sorted({0.0} | {round(g, 12) for gs in gaps.values() for g in gs if math.isfinite(g)})
    n = len(workloads)
    return {o: [(float(t), sum(g <= t + 1e-12 for g in gaps[o]) / n) for t in taus] for o in opts}
