#!/usr/bin/env python
"""python phases/4_eval.py [--optimizers adamw sgd ...] [--config FILE] [--force]

Phase 4 (and 5): score every merged model on the validation split (accuracy with a 95% CI, samples/s,
tokens/s, peak memory), then write the analysis: results/results.csv, the plots, results/report.md and
notebooks/analysis.ipynb.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from qwen_ft import malloc  # noqa: E402

if __name__ == "__main__":
    malloc.relaunch_with_huge_pages()  # as the qwen-ft command does
    from qwen_ft.commands.study import phase_script

    raise SystemExit(phase_script(["eval", "analysis"], sys.argv[1:], __doc__))
