#!/usr/bin/env python
"""Seed-compatible entry point: every command line of the Qwen3 fine-tuning guide runs through qwen-ft.

    python ft_qwen3_generative_lora.py --model Qwen/Qwen3-0.6B --mode train --epochs 8 ... --output-dir DIR
    python ft_qwen3_generative_lora.py --mode validate --model-path DIR --num-val-samples 1578
    python ft_qwen3_generative_lora.py --mode test --model-path DIR "some question"
    torchrun --nproc_per_node=8 ft_qwen3_generative_lora.py --mode train ...

`--mode train` takes every `qwen-ft train` flag; `validate` and `test` take those of `qwen-ft validate` /
`qwen-ft test`. Without --mode, train is assumed (as the guide's "Best Practices" line does). The guide's
data set is MMLU-Pro from the hub, so training without --data or --config reads `TIGER-Lab/MMLU-Pro`
(split test), as the original script did; pass --data for a local file or the bundled `demo` set.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))  # runs from a plain checkout too

from qwen_ft.cli import main  # noqa: E402

MODES = {"train": "train", "validate": "validate", "test": "test"}
SEED_DATA = "TIGER-Lab/MMLU-Pro"


def translate(argv: list[str]) -> list[str]:
    mode, rest, i = "train", [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--mode" and i + 1 < len(argv):
            mode = argv[i + 1]
            i += 2
            continue
        if arg.startswith("--mode="):
            mode = arg.split("=", 1)[1]
        else:
            rest.append(arg)
        i += 1
    if mode not in MODES:
        print(f"ft_qwen3_generative_lora.py: error: --mode must be one of {', '.join(MODES)} (got {mode!r})",
              file=sys.stderr)
        raise SystemExit(2)
    if mode == "train" and not any(a.split("=")[0] in ("--data", "--config") for a in rest):
        rest += ["--data", SEED_DATA, "--hub-split", "test"]
    return [MODES[mode], *rest]


if __name__ == "__main__":
    raise SystemExit(main(translate(sys.argv[1:])))
