"""Calibration of a classifier's probabilities: expected calibration error (ECE) with its reliability bins,
the NLL of the gold labels, and temperature scaling (Guo et al. 2017, "On Calibration of Modern Neural
Networks") fitted on scored rows.

A row's scores are what the engine takes its softmax over, as `{"labels", "values", "groups"}`: each label's
raw score (its log-probability, optionally length-normalized, under exact decoding; its first answer
token's logit under constrained decoding) and its group. Labels of one group share one softmax term
(answers that start with the same token); under exact decoding each label is its own group. A
temperature T gives softmax(values / T) over the groups; T > 0 keeps every row's order, so predictions
never change.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

from qwen_ft.errors import UserError
from qwen_ft.run_checks import T_BOUNDS  # the temperatures fitted and accepted

log = logging.getLogger(__name__)

N_BINS = 15


# ----------------------------------------------------------------------------- scores

def probabilities(scores: dict, temperature: float) -> list[float]:
    """Each label's probability (aligned with scores["labels"]) at `temperature`."""
    firsts: dict = {}
    for value, group in zip(scores["values"], scores["groups"]):
        firsts.setdefault(group, value)
    keys = list(firsts)
    z = np.array([firsts[k] for k in keys], dtype=np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    by_group = dict(zip(keys, p.tolist()))
    return [by_group[g] for g in scores["groups"]]


def score_matrix(scores: list[dict], golds: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(rows x groups raw scores, -inf where a row has fewer groups; each row's gold group, -1 when the
    gold label is not among the row's labels)."""
    width = max((len(set(s["groups"])) for s in scores), default=1)
    values = np.full((len(scores), width), -np.inf)
    gold = np.full(len(scores), -1, dtype=np.int64)
    for i, (s, g) in enumerate(zip(scores, golds)):
        index: dict = {}
        for lab, value, group in zip(s["labels"], s["values"], s["groups"]):
            if group not in index:
                index[group] = len(index)
                values[i, index[group]] = value
            if lab == g:
                gold[i] = index[group]
    return values, gold


def _log_softmax(values: np.ndarray, temperature: float) -> np.ndarray:
    from scipy.special import logsumexp

    z = values / temperature
    return z - logsumexp(z, axis=1, keepdims=True)


def nll(values: np.ndarray, gold: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-probability of the gold labels (rows whose gold is known)."""
    keep = gold >= 0
    if not keep.any():
        return float("nan")
    logp = _log_softmax(values[keep], temperature)
    return float(-logp[np.arange(int(keep.sum())), gold[keep]].mean())


def confidences(values: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Each row's top-1 probability (that of its prediction: the argmax under either decoding)."""
    return np.exp(_log_softmax(values, temperature).max(axis=1))


# ----------------------------------------------------------------------------- ECE

def reliability(conf, correct, n_bins: int = N_BINS) -> tuple[float, list[dict]]:
    """(ECE, reliability bins): equal-width confidence bins (lower, upper] (0 goes to the first); ECE is
    the count-weighted mean |accuracy - confidence| over the bins."""
    conf = np.asarray(conf, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    which = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    bins, ece = [], 0.0
    for b in range(n_bins):
        mask = which == b
        count = int(mask.sum())
        acc = float(correct[mask].mean()) if count else None
        mean_conf = float(conf[mask].mean()) if count else None
        if count:
            ece += count / len(conf) * abs(acc - mean_conf)
        bins.append({"lower": round(b / n_bins, 6), "upper": round((b + 1) / n_bins, 6), "count": count,
                     "confidence": None if mean_conf is None else round(mean_conf, 6),
                     "accuracy": None if acc is None else round(acc, 6)})
    return (round(ece, 6) if len(conf) else float("nan")), bins


def ece(conf, correct, n_bins: int = N_BINS) -> float:
    return reliability(conf, correct, n_bins)[0]


# ----------------------------------------------------------------------------- temperature

def fit_temperature(values: np.ndarray, gold: np.ndarray) -> float:
    """The T > 0 minimizing the gold labels' NLL. The NLL is convex in 1/T, hence unimodal in log T: a
    bounded 1-D search on log T finds its minimum (at a bound when the rows are all right or all wrong)."""
    from scipy.optimize import minimize_scalar

    keep = gold >= 0
    values, gold = values[keep], gold[keep]
    lo, hi = math.log(T_BOUNDS[0]), math.log(T_BOUNDS[1])
    res = minimize_scalar(lambda u: nll(values, gold, math.exp(u)), bounds=(lo, hi), method="bounded",
                          options={"xatol": 1e-5})
    return float(math.exp(res.x))


def fit(scores: list[dict], golds: list[str], correct: list[bool], seed: int = 0) -> dict:
    """Temperature fitted on these rows, with NLL and ECE before (T = 1) and after. ECE after fitting on the
    same rows is optimistic, so a 2-fold cross-fitted ECE is added: T fitted on one half (a seeded shuffle),
    ECE measured on the other, the two halves averaged."""
    values, gold = score_matrix(scores, golds)
    correct = np.asarray(correct, dtype=bool)
    n = int((gold >= 0).sum())
    if n < 2:
        raise UserError(f"a temperature needs at least 2 scored rows with a known label (got {n})",
                        "Score more rows (--num-val-samples, or another --split/--data).")
    t = fit_temperature(values, gold)
    if not T_BOUNDS[0] * 1.01 < t < T_BOUNDS[1] / 1.01:
        log.warning("the fitted temperature %.4g is at the end of its search range (%g to %g): on these rows the "
                    "best probabilities are %s", t, *T_BOUNDS,
                    "as flat as it allows (the model is no better than chance here)" if t > 1
                    else "as sharp as it allows (every row is right)")
    out = {"temperature": round(t, 6), "n": n,
           "nll_before": round(nll(values, gold), 6), "nll_after": round(nll(values, gold, t), 6),
           "ece_before": ece(confidences(values), correct), "ece_after": ece(confidences(values, t), correct),
           "ece_cross_fitted": None, "cross_fit_temperatures": None, "n_bins": N_BINS}
    if n >= 4:
        order = np.random.default_rng(seed).permutation(len(values))
        halves = [order[: len(order) // 2], order[len(order) // 2:]]
        temps, eces = [], []
        for fit_on, measure_on in (halves, halves[::-1]):
            tk = fit_temperature(values[fit_on], gold[fit_on])
            temps.append(round(tk, 6))
            eces.append(ece(confidences(values[measure_on], tk), correct[measure_on]))
        out["ece_cross_fitted"] = round(float(np.mean(eces)), 6)
        out["cross_fit_temperatures"] = temps
    return out


def summary(scores: list[dict], golds: list[str], correct: list[bool], temperature: float | None) -> dict:
    """eval.json's "calibration": ECE, reliability bins and NLL of the reported probabilities (at
    `temperature`, or raw when None), and the raw figures beside them."""
    values, gold = score_matrix(scores, golds)
    t = temperature or 1.0
    ece_value, bins = reliability(confidences(values, t), correct)
    out = {"temperature": temperature, "n_bins": N_BINS, "ece": ece_value, "nll": round(nll(values, gold, t), 6),
           "bins": bins}
    if temperature is None:
        out.update({"ece_raw": ece_value, "nll_raw": out["nll"]})
    else:
        raw_ece, raw_bins = reliability(confidences(values), correct)
        out.update({"ece_raw": raw_ece, "nll_raw": round(nll(values, gold), 6), "bins_raw": raw_bins})
    return out


# ----------------------------------------------------------------------------- figure

def write_reliability(section: dict, path: Path) -> None:
    """Reliability diagram of eval.json's "calibration": accuracy per confidence bin against the diagonal
    (the raw probabilities as outlines when a temperature was applied)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = 1 / section["n_bins"]
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect calibration")
    if section.get("bins_raw"):
        raw = [b for b in section["bins_raw"] if b["count"]]
        ax.bar([b["lower"] for b in raw], [b["accuracy"] for b in raw], width=width, align="edge", fill=False,
               edgecolor="tab:red", label=f"raw (ECE {section['ece_raw']:.3f})")
    shown = [b for b in section["bins"] if b["count"]]
    label = f"T = {section['temperature']:.3g}" if section["temperature"] else "raw"
    ax.bar([b["lower"] for b in shown], [b["accuracy"] for b in shown], width=width, align="edge", alpha=0.6,
           color="tab:blue", edgecolor="tab:blue", label=f"{label} (ECE {section['ece']:.3f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (top-1 probability)")
    ax.set_ylabel("accuracy")
    ax.set_title("Reliability diagram")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    from qwen_ft.outputs import save_figure

    save_figure(fig, path)
    plt.close(fig)


def record(report: dict) -> dict:
    """calibration.json's content from an eval.json report fitted with `fit_temperature=True`: the temperature
    and the scoring it holds for (the engine applies it only to the same decode and normalisation)."""
    fit_ = report["calibration"]["fit"]
    log.info("calibration: temperature %.4g fitted on %d rows; NLL %.4f -> %.4f, ECE %.4f -> %.4f (2-fold "
             "cross-fitted %s)", fit_["temperature"], fit_["n"], fit_["nll_before"], fit_["nll_after"],
             fit_["ece_before"], fit_["ece_after"], fit_["ece_cross_fitted"])
    return {"temperature": fit_["temperature"], "fitted_on": report["data"], "n": fit_["n"], "decode": report["decode"],
            "normalize": report["normalize"], "precision": report["precision"],
            "adapter_scale": report.get("adapter_scale", 1.0),
            **{k: v for k, v in fit_.items() if k not in ("temperature", "n")}}
