"""notebooks/analysis.ipynb: re-draws the study's plots from the files of the study folder.

The notebook holds code only (no outputs, no numbers), so regenerating it is a no-op unless this file
changes; it calls the report's own functions (study/load.py, analysis.py, plots.py), so its plots are
the report's.
"""

from __future__ import annotations

import os
from pathlib import Path

from qwen_ft.outputs import atomic_write_text


def cells(study: str) -> list[tuple[str, str]]:
    return [
        (
            "markdown",
            "# Optimizer study: analysis\n\nRe-draws the report's plots from the study folder "
            "(`study.json`, `trials/`, `finals/`, `baselines/`). Run it from `<study>/notebooks/`, or set "
            "`STUDY` below to another study folder.",
        ),
        (
            "code",
            "from pathlib import Path\n\nimport pandas as pd\n\n"
            "from qwen_ft.study import plots\n"
            "from qwen_ft.study.analysis import analyse, trial_rows\n"
            "from qwen_ft.study.load import load_study\n\n"
            f"STUDY = Path({study!r})  # the study's output folder\n"
            "data = load_study(STUDY)\n"
            "analysis = analyse(data)  # seeded: the same numbers as results/*.csv\n"
            "pd.DataFrame(analysis['summary']).set_index('optimizer')",
        ),
        (
            "markdown",
            "## Learning-rate sensitivity\nEvery tuning trial's score on the tuning split; the star is "
            "the trial re-run as the finals.",
        ),
        ("code", "fig = plots.plot_lr_sensitivity(data)"),
        (
            "markdown",
            "## Accuracy per seed\nDots: seeds; diamond and bar: mean and 95 % bootstrap CI; lines: "
            "chance and the untrained baselines.",
        ),
        ("code", "fig = plots.plot_accuracy_per_seed(data, analysis)"),
        ("markdown", "## Learning curves\nMean over seeds, band min..max; red: the target."),
        ("code", "fig = plots.plot_curves(data, analysis['target'])"),
        ("markdown", "## Time to target"),
        ("code", "fig = plots.plot_time_to_target(data, analysis)"),
        ("markdown", "## Optimizer state and step time"),
        ("code", "fig = plots.plot_resources(data, analysis)"),
        ("markdown", "## Pairwise verdicts"),
        (
            "code",
            "for p in analysis['pairwise']:\n    print(p['verdict'])\npd.DataFrame(analysis['pairwise'])",
        ),
        ("markdown", "## Every trial"),
        ("code", "pd.DataFrame(trial_rows(data))"),
    ]


def build_notebook(study: str = ".."):
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [
        nbformat.v4.new_markdown_cell(src) if kind == "markdown" else nbformat.v4.new_code_cell(src)
        for kind, src in cells(study)
    ]
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"cell-{i}"  # stable ids: regenerating gives the same file
    return nb


def write_notebook(path: str | Path, study_dir: str | Path | None = None) -> Path:
    """Write the notebook; STUDY is study_dir relative to the notebook's folder ('..' in the usual layout)."""
    import nbformat

    path = Path(path)
    study = ".." if study_dir is None else os.path.relpath(Path(study_dir).resolve(), path.parent.resolve())
    nb = build_notebook(Path(study).as_posix())
    nbformat.validate(nb)
    atomic_write_text(path, nbformat.writes(nb) + "\n")
    return path
