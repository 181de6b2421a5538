"""The study's report: CSV tables, PNG plots and results/report.md, read from the study folder only.

Reads study.json, data/summary.json, baselines/*/eval.json, trials/<opt>/trial-<k>/trial.json and
finals/<opt>/seed-<s>/{result.json, eval/predictions.jsonl, metrics.jsonl}; nothing is scraped from
logs. The numbers come from qwen_ft.study.stats; this module only gathers and formats them. The
notebook (notebook.py) calls the same load/analyse/plot functions, so its plots are the report's.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qwen_ft.runs import atomic_write_text, read_jsonl_tolerant, save_figure
from qwen_ft.study import stats

log = logging.getLogger(__name__)

N_BOOT = 10_000
CLOSED_RATIO = 1.5  # AdaBound's bounds count as closed when upper/lower at the last step is below this
PLOTS = {
    "lr_sensitivity.png": "Learning-rate sensitivity (tuning trials)",
    "accuracy_per_seed.png": "Validation accuracy per seed",
    "curves.png": "Validation-subsample accuracy during training",
    "time_to_target.png": "Time to target",
    "resources.png": "Optimizer state and step time",
}
BASELINE_NAMES = {
    "untrained": "untrained, our prompt",
    "untrained_loglik_token": "untrained, log-likelihood / token",
    "untrained_loglik_char": "untrained, log-likelihood / character",
}


# ----------------------------------------------------------------------------- reading


@dataclass
class Final:
    optimizer: str
    seed: int
    result: dict
    ids: list | None = None  # validation question ids, in file order
    correct: np.ndarray | None = None  # 0/1 per question
    curve: list[dict] = field(default_factory=list)  # {"step", "seconds", "accuracy", "n"}
    steps: list[dict] = field(default_factory=list)  # {"step", "epoch", "loss", "grad_norm", "lr"}


@dataclass
class StudyData:
    root: Path
    spec: dict  # study.json
    data: dict  # data/summary.json
    baselines: dict[str, dict]
    trials: dict[str, list[dict]]
    finals: dict[str, list[Final]]

    @property
    def optimizers(self) -> list[str]:
        declared = list(self.spec.get("optimizers", {}))
        found = [o for o in sorted({*self.trials, *self.finals}) if o not in declared]
        return [o for o in declared + found if o in self.trials or o in self.finals]


def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _numbered(folder: Path, prefix: str) -> list[tuple[int, Path]]:
    out = []
    for p in folder.glob(f"{prefix}-*") if folder.is_dir() else []:
        m = re.fullmatch(rf"{prefix}-(-?\d+)", p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p))
    return sorted(out)


def read_metrics(path: Path) -> tuple[list[dict], list[dict]]:
    """(step records, curve records) of a metrics.jsonl; unknown types and a torn last line are skipped."""
    records = read_jsonl_tolerant(path)
    return (
        [r for r in records if r.get("type") == "step"],
        sorted((r for r in records if r.get("type") == "curve"), key=lambda r: r["step"]),
    )


def load_study(study_dir: str | Path) -> StudyData:
    root = Path(study_dir)
    trials, finals = {}, {}
    for opt_dir in sorted(p for p in (root / "trials").glob("*") if p.is_dir()):
        trials[opt_dir.name] = [
            _json(p / "trial.json") for _, p in _numbered(opt_dir, "trial") if (p / "trial.json").is_file()
        ]
    for opt_dir in sorted(p for p in (root / "finals").glob("*") if p.is_dir()):
        runs = []
        for seed, p in _numbered(opt_dir, "seed"):
            if not (p / "result.json").is_file():
                continue
            f = Final(opt_dir.name, seed, _json(p / "result.json"))
            preds = p / "eval" / "predictions.jsonl"
            if preds.is_file():
                rows = read_jsonl_tolerant(preds)
                f.ids = [r["id"] for r in rows]
                f.correct = np.array([bool(r["correct"]) for r in rows], dtype=float)
            f.steps, f.curve = read_metrics(p / "metrics.jsonl")
            runs.append(f)
        if runs:
            finals[opt_dir.name] = runs
    baselines = {p.parent.name: _json(p) for p in sorted((root / "baselines").glob("*/eval.json"))}
    summary = root / "data" / "summary.json"
    return StudyData(
        root,
        _json(root / "study.json"),
        _json(summary) if summary.is_file() else {},
        baselines,
        trials,
        finals,
    )


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


# ----------------------------------------------------------------------------- analysis


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
        ttts = []
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
        accs = [f.result["accuracy"] for f in data.finals[o]]
        m = matrices[o]
        _, lo, hi = stats.bootstrap_ci(m, n_boot, seed) if m is not None else (None, None, None)
        best = best_trial(data.trials.get(o, []))
        row = {
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
        summary.append(row)
    pairs = [
        (a, b)
        for a, b in itertools.combinations(opts, 2)
        if matrices[a] is not None and matrices[b] is not None
    ]
    tests = [stats.paired_difference(matrices[a], matrices[b], n_boot, seed, margin) for a, b in pairs]
    adj, adj_tost = stats.holm([t["p"] for t in tests]), stats.holm([t["tost_p"] for t in tests])
    pairwise = [
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
    return {"results": results, "summary": summary, "pairwise": pairwise, "target": target, "margin": margin}


def best_trial(trials: list[dict]) -> dict | None:
    done = [t for t in trials if t.get("state", "complete") == "complete" and t.get("score") is not None]
    # the study's own rule (phases.best_trial): the best tuning accuracy, ties to the lower tuning loss,
    # then to the earlier trial
    return max(done, key=lambda t: (t["score"], -(t.get("tune_loss") or 0), -t["k"])) if done else None


def _mean(values) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def _params(params: dict) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


# ----------------------------------------------------------------------------- plots


def _plt():
    import sys

    import matplotlib

    if "ipykernel" not in sys.modules:  # files only; a notebook keeps its inline backend
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colors(data: StudyData) -> dict[str, str]:
    return {o: f"C{i}" for i, o in enumerate(data.optimizers)}


def plot_lr_sensitivity(data: StudyData):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    colors = _colors(data)
    for o in data.optimizers:
        done = sorted(
            (
                t
                for t in data.trials.get(o, [])
                if t.get("state", "complete") == "complete"
                and t.get("score") is not None
                and "learning_rate" in t.get("params", {})
            ),
            key=lambda t: t["params"]["learning_rate"],
        )
        diverged = [t for t in data.trials.get(o, []) if t.get("state") == "diverged"
                    and "learning_rate" in t.get("params", {})]
        if diverged:
            ax.plot([t["params"]["learning_rate"] for t in diverged], [0.0] * len(diverged), "x", color=colors[o],
                    markersize=9, label=f"{o}: {len(diverged)} diverged")
        if not done:
            continue
        x, y = [t["params"]["learning_rate"] for t in done], [100 * t["score"] for t in done]
        ax.plot(x, y, "o-", color=colors[o], label=f"{o} ({len(done)} trials)", alpha=0.85)
        best = best_trial(done)
        ax.plot(
            best["params"]["learning_rate"],
            100 * best["score"],
            "*",
            color=colors[o],
            markersize=16,
            markeredgecolor="black",
        )
    chance = data.data.get("chance")
    if chance:
        ax.axhline(100 * chance, color="gray", linestyle=":", label=f"chance ({100 * chance:.0f} %)")
    ax.set_xscale("log")
    ax.set(
        xlabel="learning rate",
        ylabel="tuning-split accuracy (%)",
        title="Trial score vs learning rate (star: best trial, re-run as the finals)",
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _baseline_lines(ax, data: StudyData) -> None:
    chance = data.data.get("chance")
    if chance is not None:
        ax.axhline(100 * chance, color="gray", linestyle=":", label=f"chance ({100 * chance:.1f} %)")
    for (name, ev), style in zip(data.baselines.items(), ["--", "-.", (0, (5, 1, 1, 1)), (0, (1, 1))]):
        ax.axhline(
            100 * ev["accuracy"],
            color="black",
            linestyle=style,
            linewidth=1,
            label=f"{BASELINE_NAMES.get(name, name)} ({100 * ev['accuracy']:.1f} %)",
        )


def plot_accuracy_per_seed(data: StudyData, analysis: dict):
    plt = _plt()
    rows = analysis["summary"]
    fig, ax = plt.subplots(figsize=(max(6, 1.5 * len(rows) + 3), 4.5))
    colors = _colors(data)
    for i, r in enumerate(rows):
        accs = [100 * f.result["accuracy"] for f in data.finals[r["optimizer"]]]
        offsets = np.linspace(-0.12, 0.12, len(accs)) if len(accs) > 1 else [0.0]
        ax.scatter(
            i + np.asarray(offsets) - 0.15,
            accs,
            color=colors[r["optimizer"]],
            zorder=3,
            s=28,
            label="seeds" if i == 0 else None,
        )
        if r["ci_low"] is not None:
            ax.errorbar(
                i + 0.15,
                100 * r["mean"],
                fmt="none",
                capsize=6,
                ecolor="black",
                yerr=[[100 * (r["mean"] - r["ci_low"])], [100 * (r["ci_high"] - r["mean"])]],
                label="95 % bootstrap CI" if i == 0 else None,
            )
        ax.plot(
            i + 0.15,
            100 * r["mean"],
            "D",
            color=colors[r["optimizer"]],
            markeredgecolor="black",
            markersize=8,
            label="mean" if i == 0 else None,
            zorder=4,
        )
        ax.annotate(f"{100 * r['mean']:.1f}", (i + 0.22, 100 * r["mean"]), fontsize=8, va="center")
    _baseline_lines(ax, data)
    ax.set_xticks(range(len(rows)), [r["optimizer"] for r in rows])
    n = analysis["results"][0]["n"] if analysis["results"] else ""
    ax.set(ylabel="validation accuracy (%)", title=f"Accuracy per seed, mean and 95 % CI (n = {n} questions)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


def _band(runs: list[Final], key: str, source: str):
    """steps, mean, min, max of `key` over the seeds at each step any seed recorded."""
    by_step: dict[int, list[float]] = {}
    for f in runs:
        for r in getattr(f, source):
            if r.get(key) is not None:
                by_step.setdefault(r["step"], []).append(r[key])
    steps = sorted(by_step)
    vals = [by_step[s] for s in steps]
    return steps, [np.mean(v) for v in vals], [min(v) for v in vals], [max(v) for v in vals]


def _smooth(values: list[float], window: int) -> np.ndarray:
    """Trailing moving mean (per-step losses are noisy; the curve points are not smoothed)."""
    v = np.asarray(values, dtype=float)
    if window <= 1 or len(v) == 0:
        return v
    c = np.cumsum(np.insert(v, 0, 0.0))
    idx = np.arange(1, len(v) + 1)
    return (c[idx] - c[np.maximum(idx - window, 0)]) / np.minimum(idx, window)


def plot_curves(data: StudyData, target: float | None = None):
    plt = _plt()
    target = data.spec.get("protocol", {}).get("target") if target is None else target
    fig, (ax, ax_l) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = _colors(data)
    for o in [o for o in data.optimizers if o in data.finals]:
        runs = data.finals[o]
        for axis, key, source, scale in ((ax, "accuracy", "curve", 100), (ax_l, "loss", "steps", 1)):
            steps, mean, lo, hi = _band(runs, key, source)
            if source == "steps":
                mean, lo, hi = (_smooth(x, max(1, len(steps) // 25)) for x in (mean, lo, hi))
            if steps:
                axis.plot(
                    steps, np.multiply(mean, scale), color=colors[o], label=f"{o} (mean of {len(runs)})"
                )
                axis.fill_between(
                    steps,
                    np.multiply(lo, scale),
                    np.multiply(hi, scale),
                    color=colors[o],
                    alpha=0.2,
                    linewidth=0,
                )
    if target is not None:
        ax.axhline(
            100 * target, color="red", linestyle="--", linewidth=1, label=f"target ({100 * target:g} %)"
        )
    rows = data.spec.get("protocol", {}).get("curve_rows")
    ax.set(
        xlabel="step",
        ylabel="accuracy (%)",
        title="Validation-subsample accuracy"
        + (f" ({rows} questions)" if rows else "")
        + "; band: min..max over seeds",
    )
    ax_l.set(xlabel="step", ylabel="loss", title="Training loss (moving mean); band: min..max over seeds")
    for axis in (ax, ax_l):
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_time_to_target(data: StudyData, analysis: dict):
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colors = _colors(data)
    rows = analysis["summary"]
    names = [r["optimizer"] for r in rows]
    for ax, key, budget, label in zip(
        axes, ("step", "seconds"), ("steps", "train_seconds"), ("steps", "training seconds")
    ):
        for i, r in enumerate(rows):
            med = r[f"ttt_{key}_median"]
            if med is None:  # the hatched bar spans the run's whole budget: not reached within it
                top = max(
                    [x[budget] or 0 for x in analysis["results"] if x["optimizer"] == r["optimizer"]] + [1]
                )
                ax.bar(i, top, color="none", edgecolor=colors[r["optimizer"]], hatch="//", alpha=0.5)
                ax.text(
                    i, top / 2, f"not reached in {top:.4g}", ha="center", va="center", rotation=90, fontsize=9
                )
            else:
                ax.bar(i, med, color=colors[r["optimizer"]], alpha=0.8)
                ax.text(i, med, f"{med:.4g}", ha="center", va="bottom", fontsize=8)
            seeds = [x[f"ttt_{key}"] for x in analysis["results"] if x["optimizer"] == r["optimizer"]]
            ax.scatter(
                [i] * sum(s is not None for s in seeds),
                [s for s in seeds if s is not None],
                color="black",
                s=14,
                zorder=3,
            )
            ax.text(
                i,
                0,
                f"reached {r['reached']}",
                ha="center",
                va="bottom",
                fontsize=7,
                color="white" if med else "black",
            )
        ax.set_xticks(range(len(names)), names)
        ax.set(ylabel=label, title=f"{label.capitalize()} to target")
        ax.grid(axis="y", alpha=0.3)
    target = analysis.get("target")
    fig.suptitle(
        f"First curve point at or above the target accuracy ({100 * target:g} %); bar: median over "
        "seeds (a seed that never reaches it counts as infinitely late), dots: seeds"
        if target is not None
        else "No target declared",
        fontsize=9,
    )
    fig.tight_layout()
    return fig


def plot_resources(data: StudyData, analysis: dict):
    plt = _plt()
    fig, (ax_m, ax_t) = plt.subplots(1, 2, figsize=(11, 4))
    colors = _colors(data)
    rows = analysis["summary"]
    names = [r["optimizer"] for r in rows]
    for ax, key, scale, label in (
        (ax_m, "optimizer_state_bytes", 2**-20, "optimizer state (MiB)"),
        (ax_t, "step_time_s", 1000, "time per training step (ms)"),
    ):
        for i, r in enumerate(rows):
            v = (r[key] or 0) * scale
            ax.bar(i, v, color=colors[r["optimizer"]], alpha=0.8)
            ax.text(i, v, f"{v:.3g}", ha="center", va="bottom", fontsize=8)
            seeds = [
                x[key] * scale
                for x in analysis["results"]
                if x["optimizer"] == r["optimizer"] and x[key] is not None
            ]
            ax.scatter([i] * len(seeds), seeds, color="black", s=14, zorder=3)
        ax.set_xticks(range(len(names)), names)
        ax.set(ylabel=label, title=label[0].upper() + label[1:])
        ax.grid(axis="y", alpha=0.3)
    ax_m.set_title("Optimizer state (bytes of the state tensors, MiB)")
    fig.tight_layout()
    return fig


def save_plots(data: StudyData, analysis: dict, out_dir: Path) -> list[str]:
    plt = _plt()
    makers = {
        "lr_sensitivity.png": lambda: plot_lr_sensitivity(data),
        "accuracy_per_seed.png": lambda: plot_accuracy_per_seed(data, analysis),
        "curves.png": lambda: plot_curves(data, analysis["target"]),
        "time_to_target.png": lambda: plot_time_to_target(data, analysis),
        "resources.png": lambda: plot_resources(data, analysis),
    }
    for name, make in makers.items():
        fig = make()
        save_figure(fig, out_dir / name)
        plt.close(fig)
    return list(makers)


# ----------------------------------------------------------------------------- writing


def _cell(v):
    if v is None:
        return ""
    if isinstance(v, float):
        return "" if math.isnan(v) else round(v, 6)
    return v


def write_csv(rows: list[dict], path: Path, columns: list[str] | None = None) -> None:
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: _cell(r.get(k)) for k in columns})
    atomic_write_text(path, buf.getvalue())


def trial_rows(data: StudyData) -> list[dict]:
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


def write_report(study_dir: str | Path, n_boot: int = N_BOOT) -> dict:
    """results/{trials,results,summary,pairwise}.csv, the plots, report.md and notebooks/analysis.ipynb."""
    from qwen_ft.study.notebook import write_notebook

    root = Path(study_dir)
    data = load_study(root)
    analysis = analyse(data, n_boot)
    res = root / "results"
    res.mkdir(parents=True, exist_ok=True)
    write_csv(trial_rows(data), res / "trials.csv", None if data.trials else ["optimizer", "k", "score"])
    write_csv(
        analysis["results"], res / "results.csv", None if analysis["results"] else ["optimizer", "seed"]
    )
    write_csv(analysis["summary"], res / "summary.csv", None if analysis["summary"] else ["optimizer"])
    write_csv(
        analysis["pairwise"], res / "pairwise.csv", None if analysis["pairwise"] else ["a", "b", "verdict"]
    )
    plots = save_plots(data, analysis, res)
    atomic_write_text(res / "report.md", render_markdown(data, analysis))
    nb = write_notebook(root / "notebooks" / "analysis.ipynb", root)
    log.info("wrote %s (report.md, CSVs, %d plots) and %s", res, len(plots), nb)
    return {
        "optimizers": [r["optimizer"] for r in analysis["summary"]],
        "results_dir": str(res),
        "files": ["trials.csv", "results.csv", "summary.csv", "pairwise.csv", "report.md", *plots],
        "summary": analysis["summary"],
        "pairwise": analysis["pairwise"],
    }


def _pct(v, digits: int = 1) -> str:
    return "-" if v is None else f"{100 * v:.{digits}f}"


def _num(v, spec: str = ".3g") -> str:
    return "-" if v is None else format(v, spec)


def _reached(v, spec: str) -> str:
    return "not reached" if v is None else format(v, spec)


def _protocol(data: StudyData, analysis: dict) -> list[str]:
    s, p = data.spec, data.spec.get("protocol", {})
    ev, sizes = s.get("eval", {}), data.data.get("sizes", {})
    counts = {o: len(data.trials.get(o, [])) for o in data.optimizers}
    complete = {o: sum(t.get("state") == "complete" for t in data.trials.get(o, [])) for o in data.optimizers}
    diverged = {o: sum(t.get("state") == "diverged" for t in data.trials.get(o, [])) for o in data.optimizers}
    equal = len(set(counts.values())) <= 1
    lost = [f"{o} seed {f.seed}" for o in data.optimizers for f in data.finals.get(o, [])
            if f.result.get("state") == "diverged"]
    kept = "; ".join(
        f"{o}: "
        + ", ".join(
            f"seed {f.seed} step {f.result.get('best_step')}/{f.result.get('steps')}" for f in data.finals[o]
        )
        for o in data.optimizers
        if o in data.finals
    )
    n_pairs = len(analysis["pairwise"])
    lines = [
        "## Protocol",
        "",
        f"- **Same tuning budget for every optimizer**: {p.get('trials')} trials each, drawn by Optuna's "
        f"`{p.get('sampler')}` sampler over the search space below; each trial trains for "
        f"{p.get('trial_budget')} and is scored by accuracy on the **tuning split** "
        f"({sizes.get('tune', p.get('tune_rows'))} questions carved from the training data, disjoint "
        "from the validation set that reports the results).",
        "- Trials on file: "
        + ", ".join(f"{o} {counts[o]} ({complete[o]} complete" + (f", {diverged[o]} diverged, scored 0"
                                                                    if diverged[o] else "") + ")"
                    for o in data.optimizers)
        + ("" if equal else " - **the trial counts differ: the comparison is not on an equal budget**")
        + ".",
        f"- **Finals**: each optimizer's best trial re-run with seeds {p.get('final_seeds')} (the seed "
        f"changes the LoRA initialisation and the data order) for {p.get('final_budget')}, scored on the "
        f"**{ev.get('split', 'validation')}** split ({sizes.get('validation', '?')} questions; decode "
        f"`{ev.get('decode')}`, normalize `{ev.get('normalize')}`).",
        *([f"- **Diverged finals** (every question counted wrong): {', '.join(lost)}."] if lost else []),
        "- **Checkpoint selection** uses the tuning split only (never the validation set); the kept step of "
        f"each final (kept/total): {kept or '-'}.",
        f"- Learning curves and time-to-target: validation accuracy every {p.get('curve_every')} steps on a "
        f"fixed subsample of {p.get('curve_rows')} validation questions; target "
        f"{_pct(p.get('target'), 0) if p.get('target') is not None else '-'} %.",
        f"- Statistics: 95 % CIs by bootstrap over seeds and questions ({N_BOOT:,} replicates, seed "
        f"{s.get('seed')}); pairwise differences on the same questions, paired t-test on the per-question "
        f"differences, Holm-adjusted over the {n_pairs} pair(s); equivalence by TOST at +-"
        f"{100 * analysis['margin']:g} points (Holm-adjusted too); exact McNemar on the first seeds in "
        "pairwise.csv as a secondary figure.",
        f"- Data: train {sizes.get('train', '?')}, tune {sizes.get('tune', '?')}, validation "
        f"{sizes.get('validation', '?')}, test {sizes.get('test', '?')} questions; chance "
        f"{_pct(data.data.get('chance'))} %.",
        "",
        "| optimizer | class | searched | fixed |",
        "|---|---|---|---|",
    ]
    for o in data.optimizers:
        e = s.get("optimizers", {}).get(o, {})
        space = ", ".join(
            f"{k} {v['low']:g}..{v['high']:g}{' (log)' if v.get('log') else ''}"
            for k, v in (e.get("search") or {}).items()
        )
        fixed = ", ".join(f"{k}={v}" for k, v in (e.get("fixed") or {}).items())
        lines.append(f"| {o} | `{e.get('optimizer', '?')}` | {space or '-'} | {fixed or '-'} |")
    return lines + [""]


def _results_table(data: StudyData, analysis: dict) -> list[str]:
    seeds = sorted({r["seed"] for r in analysis["results"]})
    lines = [
        "## Results",
        "",
        "| optimizer | best trial (tuning acc.) | params | mean (95 % CI) | sd | "
        + " | ".join(f"seed {s}" for s in seeds)
        + " | steps to target (median) | seconds to target | reached | ms/step | optimizer state (MiB) |",
        "|---" * (10 + len(seeds)) + "|",
    ]
    for r in analysis["summary"]:
        lines.append(
            f"| {r['optimizer']} | {'trial-' + str(r['best_trial']) if r['best_trial'] is not None else '-'} "
            f"({_pct(r['best_trial_score'])} %) | {r['params'] or '-'} | **{_pct(r['mean'])} %** "
            f"({_pct(r['ci_low'])}..{_pct(r['ci_high'])}) | {_pct(r['sd'])} | "
            + " | ".join(_pct(r.get(f"acc_seed_{s}")) for s in seeds)
            + f" | {_reached(r['ttt_step_median'], '.0f')} | {_reached(r['ttt_seconds_median'], '.1f')} "
            f"| {r['reached']} | {_num(r['step_time_s'] and 1000 * r['step_time_s'], '.1f')} "
            f"| {_num(r['optimizer_state_bytes'] and r['optimizer_state_bytes'] / 2**20, '.2f')} |"
        )
    return lines + ["", "Accuracies in %; sd is across seeds; the CI resamples seeds and questions.", ""]


def _baselines(data: StudyData, analysis: dict) -> list[str]:
    lines = [
        "## Baselines",
        "",
        "| baseline | accuracy (95 % CI) | n | decode | normalize | description |",
        "|---|---|---|---|---|---|",
    ]
    if data.data.get("chance") is not None:
        lines.append(f"| chance | {_pct(data.data['chance'])} % | - | - | - | 1 / number of choices |")
    for name, ev in data.baselines.items():
        ci = ev.get("accuracy_ci95") or [None, None]
        lines.append(
            f"| {BASELINE_NAMES.get(name, name)} | {_pct(ev['accuracy'])} % ({_pct(ci[0])}..{_pct(ci[1])})"
            f" | {ev.get('n', '-')} | {ev.get('decode', '-')} | {ev.get('normalize', '-')} "
            f"| {ev.get('description', '')} |"
        )
    if data.baselines and analysis["summary"]:
        name, ev = max(data.baselines.items(), key=lambda kv: kv[1]["accuracy"])
        verdicts = [
            f"{r['optimizer']} {'above' if r['mean'] > ev['accuracy'] else '**not above**'}"
            + (" (CI clear of it)" if r["ci_low"] is not None and r["ci_low"] > ev["accuracy"] else "")
            for r in analysis["summary"]
        ]
        lines += [
            "",
            f"Trained means against the best untrained baseline ({BASELINE_NAMES.get(name, name)}, "
            f"{_pct(ev['accuracy'])} %): " + "; ".join(verdicts) + ".",
        ]
    return lines + [""]


def _adabound(data: StudyData) -> list[str]:
    lines = []
    for o in [o for o in data.optimizers if o in data.finals]:
        runs = data.finals[o]
        bounds = [(f.seed, f.result["adabound_bounds"]) for f in runs if f.result.get("adabound_bounds")]
        if not bounds:
            continue
        closed = all(b["ratio"] < CLOSED_RATIO for _, b in bounds)
        detail = "; ".join(
            f"seed {s}: lower {b['lower']:.3g}, upper {b['upper']:.3g}, ratio {b['ratio']:.3g}"
            for s, b in bounds
        )
        lines.append(
            f"- **{o}**: bounds at the last step {detail}: "
            + (
                f"**closed** (ratio < {CLOSED_RATIO:g} on every seed): it ended as SGD with a bounded rate."
                if closed
                else f"**did not close** (ratio >= {CLOSED_RATIO:g} on some seed): it never "
                "made the switch to SGD that defines it, and behaved as a clipped Adam."
            )
        )
    return ["## AdaBound's bounds", "", *lines, ""] if lines else []


def render_markdown(data: StudyData, analysis: dict) -> str:
    s = data.spec
    lines = [f"# Optimizer study: {s.get('model')} on {s.get('source')} ({s.get('task')})", ""]
    if s.get("demo"):
        n_seeds = len(s.get("protocol", {}).get("final_seeds") or [])
        lines += [
            f"**This is the demo study ({s.get('protocol', {}).get('trials')} trials per optimizer, "
            f"{n_seeds} seeds, {data.data.get('sizes', {}).get('validation', '?')} validation questions): "
            "it is too small for a verdict. It shows the protocol end to end; its numbers do not say "
            "which optimizer is better.**",
            "",
        ]
    lines += _protocol(data, analysis) + _results_table(data, analysis) + _baselines(data, analysis)
    lines += ["## Pairwise verdicts", ""]
    lines += [f"- {p['verdict']}" for p in analysis["pairwise"]] or ["- (no pair with predictions on file)"]
    lines += [
        "",
        'Differences are a - b in points; "better" needs Holm-adjusted p < 0.05, '
        '"equivalent" needs the (Holm-adjusted) TOST to reject at 0.05; anything else is "no difference '
        'shown", which is not evidence of equality. Details: `pairwise.csv`.',
        "",
    ]
    lines += _adabound(data)
    lines += [f"## {title}\n\n![{title}]({name})\n" for name, title in PLOTS.items()]
    lines += [
        "## Files",
        "",
        "`trials.csv` (every trial), `results.csv` (every final run), `summary.csv` "
        "(per optimizer), `pairwise.csv` (per pair); `../notebooks/analysis.ipynb` redraws these plots from "
        "the study folder.",
        "",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- across workloads


def workload_name(data: StudyData) -> str:
    return f"{data.spec.get('source', data.root.name)} ({data.spec.get('task', '?')})"


def plot_performance_profile(profile: dict[str, list[tuple[float, float]]], n_workloads: int):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, (o, points) in enumerate(profile.items()):
        taus = [100 * t for t, _ in points]
        ax.step(
            taus + [taus[-1] + max(1.0, 0.1 * taus[-1])],
            [f for _, f in points] + [points[-1][1]],
            where="post",
            color=f"C{i}",
            label=o,
            linewidth=2,
            alpha=0.85,
        )
    ax.set(
        xlabel="tau: accuracy gap to the best optimizer of the workload (points)",
        ylabel="fraction of workloads within tau",
        ylim=(-0.03, 1.03),
        title=f"Performance profile over {n_workloads} workload(s)",
    )
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def write_cross_workload(study_dirs: list[Path], out: Path) -> dict:
    """performance_profile.png, cross_workload.csv and cross_workload.md over finished studies."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    scores: dict[str, dict[str, float]] = {}
    for d in study_dirs:
        data = load_study(d)
        name = workload_name(data)
        name = name if name not in scores else f"{name} [{Path(d).name}]"
        scores[name] = {
            o: float(np.mean([f.result["accuracy"] for f in data.finals[o]]))
            for o in data.optimizers
            if o in data.finals
        }
    profile = stats.performance_profile(scores)
    rows = [
        {
            "workload": w,
            "optimizer": o,
            "mean_accuracy": acc,
            "gap_points": 100 * (max(s.values()) - acc),
            "best": acc == max(s.values()),
        }
        for w, s in scores.items()
        for o, acc in s.items()
    ]
    write_csv(rows, out / "cross_workload.csv", None if rows else ["workload", "optimizer"])
    plt = _plt()
    fig = plot_performance_profile(profile, len(scores))
    save_figure(fig, out / "performance_profile.png")
    plt.close(fig)
    opts = list(profile)
    md = [
        "# Optimizers across workloads",
        "",
        "Mean final accuracy (%) per workload; the gap to the workload's "
        "best optimizer drives the performance profile (Dolan & More 2002).",
        "",
        "| workload | " + " | ".join(opts) + " |",
        "|---" * (len(opts) + 1) + "|",
    ]
    md += [
        f"| {w} | "
        + " | ".join(f"**{_pct(s[o])}**" if s.get(o) == max(s.values()) else _pct(s.get(o)) for o in opts)
        + " |"
        for w, s in scores.items()
    ]
    md += ["", "![Performance profile](performance_profile.png)", ""]
    atomic_write_text(out / "cross_workload.md", "\n".join(md))
    return {"workloads": list(scores), "scores": scores, "profile": profile}
