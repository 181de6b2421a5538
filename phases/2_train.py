#!/usr/bin/env python
"""python phases/2_train.py OPTIMIZER [RUN_DIR] [--config FILE] [--seed 42] [--force]

Phase 2: tune and train one optimizer of the study (adamw, sgd, adabound, or any the config lists) under
the study's protocol: its trials (the same number and budget as every other optimizer's, scored on the
tuning split), then its best trial re-run with every final seed. RUN_DIR, if given, must be the study's
folder for it (<output_dir>/finals/OPTIMIZER; ./experiments/OPTIMIZER as the seed wrote it is accepted).
An interrupted run resumes where it stopped when the command is repeated.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from qwen_ft import malloc  # noqa: E402

if __name__ == "__main__":
    malloc.relaunch_with_huge_pages()  # as the qwen-ft command does
    from qwen_ft.commands.study import phase_script

    raise SystemExit(phase_script(["train"], sys.argv[1:], __doc__, positional_optimizer=True))
