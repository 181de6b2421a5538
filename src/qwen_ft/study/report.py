"""The analysis phase: results.csv (one row per optimizer), PNG plots, report.md and the notebook.

Everything is read from files the earlier phases wrote (eval.json, metrics.jsonl, phase.json markers);
nothing is scraped from logs. The notebook calls the same plotting functions on the same files.
"""

from __future__ import annotations

import csv
import itertools
import json
import logging
from pathlib import Path

import yaml

from qwen_ft.runs import atomic_write_text, read_jsonl

log = logging.getLogger(__name__)

COLUMNS = [
    "optimizer", "learning_rate", "accuracy", "ci_low", "ci_high", "n_eval", "chance", "final_train_loss",
    "best_val_loss", "epochs_run", "train_time_s", "train_samples_per_s", "train_peak_mem_mb",
    "eval_samples_per_s", "eval_tokens_per_s", "eval_peak_mem_mb", "memory_kind", "free_accuracy",
    "free_valid_pct", "run_dir", "model_dir",
]
PLOTS = {"loss_curves.png": "Loss curves", "accuracy.png": "Accuracy with 95% CI",
         "resources.png": "Memory and speed"}


# ----------------------------------------------------------------------------- reading

def _marker(folder: Path) -> dict:
    path = folder / "phase.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def collect_row(study, opt: str) -> dict:
    run, out = study.run_dir(opt), study.cfg.out
    ev = json.loads((study.eval_dir(opt) / "eval.json").read_text())
    records = read_jsonl(run / "metrics.jsonl")
    epochs = [r for r in records if r["type"] == "epoch"]
    final = next((r for r in reversed(records) if r["type"] == "final"), {})
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    free = ev.get("free") or {}
    return {
        "optimizer": opt, "learning_rate": cfg["optim"]["learning_rate"],
        "accuracy": round(ev["accuracy"], 4), "ci_low": round(ev["accuracy_ci95"][0], 4),
        "ci_high": round(ev["accuracy_ci95"][1], 4), "n_eval": ev["n"], "chance": round(ev["chance"], 4),
        "final_train_loss": round(epochs[-1]["train_loss"], 4) if epochs else None,
        "best_val_loss": round(final["best_val_loss"], 4) if final.get("best_val_loss") is not None else None,
        "epochs_run": final.get("epochs_run"), "train_time_s": final.get("train_time_s"),
        "train_samples_per_s": final.get("train_samples_per_s"),
        "train_peak_mem_mb": _marker(run).get("peak_mem_mb"),
        "eval_samples_per_s": ev["samples_per_s"], "eval_tokens_per_s": ev["prompt_tokens_per_s"],
        "eval_peak_mem_mb": ev.get("peak_mem_mb"), "memory_kind": ev.get("memory_kind"),
        "free_accuracy": round(free["accuracy"], 4) if free else None,
        "free_valid_pct": round(free["valid_pct"], 1) if free else None,
        "run_dir": str(run.relative_to(out)), "model_dir": str(study.model_dir(opt).relative_to(out)),
    }


def read_results(path: str | Path) -> list[dict]:
    """results.csv rows with numbers as numbers (empty cells as None)."""
    def num(v: str):
        if v == "":
            return None
        try:
            return float(v) if any(c in v for c in ".eE") or not v.lstrip("-").isdigit() else int(v)
        except ValueError:
            return v

    with open(path, newline="") as f:
        return [{k: (num(v) if k not in ("optimizer", "memory_kind", "run_dir", "model_dir") else v)
                 for k, v in row.items()} for row in csv.DictReader(f)]


def read_curves(study_dir: str | Path, rows: list[dict]) -> dict[str, list[dict]]:
    """optimizer -> its metrics.jsonl records (step and epoch lines)."""
    return {r["optimizer"]: read_jsonl(Path(study_dir) / r["run_dir"] / "metrics.jsonl") for r in rows}


# ----------------------------------------------------------------------------- plots

def _plt():
    import sys

    import matplotlib

    if "ipykernel" not in sys.modules:  # files only; a notebook keeps its inline backend
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _smooth(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_loss_curves(curves: dict[str, list[dict]]):
    plt = _plt()
    fig, (ax_t, ax_v) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (opt, records) in enumerate(curves.items()):
        color = f"C{i}"
        steps = [r for r in records if r["type"] == "step"]
        x, y = [r["epoch"] for r in steps], [r["loss"] for r in steps]
        ax_t.plot(x, y, color=color, alpha=0.25, linewidth=0.8)
        ax_t.plot(x, _smooth(y, max(1, len(y) // 20)), color=color, label=opt, linewidth=1.8)
        at_step = {r["step"]: r["epoch"] for r in steps}  # an evaluation at an interruption falls mid-epoch
        epochs = [r for r in records if r["type"] == "epoch"]
        ax_v.plot([at_step.get(r["step"], r["epoch"]) for r in epochs], [r["val_loss"] for r in epochs], "o-",
                  color=color, label=opt)
    ax_t.set(title="Training loss (answer tokens; faint: per step, bold: moving mean)", xlabel="epoch",
             ylabel="loss")
    ax_v.set(title="Validation loss per epoch", xlabel="epoch", ylabel="loss")
    for ax in (ax_t, ax_v):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return fig


def plot_accuracy(rows: list[dict]):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(rows) + 2), 4))
    names = [r["optimizer"] for r in rows]
    acc = [100 * r["accuracy"] for r in rows]
    err = [[100 * (r["accuracy"] - r["ci_low"]) for r in rows], [100 * (r["ci_high"] - r["accuracy"]) for r in rows]]
    bars = ax.bar(names, acc, yerr=err, capsize=6, color=[f"C{i}" for i in range(len(rows))], alpha=0.85)
    for bar, value in zip(bars, acc):
        ax.text(bar.get_x() + bar.get_width() / 2, 1, f"{value:.1f}%", ha="center", va="bottom", color="white",
                fontweight="bold")
    chance = rows[0].get("chance") if rows else None
    if chance:
        ax.axhline(100 * chance, color="gray", linestyle="--", label=f"chance ({100 * chance:.0f}%)")
        ax.legend(loc="upper right")
    n = rows[0]["n_eval"] if rows else 0
    ax.set(title=f"Accuracy with 95% Wilson CI (n={n})", ylabel="accuracy (%)", ylim=(0, 100))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def plot_resources(rows: list[dict]):
    plt = _plt()
    panels = [("train_peak_mem_mb", "Training peak memory (MB)"), ("train_samples_per_s", "Training samples/s"),
              ("eval_samples_per_s", "Inference samples/s"), ("train_time_s", "Training time (s)")]
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.6))
    names = [r["optimizer"] for r in rows]
    for ax, (key, title) in zip(axes, panels):
        values = [r.get(key) or 0 for r in rows]
        bars = ax.bar(names, values, color=[f"C{i}" for i in range(len(rows))], alpha=0.85)
        for bar, v in zip(bars, values):
            ax.text(bar.get_x() + bar.get_width() / 2, v, f"{v:.4g}", ha="center", va="bottom", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.tick_params(axis="x", rotation=20)
    kind = rows[0].get("memory_kind") if rows else ""
    fig.suptitle(f"Resources (memory: {kind})", fontsize=10)
    fig.tight_layout()
    return fig


def save_plots(rows: list[dict], curves: dict, out_dir: Path) -> list[str]:
    plt = _plt()
    figs = {"loss_curves.png": plot_loss_curves(curves), "accuracy.png": plot_accuracy(rows),
            "resources.png": plot_resources(rows)}
    for name, fig in figs.items():
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
    return list(figs)


# ----------------------------------------------------------------------------- paired comparison

def pairwise(study, opts: list[str]) -> list[dict]:
    """Exact McNemar tests on the paired predictions (same rows for every optimizer)."""
    from scipy.stats import binomtest

    correct = {o: {p["id"]: p["correct"] for p in read_jsonl(study.eval_dir(o) / "predictions.jsonl")}
               for o in opts}
    out = []
    for a, b in itertools.combinations(opts, 2):
        ids = correct[a].keys() & correct[b].keys()
        only_a = sum(correct[a][i] and not correct[b][i] for i in ids)
        only_b = sum(correct[b][i] and not correct[a][i] for i in ids)
        p = binomtest(only_a, only_a + only_b).pvalue if only_a + only_b else 1.0
        out.append({"a": a, "b": b, "a_right_b_wrong": only_a, "b_right_a_wrong": only_b,
                    "accuracy_diff": round((only_a - only_b) / len(ids), 4) if ids else 0.0,
                    "mcnemar_p": round(float(p), 4)})
    return out


# ----------------------------------------------------------------------------- writing

def write_csv(rows: list[dict], path: Path, columns: list[str]) -> None:
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r[k]) for k in columns})
    atomic_write_text(path, buf.getvalue())


def write_report(study, opts: list[str]) -> dict:
    from qwen_ft.study.notebook import write_notebook

    res = study.results_dir
    res.mkdir(parents=True, exist_ok=True)
    rows = [collect_row(study, o) for o in opts]
    write_csv(rows, res / "results.csv", COLUMNS)
    pairs = pairwise(study, opts)
    write_csv(pairs, res / "pairwise.csv", ["a", "b", "a_right_b_wrong", "b_right_a_wrong", "accuracy_diff",
                                            "mcnemar_p"])
    rows = read_results(res / "results.csv")  # the plots use exactly what the CSV holds
    save_plots(rows, read_curves(study.cfg.out, rows), res)
    atomic_write_text(res / "report.md", render_markdown(study, rows, pairs))
    write_notebook(study.cfg.out / "notebooks" / "analysis.ipynb")
    log.info("wrote %s, %s and %s", res / "results.csv", res / "report.md", study.cfg.out / "notebooks")
    return {"optimizers": opts}


def _fmt(v, spec: str = ".4f") -> str:
    return "-" if v is None or v == "" else format(v, spec)


def _decoding(cfg) -> str:
    how = ("constrained decoding (greedy over the valid answers' tokens)" if cfg.eval.decode == "constrained"
           else "exact scoring (the most probable valid answer)")
    if cfg.data.answer_format == "text":
        return how + "; the model writes the text of a choice, mapped back to its letter"
    return how + "; the model writes the letter"


def render_markdown(study, rows: list[dict], pairs: list[dict]) -> str:
    cfg = study.cfg
    summary = json.loads((study.data_dir / "summary.json").read_text())
    info = json.loads((study.run_dir(rows[0]["optimizer"]) / "run.json").read_text()) if rows else {}
    run_cfg = yaml.safe_load((study.run_dir(rows[0]["optimizer"]) / "config.yaml").read_text()) if rows else {}
    sizes = summary["sizes"]
    lines = [
        f"# Optimizer study: {cfg.model.model} on {summary['source']}",
        "",
        f"Seed {cfg.seed}; task {summary['task']} ({len(summary['labels'])} labels); rows: train {sizes['train']}, "
        f"validation {sizes['validation']}, test {sizes['test']}. Accuracy is measured on the "
        f"**{cfg.eval.split}** split of the merged models with {_decoding(cfg)}. Chance is "
        f"{100 * rows[0]['chance']:.1f}%." if rows else "",
        "",
        "| optimizer | lr | accuracy (95% CI) | final train loss | best val loss | epochs | train time (s) "
        "| train samples/s | train peak mem (MB) | eval samples/s | eval tokens/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['optimizer']} | {r['learning_rate']:g} | **{100 * r['accuracy']:.1f}%** "
            f"({100 * r['ci_low']:.1f}-{100 * r['ci_high']:.1f}) | {_fmt(r['final_train_loss'])} "
            f"| {_fmt(r['best_val_loss'])} | {_fmt(r['epochs_run'], 'g')} | {_fmt(r['train_time_s'], '.0f')} "
            f"| {_fmt(r['train_samples_per_s'], '.2f')} | {_fmt(r['train_peak_mem_mb'], '.0f')} "
            f"| {_fmt(r['eval_samples_per_s'], '.1f')} | {_fmt(r['eval_tokens_per_s'], '.0f')} |")
    if any(r.get("free_accuracy") is not None for r in rows):
        what = "a choice's text" if cfg.data.answer_format == "text" else "a letter"
        lines += ["", f"Free greedy decoding (the generated text must equal {what}), for comparison: "
                  + "; ".join(f"{r['optimizer']} {100 * r['free_accuracy']:.1f}% ({r['free_valid_pct']:.0f}% valid)"
                              for r in rows if r.get("free_accuracy") is not None) + "."]
    lines += ["", "Paired comparison on the same questions (exact McNemar test; p < 0.05 means the accuracy "
              "difference is unlikely to be luck):", "", "| a | b | a right, b wrong | b right, a wrong | p |",
              "|---|---|---|---|---|"]
    lines += [f"| {p['a']} | {p['b']} | {p['a_right_b_wrong']} | {p['b_right_a_wrong']} | {p['mcnemar_p']:.3g} |"
              for p in pairs]
    lines += [""] + [f"## {title}\n\n![{title}]({name})\n" for name, title in PLOTS.items()]
    opt_lines = []
    for r in rows:
        c = yaml.safe_load((study.run_dir(r["optimizer"]) / "config.yaml").read_text())["optim"]
        kwargs = ", ".join(f"{k}={v}" for k, v in (c.get("kwargs") or {}).items())
        opt_lines.append(f"- **{r['optimizer']}**: `{c['optimizer']}` lr {c['learning_rate']:g}, weight decay "
                         f"{c['weight_decay']:g}, {c['lr_scheduler']} schedule, warm-up {c['warmup_ratio']:g}"
                         + (f", {kwargs}" if kwargs else ""))
    t, lo = run_cfg.get("train", {}), run_cfg.get("lora", {})
    lines += [
        "## Setup",
        "",
        f"- model {cfg.model.model} ({info.get('n_params', 0) / 1e6:.0f}M parameters), precision "
        f"{info.get('precision')}, LoRA rank {lo.get('rank')} alpha {lo.get('alpha')} dropout {lo.get('dropout')}",
        f"- same for every optimizer: data order (seed {cfg.seed}), {t.get('epochs')} epochs of batch "
        f"{info.get('global_batch')}, early stopping patience {t.get('early_stopping_patience')} (best val-loss "
        "epoch kept), gradient clipping " + str(run_cfg.get("optim", {}).get("max_grad_norm")),
        *opt_lines,
        f"- memory: {rows[0]['memory_kind'] if rows else ''} (CPU: peak resident set of the process during the "
        "phase, sampled; GPU: peak CUDA allocation)",
        f"- versions: {', '.join(f'{k} {v}' for k, v in (info.get('versions') or {}).items() if v)}; "
        f"git {str(info.get('git_commit'))[:10]}",
        "",
        "Files: `results.csv` (this table), `pairwise.csv`, `eval/<optimizer>/` (eval.json, predictions.jsonl, "
        "confusion matrix), `../experiments/<optimizer>/metrics.jsonl` (loss curves), "
        "`../notebooks/analysis.ipynb` (re-draws these plots).",
        "",
    ]
    return "\n".join(lines)
