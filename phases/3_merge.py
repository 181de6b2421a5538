#!/usr/bin/env python
"""python phases/3_merge.py [--optimizers adamw sgd ...] [--config FILE] [--force]

Phase 3: merge each trained adapter into its base model (<output_dir>/models/OPTIMIZER, safetensors) and
verify that the merged model's logits equal base+adapter logits.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from qwen_ft import malloc  # noqa: E402

if __name__ == "__main__":
    malloc.relaunch_with_huge_pages()  # as the qwen-ft command does
    from qwen_ft.commands.study import phase_script

    raise SystemExit(phase_script(["merge"], sys.argv[1:], __doc__))
