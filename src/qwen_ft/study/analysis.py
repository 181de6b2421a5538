"""The numbers behind every table and plot of a study, from its loaded folder (study/load.py).

The statistics come from qwen_ft.study.stats; this module gathers them per final, per optimizer and per
pair of optimizers. The report, the plots and the notebook all show what `analyse` returns.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from qwen_ft.study import stats
from qwen_ft.study.load import Final, StudyData
from qwen_ft.study.protocol import best_trial

N_BOOT = 10_000


def correct_matrix(runs: list[Final], ids: list | None = None) -> np.ndarray | None:
    """[seeds x questions] 0/1 matrix of one optimizer's finals, checked to score the same questions."""
    if not runs or any(f.correct is None for f in runs):
        return None
    ids = runs[0].ids if ids is None else ids
    for f in runs:
        if f.ids != ids:
            raise ValueError(
                f"finals/{f.optimizer}/seed-{f.seed}: predictions.jsonl holds other question ids "
                "or another order than the other finals; every final must score the same rows"
            )
    return np.stack([f.correct for f in runs])


def _median(values: list[float | None]) -> float | None:
    """Median with never-reached (None) counted as infinitely late; None if the median is not reached."""
    if not values:
        return None
    med = float(np.median([math.inf if v is None else v for v in values]))
    return None if math.isinf(med) else med


def analyse(data: StudyData, n_boot: int = N_BOOT) -> dict:
    """The numbers behind every table and plot: results (one per final), summary (one per optimizer),
    pairwise (one per pair of optimizers)."""
    p = data.spec.get("protocol", {})
    target, margin, seed = p.get("target"), p.get("equivalence_margin", 0.02), data.spec.get("seed", 0)
    opts = [o for o in data.optimizers if o in data.finals]
    first = data.finals[opts[0]][0].ids if opts else None
    matrices = {o: correct_matrix(data.finals[o], first) for o in opts}
    results, summary = [], []
    for o in opts:
        rows, ttts = _final_rows(data, o, target)
        results += rows
        summary.append(_summary_row(data, o, matrices[o], ttts, n_boot, seed))
    pairwise = _pairwise(opts, matrices, n_boot, seed, margin)
    return {"results": results, "summary": summary, "pairwise": pairwise, "target": target, "margin": margin}


def _final_rows(data: StudyData, o: str, target: float | None) -> tuple[list[dict], list[dict]]:
    """One row per final of `o` (results.csv), and each final's time to target."""
    results, ttts = [], []
    for f in data.finals[o]:
        r = f.result
        ttt = (
            stats.time_to_target(f.curve, target)
            if target is not None
            else {"step": None, "seconds": None}
        )
        ttts.append(ttt)
        bounds = r.get("adabound_bounds") or {}
        results.append(
            {
                "optimizer": o,
                "seed": f.seed,
                "accuracy": r.get("accuracy"),
                "n": r.get("n"),
                "steps": r.get("steps"),
                "best_step": r.get("best_step"),
                "train_seconds": r.get("train_seconds"),
                "step_time_s": r.get("step_time_s"),
                "optimizer_state_bytes": r.get("optimizer_state_bytes"),
                "eval_seconds": r.get("eval_seconds"),
                "samples_per_s": r.get("samples_per_s"),
                "ttt_step": ttt["step"],
                "ttt_seconds": ttt["seconds"],
                "adabound_lower": bounds.get("lower"),
                "adabound_upper": bounds.get("upper"),
                "adabound_ratio": bounds.get("ratio"),
                **(r.get("params") or {}),
            }
        )
    return results, ttts


def _summary_row(data: StudyData, o: str, m: np.ndarray | None, ttts: list[dict], n_boot: int, seed: int) -> dict:
    """The row of `o` in summary.csv: seeds' mean, sd and bootstrap CI, time to target, resources, best trial."""
    accs = [f.result["accuracy"] for f in data.finals[o]]
    _, lo, hi = stats.bootstrap_ci(m, n_boot, seed) if m is not None else (None, None, None)
    best = best_trial(data.trials.get(o, []))
    return {
        "optimizer": o,
        "n_seeds": len(accs),
        "mean": float(np.mean(accs)),
        "sd": float(np.std(accs, ddof=1)) if len(accs) > 1 else None,
        "ci_low": lo,
        "ci_high": hi,
        **{f"acc_seed_{f.seed}": f.result["accuracy"] for f in data.finals[o]},
        "ttt_step_median": _median([t["step"] for t in ttts]),
        "ttt_seconds_median": _median([t["seconds"] for t in ttts]),
        "reached": f"{sum(t['step'] is not None for t in ttts)}/{len(ttts)}",
        "step_time_s": _mean(f.result.get("step_time_s") for f in data.finals[o]),
        "optimizer_state_bytes": _mean(f.result.get("optimizer_state_bytes") for f in data.finals[o]),
        "trials": len(data.trials.get(o, [])),
        "best_trial": best["k"] if best else None,
        "best_trial_score": best["score"] if best else None,
        "params": _params(data.finals[o][0].result.get("params") or {}),
    }


def _pairwise(opts: list[str], matrices: dict, n_boot: int, seed: int, margin: float) -> list[dict]:
    """One row per pair of optimizers with predictions on file (pairwise.csv), Holm-adjusted over the pairs."""
    pairs = [
        (a, b)
        for a, b in itertools.combinations(opts, 2)
        if matrices[a] is not None and matrices[b] is not None
    ]
    tests = [stats.paired_difference(matrices[a], matrices[b], n_boot, seed, margin) for a, b in pairs]
    adj, adj_tost = stats.holm([t["p"] for t in tests]), stats.holm([t["tost_p"] for t in tests])
    return [
        {
            "a": a,
            "b": b,
            "diff_points": 100 * t["diff"],
            "ci_low_points": 100 * t["ci_low"],
            "ci_high_points": 100 * t["ci_high"],
            "p": t["p"],
            "p_holm": pa,
            "tost_p": t["tost_p"],
            "tost_p_holm": ta,
            "margin_points": 100 * margin,
            "mcnemar_p": t["mcnemar_p"],
            "a_right_b_wrong": t["a_right_b_wrong"],
            "b_right_a_wrong": t["b_right_a_wrong"],
            "n_questions": t["n_questions"],
            "verdict": stats.verdict(a, b, t, pa, margin, adjusted_tost_p=ta),
        }
        for (a, b), t, pa, ta in zip(pairs, tests, adj, adj_tost)
    ]


def _mean(values) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def _params(params: dict) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def trial_rows(data: StudyData) -> list[dict]:
    """One row per trial on file (trials.csv)."""
    return [
        {
            "optimizer": o,
            "k": t.get("k"),
            "state": t.get("state"),
            "score": t.get("score"),
            "tune_loss": t.get("tune_loss"),
            "best_step": t.get("best_step"),
            "steps": t.get("steps"),
            "train_seconds": t.get("train_seconds"),
            **(t.get("params") or {}),
        }
        for o in data.optimizers
        for t in data.trials.get(o, [])
    ]
