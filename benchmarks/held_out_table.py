"""One row per run of what a router meets off its own sources (issue 24's lever table).

    python benchmarks/held_out_table.py RUN [RUN ...] [--adapter-scales 0.5,0.75] [--json table.json]

Every run must be trained on one split with held-out groups (`--split-by`, so its test split is sources
never trained on). For each run it runs what is missing with `qwen-ft validate` and reads the eval.json
files: in-distribution accuracy and macro-F1 (RUN/eval), held-out accuracy and balanced accuracy
(RUN/eval-test, sliced by the split column), accuracy with 10 % typos (RUN/eval-typos-0.1), ECE in and
out of distribution, AURC and accuracy at 90 % coverage on the held-out rows, training minutes
(metrics.jsonl) and the CPU. `--adapter-scales` adds a row per scale (WiSE-FT interpolation toward the base).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from qwen_ft.runs import RunDir  # noqa: E402


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def validate(run: Path, out: Path, *flags: str) -> dict:
    if RunDir(run).eval(out) is None:
        subprocess.run([sys.executable, "-m", "qwen_ft", "validate", "--model-path", str(run), "--output-dir",
                        str(out), *flags], check=True, stdout=subprocess.DEVNULL)
    return RunDir(run).eval(out)


def training_minutes(run: Path) -> float | None:
    final = RunDir(run).final_metrics()
    return round(final["train_time_s"] / 60, 1) if final else None


def row(run: Path, scale: float = 1.0) -> dict:
    tag = "" if scale == 1.0 else f"-scale-{scale:g}"
    flags = () if scale == 1.0 else ("--adapter-scale", f"{scale:g}")
    split_by = RunDir(run).config().data.split_by
    val = validate(run, run / f"eval{tag}", *flags)
    test = validate(run, run / f"eval{tag}-test", "--split", "test", "--slice-by", split_by, *flags)
    typos = validate(run, run / f"eval{tag}-typos-0.1", "--perturb", "typos:0.1", *flags)
    sel = test["selective"]
    return {"run": run.name + (f" (adapter scale {scale:g})" if tag else ""), "in_dist": val["accuracy"],
            "in_dist_n": val["n"], "macro_f1": val["macro_f1"], "held_out": test["accuracy"], "held_out_n": test["n"],
            "held_out_balanced": test["balanced_accuracy"], "typos_0.1": typos["accuracy"],
            "ece_in": val["calibration"]["ece"], "ece_held_out": test["calibration"]["ece"], "aurc_held_out": sel["aurc"],
            "held_out_at_90": sel["accuracy_at_coverage"]["0.9"], "minutes": training_minutes(run),
            "held_out_recall": {lab: m["recall"] for lab, m in test["per_label"].items()}}


def markdown(rows: list[dict], cpu: str) -> str:
    head = ("| run | in-dist (n) | macro-F1 | held-out (n) | balanced held-out | typos 10 % | ECE in / held-out | "
            "AURC held-out | held-out at 90 % coverage | training min |")
    lines = [f"CPU: {cpu}", "", head, "|" + "---|" * 10]
    for r in rows:
        lines.append(f"| {r['run']} | {100 * r['in_dist']:.1f} % ({r['in_dist_n']}) | {r['macro_f1']:.3f} | "
                     f"{100 * r['held_out']:.1f} % ({r['held_out_n']}) | {100 * r['held_out_balanced']:.1f} % | "
                     f"{100 * r['typos_0.1']:.1f} % | {r['ece_in']:.3f} / {r['ece_held_out']:.3f} | "
                     f"{r['aurc_held_out']:.3f} | {100 * r['held_out_at_90']:.1f} % | {r['minutes']} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--adapter-scales", default="", help="Comma-separated adapter scales to add per run.")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    scales = [float(s) for s in a.adapter_scales.split(",") if s.strip()]
    rows = [row(run, s) for run in a.runs for s in (1.0, *scales)]
    cpu = cpu_name()
    print(markdown(rows, cpu))
    if a.json:
        a.json.write_text(json.dumps({"cpu": cpu, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
