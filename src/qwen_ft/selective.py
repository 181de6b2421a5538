"""Selective prediction: how accurate a classifier is on the rows it is most sure of, and when to abstain.

A router sends a query to a fallback when the classifier is unsure. Three things answer "how much does that
buy": the risk-coverage curve (the accuracy of the k most confident rows, for every k), its area (AURC: the
mean error over all coverages; lower is better, a classifier whose confidence says nothing scores its plain
error rate), and the accuracy at fixed coverages. A confidence threshold fitted on scored rows
(`fit_threshold`) is what `predict` and `serve` then apply (`Abstention`).

Rows of equal confidence cannot be told apart, so they are covered together: within a block of ties the
curve takes the block's mean accuracy (the expected value of any order among them). Otherwise the curve of a
constant-confidence classifier would depend on the row order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

COVERAGES = (0.8, 0.9, 0.95)
CATCH_ALL = ("other", "others", "misc", "miscellaneous", "general", "none", "unknown")
ABSTAIN = "abstain"


def _ordered(confidence, correct) -> tuple[np.ndarray, np.ndarray]:
    conf = np.asarray(confidence, dtype=np.float64)
    hit = np.asarray(correct, dtype=np.float64)
    if conf.shape != hit.shape or conf.ndim != 1:
        raise ValueError("confidence and correct must be 1-D and of the same length")
    order = np.argsort(-conf, kind="stable")
    return conf[order], hit[order]


def accuracy_by_coverage(confidence, correct) -> np.ndarray:
    """acc[k-1] = the expected accuracy of the k most confident rows, k = 1..n (ties shared as a block)."""
    conf, hit = _ordered(confidence, correct)
    n = len(conf)
    if n == 0:
        return np.zeros(0)
    cum = np.cumsum(hit)
    # each position's tie block [start, end): rows before it are all covered first, the block pro rata
    starts = np.searchsorted(-conf, -conf, side="left")
    ends = np.searchsorted(-conf, -conf, side="right")
    before = np.where(starts > 0, cum[np.maximum(starts - 1, 0)], 0.0)
    block_acc = (cum[ends - 1] - before) / (ends - starts)
    k = np.arange(1, n + 1)
    return (before + (k - starts) * block_acc) / k


def risk_coverage(confidence, correct) -> dict:
    """eval.json's "selective" section: the curve at 1 % steps of coverage, AURC, accuracy at COVERAGES."""
    acc = accuracy_by_coverage(confidence, correct)
    n = len(acc)
    if n == 0:
        return {"n": 0, "aurc": None, "curve": [], "accuracy_at_coverage": {}}

    def at(c: float) -> float:
        return float(acc[max(1, math.ceil(round(c * n, 9))) - 1])

    curve = [{"coverage": c / 100, "accuracy": round(at(c / 100), 6)} for c in range(1, 101)]
    return {"n": n, "aurc": round(float(np.mean(1.0 - acc)), 6), "full_coverage_accuracy": round(float(acc[-1]), 6),
            "accuracy_at_coverage": {f"{c:g}": round(at(c), 6) for c in COVERAGES}, "curve": curve}


def covered(confidence, threshold: float) -> np.ndarray:
    """The rows a threshold keeps: confidence >= threshold (the rest go to the fallback)."""
    return np.asarray(confidence, dtype=np.float64) >= threshold


def fit_threshold(confidence, correct, target: float) -> dict:
    """The lowest threshold whose covered rows reach `target` accuracy on these rows (so the largest coverage
    that does), with the coverage and accuracy it gives; `threshold` is None when no threshold reaches it."""
    conf = np.asarray(confidence, dtype=np.float64)
    hit = np.asarray(correct, dtype=bool)
    best = None
    for t in np.unique(conf)[::-1]:  # descending: each candidate covers a superset of the previous one
        keep = conf >= t
        acc = float(hit[keep].mean())
        if acc >= target:
            best = (float(t), float(keep.mean()), acc)
    out = {"target_accuracy": target, "n": int(len(conf)), "full_coverage_accuracy": float(hit.mean()) if len(hit) else None}
    if best is None:
        return {**out, "threshold": None, "coverage": 0.0, "covered_accuracy": None}
    return {**out, "threshold": best[0], "coverage": round(best[1], 6), "covered_accuracy": round(best[2], 6)}


def fallback_label(labels: list[str]) -> str:
    """The run's catch-all label when it has one (e.g. MMLU-Pro's "other"), else an explicit "abstain"."""
    for lab in labels:
        if lab.strip().casefold() in CATCH_ALL:
            return lab
    return ABSTAIN


@dataclass(frozen=True)
class Abstention:
    """Answer `fallback` instead of the label when the reported probability is below `threshold`."""

    threshold: float
    fallback: str
    source: str  # "--min-confidence" or the threshold.json it came from

    def apply(self, result: dict) -> dict:
        """A row's result with `abstained` set; an abstained row's `pred` is the fallback, `model_label` the
        label it would have answered."""
        p = result.get("probability")
        if p is None or p >= self.threshold:
            return {**result, "abstained": False}
        return {**result, "pred": self.fallback, "model_label": result["pred"], "abstained": True}
