"""Leave-groups-out cross-validation of one training recipe: K runs, each holding out whole groups.

    python benchmarks/cv_by_group.py --config configs/mmlu_pro_recipe.yaml --folds 4 --out runs/cv \
        [--data /path/to/test.parquet] [-- extra train flags]

The groups are the values of the recipe's `data.split_by` column (or `--split-by`). They are dealt into K
folds of about equal rows (`qwen_ft.data.splits.group_folds`, seeded): every group is held out in exactly
one fold. Fold k trains the recipe with `--holdout-groups` = its groups (the test split) and the same
budget, then is scored on its in-distribution validation rows and on its held-out groups. Resumable fold by
fold: a finished fold is read back, an interrupted training resumes from its checkpoint. Writes
OUT/cv.json and prints one table: per fold in-distribution / held-out / balanced held-out accuracy, then
the mean, sd and min over folds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from held_out_table import cpu_name, validate  # noqa: E402

from qwen_ft.config import DataArgs, TrainConfig  # noqa: E402
from qwen_ft.data.prepare import load_rows  # noqa: E402
from qwen_ft.data.splits import group_folds  # noqa: E402
from qwen_ft.runs import RunDir  # noqa: E402


def folds_of(config: Path, data: str | None, split_by: str | None, k: int) -> tuple[str, list[list[str]]]:
    import yaml

    cfg = TrainConfig.from_dict(yaml.safe_load(config.read_text()), str(config))
    d = cfg.data if data is None else DataArgs(**{**cfg.data.__dict__, "data": data})
    column = split_by or d.split_by
    if not column:
        raise SystemExit("the recipe has no data.split_by: pass --split-by COLUMN")
    _, rows, _ = load_rows(d.data, d.task, d, "row", group_column=column)
    return column, group_folds(rows, k, cfg.train.seed)


def run_fold(k: int, groups: list[str], column: str, a: argparse.Namespace) -> dict:
    out = a.out / f"fold-{k}"
    if not RunDir(out).complete:
        cmd = [sys.executable, "-m", "qwen_ft", "train", "--config", str(a.config), "--split-by", column,
               "--holdout-groups", ",".join(groups), "--output-dir", str(out), *a.extra]
        if a.data:
            cmd += ["--data", a.data]
        if RunDir(out).started:
            cmd.append("--resume")
        print(f"fold {k}: training, {len(groups)} groups held out -> {out}", flush=True)
        subprocess.run(cmd, check=True)
    val = validate(out, out / "eval")
    test = validate(out, out / "eval-test", "--split", "test", "--slice-by", column)
    return {"fold": k, "groups": groups, "in_dist": val["accuracy"], "in_dist_n": val["n"],
            "held_out": test["accuracy"], "held_out_balanced": test["balanced_accuracy"], "held_out_n": test["n"],
            "held_out_ece": test["calibration"]["ece"],
            "minutes": round(RunDir(out).final_metrics()["train_time_s"] / 60, 1)}


def summary(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.1f} (sd {100 * sd:.1f}, min {100 * min(values):.1f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, required=True)
    ap.add_argument("--folds", type=int, default=4)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--data", default=None, help="Override the recipe's data.data.")
    ap.add_argument("--split-by", default=None, help="Override the recipe's data.split_by.")
    ap.add_argument("--only", type=int, default=None, help="Run this fold only (0-based), then print the table so far.")
    ap.add_argument("extra", nargs="*", help="Extra `qwen-ft train` flags (after --).")
    a = ap.parse_args()
    column, folds = folds_of(a.config, a.data, a.split_by, a.folds)
    a.out.mkdir(parents=True, exist_ok=True)
    results = []
    for k, groups in enumerate(folds):
        if a.only is not None and k != a.only and not RunDir(a.out / f"fold-{k}").complete:
            continue
        results.append(run_fold(k, groups, column, a))
    (a.out / "cv.json").write_text(json.dumps({"cpu": cpu_name(), "column": column, "folds": results}, indent=1))
    print(f"CPU: {cpu_name()}; {len(results)} of {a.folds} folds, whole {column} groups held out\n")
    print("| fold | groups held out | in-distribution (n) | held-out (n) | balanced held-out | held-out ECE | min |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['fold']} | {len(r['groups'])} | {100 * r['in_dist']:.1f} % ({r['in_dist_n']}) | "
              f"{100 * r['held_out']:.1f} % ({r['held_out_n']}) | {100 * r['held_out_balanced']:.1f} % | "
              f"{r['held_out_ece']:.3f} | {r['minutes']} |")
    if results:
        print(f"| mean (sd, min) | | {summary([r['in_dist'] for r in results])} | "
              f"{summary([r['held_out'] for r in results])} | {summary([r['held_out_balanced'] for r in results])} | | |")


if __name__ == "__main__":
    main()
