"""notebooks/analysis.ipynb: re-draws the study's plots from results.csv and the metrics.jsonl files.

The notebook holds code only (no outputs, no numbers), so regenerating it is a no-op unless this file
changes; it uses the plotting functions of qwen_ft.study.report, so its plots are the report's plots.
"""

from __future__ import annotations

from pathlib import Path

from qwen_ft.runs import atomic_write_text

CELLS = [
    ("markdown", "# Optimizer study: analysis\n\nRe-draws the study's plots from `results/results.csv` and "
                 "each run's `metrics.jsonl`. Run it from this folder (`<study>/notebooks/`) after "
                 "`qwen-ft study --config ...`; set `STUDY` below to analyse another study folder."),
    ("code", "from pathlib import Path\n\nimport pandas as pd\n\n"
             "from qwen_ft.study.report import (plot_accuracy, plot_loss_curves, plot_resources, read_curves,\n"
             "                                  read_results)\n\n"
             "STUDY = Path('..')  # the study's output_dir\n"
             "rows = read_results(STUDY / 'results' / 'results.csv')\n"
             "curves = read_curves(STUDY, rows)\n"
             "pd.DataFrame(rows).set_index('optimizer')"),
    ("markdown", "## Loss curves\nTraining loss per logging step (faint) and its moving mean; validation loss "
                 "per epoch."),
    ("code", "fig = plot_loss_curves(curves)"),
    ("markdown", "## Accuracy\n95% Wilson confidence intervals; the dashed line is chance."),
    ("code", "fig = plot_accuracy(rows)"),
    ("markdown", "## Memory and speed"),
    ("code", "fig = plot_resources(rows)"),
    ("markdown", "## Paired comparison\nExact McNemar tests on the same questions."),
    ("code", "pd.read_csv(STUDY / 'results' / 'pairwise.csv')"),
    ("markdown", "## Per-epoch history"),
    ("code", "pd.DataFrame([dict(optimizer=o, **r) for o, recs in curves.items() for r in recs\n"
             "              if r['type'] == 'epoch'])"),
]


def build_notebook():
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_markdown_cell(src) if kind == "markdown" else nbformat.v4.new_code_cell(src)
                for kind, src in CELLS]
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"cell-{i}"  # stable ids: regenerating gives the same file
    return nb


def write_notebook(path: str | Path) -> Path:
    import nbformat

    path = Path(path)
    nb = build_notebook()
    nbformat.validate(nb)
    atomic_write_text(path, nbformat.writes(nb) + "\n")
    return path
