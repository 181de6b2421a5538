"""MMLU-Pro learning curve: validation accuracy against training rows, on one fixed set of validation rows.

    python benchmarks/learning_curve.py --data ../shared/data/mmlu_pro/test.parquet --out runs/curve \
        --points 40:2:8:5e-4,150:1:16:1e-3,400:1:16:1e-3 [--json curve.json]

Each point is `ROWS_PER_CATEGORY:EPOCHS:BATCH:LR[:head|:typos=RATE]` (`head`: `--head classification`;
`typos=RATE`: `--augment typos:RATE`, one noisy copy of every training row), trained by `qwen-ft train` with
`--max-train-samples-per-category ROWS` (the split is taken first, so every point is validated on the same
`--val-fraction` of all rows) and scored by `qwen-ft validate` on all of those rows. The untrained model is
scored once with the same prompt (`--baseline`). Prints a table (rows, accuracy with 95 % CI, macro-F1,
training wall time, validation samples/s) and the CPU it ran on; points already complete are not trained
again (their run folder's eval.json is read), so an interrupted curve continues where it stopped.
With `--split-by src` the test split holds whole sources never trained on (about `--test-fraction` of the
rows), and each point is also scored there (`unseen_accuracy`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "src"))

from qwen_ft.runs import RunDir, read_eval  # noqa: E402


def qwen_ft(*args: str, log: Path) -> float:
    """Run one qwen-ft command (its output appended to `log`); its wall time in seconds."""
    start = time.perf_counter()
    with log.open("a") as fh:
        fh.write(f"\n$ qwen-ft {' '.join(args)}\n")
        fh.flush()
        subprocess.run([sys.executable, "-m", "qwen_ft", *args], check=True, stdout=fh, stderr=subprocess.STDOUT)
    return time.perf_counter() - start


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return 0.0, 0.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / (1 + z * z / n)
    return centre - half, centre + half


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", default="runs/curve")
    ap.add_argument("--points", default="40:2:8:5e-4,150:1:16:1e-3,400:1:16:1e-3")
    ap.add_argument("--val-fraction", default="0.1")
    ap.add_argument("--max-length", default="256")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--split-by", default=None, help="e.g. src: hold whole sources out as the test split")
    ap.add_argument("--test-fraction", default="0.2")
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--skip-untrained", action="store_true", help="do not score the untrained model")
    args = ap.parse_args(argv)
    from vs_reference import _cpu_name, cpu_isa  # the CPU model and ISA, printed with every figure

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "curve.log"
    rows = []
    for point in args.points.split(","):
        per_cat, epochs, batch, lr, head, run = parse_point(point, out)
        augment = ["--augment", "typos:" + head.split("=", 1)[1]] if head.startswith("typos=") else []
        split_flags = ["--split-by", args.split_by, "--test-fraction", args.test_fraction] if args.split_by \
            else ["--test-fraction", "0"]
        wall_file = run / "curve_train_seconds.json"
        if RunDir(run).eval() is None:
            train_s = qwen_ft("train", "--model", args.model, "--data", args.data, *split_flags,
                              "--head", "classification" if head == "head" else "generative", *augment,
                              "--val-fraction", args.val_fraction, "--max-train-samples-per-category", per_cat,
                              "--epochs", epochs, "--batch-size", batch, "--learning-rate", lr,
                              "--max-length", args.max_length, "--early-stopping-patience", "0",
                              "--output-dir", str(run), *(["--overwrite"] if run.exists() else []), log=log)
            wall_file.write_text(json.dumps({"train_wall_s": round(train_s, 1)}))
            qwen_ft("validate", "--model-path", str(run), log=log)
        if args.split_by and RunDir(run).eval("eval-test") is None:
            qwen_ft("validate", "--model-path", str(run), "--split", "test", "--output-dir", str(run / "eval-test"),
                    log=log)
        rows.append(figures(run, per_cat, epochs, batch, lr))
        rows[-1]["head"] = head
        print_row(rows[-1], flush=True)
    result = {"cpu": f"{_cpu_name()}; {cpu_isa()}", "threads": os.environ.get("QWEN_FT_THREADS"), "points": rows}
    if not args.skip_untrained:
        result["untrained"] = untrained_row(args, out, log)
    print("cpu:", result["cpu"])
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


def untrained_row(args, out: Path, log: Path) -> dict:
    """The untrained model, scored with the first point's prompt on the same validation (and test) rows."""
    base = out / "untrained"
    first = parse_point(args.points.split(",")[0], out)[-1]
    if read_eval(base) is None:
        qwen_ft("validate", "--model-path", str(first), "--baseline", "--output-dir", str(base), log=log)
    if args.split_by and read_eval(out / "untrained-test") is None:
        qwen_ft("validate", "--model-path", str(first), "--baseline", "--split", "test", "--output-dir",
                str(out / "untrained-test"), log=log)
    untrained = figures(first, "0", "-", "-", "-", eval_dir=base)
    print_row(untrained)
    return untrained


def parse_point(point: str, out: Path) -> tuple[str, str, str, str, str, Path]:
    """`ROWS:EPOCHS:BATCH:LR[:head|:typos=RATE]` -> its fields, the kind of run, and its run folder."""
    per_cat, epochs, batch, lr, *kind = point.split(":")
    kind = kind[0] if kind else "generative"
    suffix = "" if kind == "generative" else "-" + kind.replace("=", "")
    return per_cat, epochs, batch, lr, kind, out / f"rows{per_cat}-ep{epochs}{suffix}"


def figures(run: Path, per_cat, epochs, batch, lr, eval_dir: Path | None = None) -> dict:
    ev = RunDir(run).eval(eval_dir or "eval")
    test_dir = (eval_dir.parent / f"{eval_dir.name}-test") if eval_dir else run / "eval-test"
    unseen = read_eval(test_dir)
    n = ev["n"] if "n" in ev else ev["support"]
    k = round(ev["accuracy"] * n)
    lo, hi = wilson(k, n)
    final = RunDir(run).final_metrics() or {}
    wall = json.loads((run / "curve_train_seconds.json").read_text())["train_wall_s"] \
        if (run / "curve_train_seconds.json").is_file() else None
    train_rows = len(RunDir(run).split("train")) if RunDir(run).has_split("train") else None
    return {"rows_per_category": per_cat, "train_rows": train_rows if eval_dir is None else 0, "epochs": epochs,
            "batch_size": batch, "learning_rate": lr, "val_rows": n, "accuracy": ev["accuracy"],
            "ci95": [round(lo, 4), round(hi, 4)], "macro_f1": ev.get("macro_f1"),
            "train_time_s": final.get("train_time_s") if eval_dir is None else None,
            "command_wall_s": wall if eval_dir is None else None, "val_samples_per_s": ev.get("samples_per_s"),
            "unseen_accuracy": unseen["accuracy"] if unseen else None, "unseen_n": unseen["n"] if unseen else None,
            "unseen_macro_f1": unseen["macro_f1"] if unseen else None}


def print_row(r: dict, flush: bool = False) -> None:
    f1 = f"{r['macro_f1']:.3f}" if isinstance(r["macro_f1"], float) else "-"
    t = f"{r['train_time_s']:.0f} s" if r["train_time_s"] else "-"
    print(f"{r.get('head', 'generative'):>10} rows/cat {r['rows_per_category']:>4} (train {r['train_rows']}, {r['epochs']} ep, batch {r['batch_size']}, "
          f"lr {r['learning_rate']}): accuracy {r['accuracy']:.1%} ({r['ci95'][0]:.1%}-{r['ci95'][1]:.1%}, "
          f"n={r['val_rows']}), macro-F1 {f1}, training {t}, validation {r['val_samples_per_s']} samples/s"
          + (f"; unseen sources {r['unseen_accuracy']:.1%} (n={r['unseen_n']})" if r["unseen_accuracy"] else ""),
          flush=flush)


if __name__ == "__main__":
    raise SystemExit(main())
