#!/usr/bin/env python
"""python phases/1_data.py [--config FILE] [--seed 42] [--force]

Phase 1: load the data set, sample and split it (seeded), cache the splits in <output_dir>/data/, and
fetch the model (the embedded one is converted once; a hub model is downloaded, HF_ENDPOINT honoured).
Config: --config, else $CONFIG, else configs/demo.yaml.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # runs from a plain checkout too

from qwen_ft import malloc  # noqa: E402

if __name__ == "__main__":
    malloc.relaunch_with_huge_pages()  # as the qwen-ft command does
    from qwen_ft.commands.study import phase_script

    raise SystemExit(phase_script(["data"], sys.argv[1:], __doc__))
