"""The one reader of a study folder: its layout, and every file the study, its report and its commands read back.

Study folder layout (`output_dir`):
    study.json                                  the resolved protocol (what the report reads)
    data/{train,tune,validation,test}.jsonl, summary.json
    optuna.db                                   the trials (default storage; `optuna-dashboard sqlite:///...`)
    trials/<optimizer>/trial-<k>/               run folder + trial.json (params, tuning-split score)
    finals/<optimizer>/seed-<s>/                run folder + result.json + eval/ (validation predictions)
    models/<optimizer>/                         the first seed's final, merged and verified (safetensors)
    baselines/<name>/eval.json                  the untrained model: our prompt; log-likelihood per token/char
    results/                                    report.md, *.csv, plots (study/report.py, study/plots.py)
    notebooks/analysis.ipynb
Each phase's output folder also holds its completion marker, `phase.json` (study/markers.py writes it).

Two kinds of readers: the study's own bookkeeping (`StudyFolder`: a missing or torn file reads as None, so
that the phase that writes it runs again) and the report's (`load_study`: everything on file, as it is).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qwen_ft.runs import read_jsonl, read_jsonl_tolerant

MARKER = "phase.json"
SPLITS = ("train", "tune", "validation", "test")


def read_json(path: Path) -> dict | None:
    """A JSON file the study wrote, or None when it is missing or torn (a killed writer)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def read_marker(folder: Path) -> dict | None:
    """A phase folder's completion marker, or None."""
    path = Path(folder) / MARKER
    if not path.is_file():
        return None
    return read_json(path)


def metrics_records(path: Path) -> list[dict]:
    """The records of a run's metrics.jsonl (an append-only log: a line torn by a killed writer is skipped)."""
    return read_jsonl_tolerant(path)


def read_metrics(path: Path) -> tuple[list[dict], list[dict]]:
    """(step records, curve records) of a metrics.jsonl; unknown types and a torn last line are skipped."""
    records = metrics_records(path)
    return (
        [r for r in records if r.get("type") == "step"],
        sorted((r for r in records if r.get("type") == "curve"), key=lambda r: r["step"]),
    )


@dataclass(frozen=True)
class StudyFolder:
    """The layout of one study folder and the study's reads of it."""

    root: Path

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def results_dir(self) -> Path:
        return self.root / "results"

    @property
    def spec_path(self) -> Path:
        return self.root / "study.json"

    @property
    def notebook_path(self) -> Path:
        return self.root / "notebooks" / "analysis.ipynb"

    @property
    def optuna_db(self) -> Path:
        return self.root / "optuna.db"

    def trials_dir(self, opt: str) -> Path:
        return self.root / "trials" / opt

    def trial_dir(self, opt: str, k: int) -> Path:
        return self.trials_dir(opt) / f"trial-{k}"

    def finals_dir(self, opt: str) -> Path:
        return self.root / "finals" / opt

    def final_dir(self, opt: str, seed: int) -> Path:
        return self.finals_dir(opt) / f"seed-{seed}"

    def model_dir(self, opt: str) -> Path:
        return self.root / "models" / opt

    def baseline_dir(self, name: str) -> Path:
        return self.root / "baselines" / name

    def split_path(self, split: str) -> Path:
        return self.data_dir / f"{split}.jsonl"

    def has_spec(self) -> bool:
        """study.json is on file: the analysis phase has run."""
        return self.spec_path.is_file()

    def foreign_data(self) -> bool:
        """data/ holds files but no marker: this study did not write them (and must not overwrite them)."""
        d = self.data_dir
        return d.exists() and any(d.iterdir()) and read_marker(d) is None

    def summary(self) -> dict:
        return json.loads((self.data_dir / "summary.json").read_text())

    def split_rows(self, split: str, task: str) -> list[dict]:
        """A split's rows, read back through the same loader `qwen-ft train` uses on these files."""
        from qwen_ft.config import DataArgs
        from qwen_ft.data.prepare import load_rows

        path = self.split_path(split)
        return load_rows(str(path), task, DataArgs(), split)[1] if read_jsonl(path) else []

    def trial(self, opt: str, k: int) -> dict | None:
        """trial.json of trial `k` of `opt`, or None."""
        return read_json(self.trial_dir(opt, k) / "trial.json")

    def result(self, opt: str, seed: int) -> dict | None:
        """result.json of the final of `opt` with `seed`, or None."""
        return read_json(self.final_dir(opt, seed) / "result.json")


# ----------------------------------------------------------------------------- the report's view


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


def _final(optimizer: str, seed: int, run: Path) -> Final:
    f = Final(optimizer, seed, _json(run / "result.json"))
    preds = run / "eval" / "predictions.jsonl"
    if preds.is_file():
        rows = read_jsonl_tolerant(preds)
        f.ids = [r["id"] for r in rows]
        f.correct = np.array([bool(r["correct"]) for r in rows], dtype=float)
    f.steps, f.curve = read_metrics(run / "metrics.jsonl")
    return f


def load_study(study_dir: str | Path) -> StudyData:
    """Everything the report, the plots and the notebook show, read from the study folder only."""
    root = Path(study_dir)
    trials, finals = {}, {}
    for opt_dir in sorted(p for p in (root / "trials").glob("*") if p.is_dir()):
        trials[opt_dir.name] = [
            _json(p / "trial.json") for _, p in _numbered(opt_dir, "trial") if (p / "trial.json").is_file()
        ]
    for opt_dir in sorted(p for p in (root / "finals").glob("*") if p.is_dir()):
        runs = [_final(opt_dir.name, seed, p) for seed, p in _numbered(opt_dir, "seed")
                if (p / "result.json").is_file()]
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
