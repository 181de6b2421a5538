"""The study's plots, drawn from a loaded study folder (study/load.py) and its analysis (study/analysis.py).

The report (study/report.py) saves them as PNGs beside report.md; the notebook calls the same functions, so
its plots are the report's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from qwen_ft.outputs import save_figure
from qwen_ft.study.load import Final, StudyData
from qwen_ft.study.protocol import best_trial

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


def save_performance_profile(profile: dict[str, list[tuple[float, float]]], n_workloads: int,
                             path: Path) -> None:
    plt = _plt()
    fig = plot_performance_profile(profile, n_workloads)
    save_figure(fig, path)
    plt.close(fig)
