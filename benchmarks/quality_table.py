"""One table of classifier quality for several runs on the same validation rows (issue 12's comparison).

    python benchmarks/quality_table.py runs/curve/rows40-ep2 runs/curve/rows40-ep2-head ... \
        [--baseline-of runs/curve/rows40-ep2] [--json quality.json]

For each run folder (all trained on one split, e.g. by benchmarks/learning_curve.py) it runs what is
missing with `qwen-ft validate` and reads the eval.json files: accuracy with its 95 % CI and macro-F1 on
the validation split (RUN/eval), accuracy on the test split (RUN/eval-test: with --split-by, sources never
trained on), accuracy with 5 % and 10 % typos (RUN/eval-typos-0.05, -0.1), ECE of the raw probabilities and
after temperature scaling (`--calibrate` on the validation rows; the 2-fold cross-fitted figure, not the
optimistic in-sample one), training wall time (metrics.jsonl) and validation samples/s. `--baseline-of
RUN` adds the untrained model scored with that run's prompt (`--baseline`). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from qwen_ft.runs import RunDir  # noqa: E402


def validate(run: Path, out: Path, *flags: str) -> dict:
    if RunDir(run).eval(out) is None:
        subprocess.run([sys.executable, "-m", "qwen_ft", "validate", "--model-path", str(run), "--output-dir",
                        str(out), *flags], check=True, stdout=subprocess.DEVNULL)
    return RunDir(run).eval(out)


def row(run: Path, name: str, baseline: bool = False) -> dict:
    extra = ("--baseline",) if baseline else ()
    tag = "-baseline" if baseline else ""
    val = validate(run, run / f"eval{tag}", *extra)
    test = validate(run, run / f"eval{tag}-test", "--split", "test", *extra) \
        if RunDir(run).has_split("test") and RunDir(run).split("test") else None
    typos = {rate: validate(run, run / f"eval{tag}-typos-{rate}", "--perturb", f"typos:{rate}", *extra)["accuracy"]
             for rate in ("0.05", "0.1")}
    cal = None
    if not baseline:
        calib = validate(run, run / "eval-calibrate", "--calibrate")["calibration"]["fit"]
        cal = {"ece_raw": calib["ece_before"], "ece_calibrated_cross_fitted": calib["ece_cross_fitted"],
               "temperature": calib["temperature"]}
    final = RunDir(run).final_metrics() or {}
    return {"name": name, "run": str(run), "n": val["n"], "accuracy": val["accuracy"], "ci95": val["accuracy_ci95"],
            "macro_f1": val["macro_f1"], "unseen_accuracy": test["accuracy"] if test else None,
            "unseen_n": test["n"] if test else None, "typos_0.05": typos["0.05"], "typos_0.10": typos["0.1"],
            "ece_raw": cal["ece_raw"] if cal else (val.get("calibration") or {}).get("ece"),
            "ece_calibrated": cal["ece_calibrated_cross_fitted"] if cal else None,
            "temperature": cal["temperature"] if cal else None,
            "train_time_s": None if baseline else final.get("train_time_s"),
            "val_samples_per_s": val["samples_per_s"], "decode": val["decode"]}


def pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f} %"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--baseline-of", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    rows = [row(Path(r), Path(r).name) for r in args.runs]
    if args.baseline_of:
        rows.append(row(Path(args.baseline_of), "untrained", baseline=True))
    print("| model | accuracy (95 % CI) | macro-F1 | unseen sources | typos 5 % | typos 10 % | ECE raw -> "
          "calibrated | training | validation samples/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ece = "-" if r["ece_raw"] is None else f"{r['ece_raw']:.3f}" + (
            f" -> {r['ece_calibrated']:.3f} (T {r['temperature']:.2f})" if r["ece_calibrated"] is not None else "")
        train = "-" if r["train_time_s"] is None else f"{r['train_time_s'] / 60:.1f} min"
        print(f"| {r['name']} | {pct(r['accuracy'])} ({pct(r['ci95'][0])}-{pct(r['ci95'][1])}, n={r['n']}) | "
              f"{r['macro_f1']:.3f} | {pct(r['unseen_accuracy'])} (n={r['unseen_n']}) | {pct(r['typos_0.05'])} | "
              f"{pct(r['typos_0.10'])} | {ece} | {train} | {r['val_samples_per_s']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
