"""The study's report: CSV tables, PNG plots and results/report.md, read from the study folder only.

The study folder is read by study/load.py (nothing is scraped from logs), its numbers come from
study/analysis.py (which takes its statistics from study/stats.py) and its plots from study/plots.py;
this module only writes them out and formats the markdown. The notebook (notebook.py) calls the same
load/analyse/plot functions, so its plots are the report's.
"""

from __future__ import annotations

import csv
import io
import logging
import math
from pathlib import Path

import numpy as np

from qwen_ft.outputs import atomic_write_text
from qwen_ft.study import stats
from qwen_ft.study.analysis import N_BOOT, analyse, trial_rows
from qwen_ft.study.load import StudyData, StudyFolder, load_study
from qwen_ft.study.plots import BASELINE_NAMES, PLOTS, save_performance_profile, save_plots

log = logging.getLogger(__name__)

CLOSED_RATIO = 1.5  # AdaBound's bounds count as closed when upper/lower at the last step is below this


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


def write_report(study_dir: str | Path, n_boot: int = N_BOOT) -> dict:
    """results/{trials,results,summary,pairwise}.csv, the plots, report.md and notebooks/analysis.ipynb."""
    from qwen_ft.study.notebook import write_notebook

    root = Path(study_dir)
    data = load_study(root)
    analysis = analyse(data, n_boot)
    res = StudyFolder(root).results_dir
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
    nb = write_notebook(StudyFolder(root).notebook_path, root)
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
        _trials_on_file(data),
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
    ]
    return lines + _optimizer_table(data) + [""]


def _trials_on_file(data: StudyData) -> str:
    """The protocol's bullet on the trials on file, flagging trial counts that differ between optimizers."""
    counts = {o: len(data.trials.get(o, [])) for o in data.optimizers}
    complete = {o: sum(t.get("state") == "complete" for t in data.trials.get(o, [])) for o in data.optimizers}
    diverged = {o: sum(t.get("state") == "diverged" for t in data.trials.get(o, [])) for o in data.optimizers}
    equal = len(set(counts.values())) <= 1
    return (
        "- Trials on file: "
        + ", ".join(f"{o} {counts[o]} ({complete[o]} complete" + (f", {diverged[o]} diverged, scored 0"
                                                                    if diverged[o] else "") + ")"
                    for o in data.optimizers)
        + ("" if equal else " - **the trial counts differ: the comparison is not on an equal budget**")
        + "."
    )


def _optimizer_table(data: StudyData) -> list[str]:
    """Each optimizer's class, searched ranges and fixed settings, as declared in study.json."""
    lines = ["| optimizer | class | searched | fixed |", "|---|---|---|---|"]
    for o in data.optimizers:
        e = data.spec.get("optimizers", {}).get(o, {})
        space = ", ".join(
            f"{k} {v['low']:g}..{v['high']:g}{' (log)' if v.get('log') else ''}"
            for k, v in (e.get("search") or {}).items()
        )
        fixed = ", ".join(f"{k}={v}" for k, v in (e.get("fixed") or {}).items())
        lines.append(f"| {o} | `{e.get('optimizer', '?')}` | {space or '-'} | {fixed or '-'} |")
    return lines


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
    save_performance_profile(profile, len(scores), out / "performance_profile.png")
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
