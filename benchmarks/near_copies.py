"""In-distribution accuracy with and without the validation rows that copy a training row.

    python benchmarks/near_copies.py RUN [RUN ...]

Screens RUN's split files as `train --dedup` would (normalised exact match, then MinHash LSH on word bigrams
verified by Jaccard >= 0.8) and re-scores RUN/eval/predictions.jsonl (written by `qwen-ft validate`) on the
validation rows that are not copies. A gap between the two figures is what memorised questions add.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from qwen_ft.data.dedup import screen  # noqa: E402
from qwen_ft.runs import RunDir  # noqa: E402


def near_copy_row(run: Path) -> dict:
    rd = RunDir(run)
    splits = {name: rd.split(name) for name in ("train", "validation")}
    counts, matches = screen(splits)
    preds = rd.predictions("eval") or []
    if len(preds) != len(splits["validation"]):
        raise SystemExit(f"{run}/eval/predictions.jsonl has {len(preds)} rows, the validation split "
                         f"{len(splits['validation'])}: run `qwen-ft validate --model-path {run}` first")
    right = [p["pred"] == p["label"] for p in preds]
    kept = [r for r, m in zip(right, matches["validation"]) if m is None]
    return {"run": run.name, "n": len(right), "accuracy": sum(right) / len(right), "copies": len(right) - len(kept),
            "exact": counts["validation"]["exact"], "near": counts["validation"]["near"],
            "accuracy_without_copies": sum(kept) / len(kept), "copies_correct": sum(right) - sum(kept)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    for run in ap.parse_args().runs:
        r = near_copy_row(run)
        print(f"{r['run']}: validation {100 * r['accuracy']:.1f} % (n={r['n']}); {r['copies']} copies of training "
              f"rows ({r['exact']} exact, {r['near']} near; {r['copies_correct']} answered right); without them "
              f"{100 * r['accuracy_without_copies']:.1f} % (n={r['n'] - r['copies']})")


if __name__ == "__main__":
    main()
