#!/usr/bin/env python
"""python phases/2_train.py OPTIMIZER [RUN_DIR] [--config FILE] [--seed 42] [--force]

Phase 2: LoRA-train one optimizer of the study (adamw, sgd, adabound, or any the config lists) on the
cached splits: same seed, data order and budget for each. RUN_DIR, if given, must be the study's run
folder for it (<output_dir>/experiments/OPTIMIZER, e.g. ./experiments/adamw for configs/demo.yaml).
An interrupted run resumes from its last checkpoint when the command is repeated.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from qwen_ft.commands.study import phase_script  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(phase_script(["train"], sys.argv[1:], __doc__, positional_optimizer=True))
