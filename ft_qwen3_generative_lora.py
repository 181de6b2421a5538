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

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))  # runs from a plain checkout too

from qwen_ft import malloc  # noqa: E402
from qwen_ft.cli import main  # noqa: E402

MODES = {"train": "train", "validate": "validate", "test": "test"}
SEED_DATA = "TIGER-Lab/MMLU-Pro"


def seed_parser() -> argparse.ArgumentParser:
    """The guide's own flags, for --help (the rest are those of the qwen-ft command of the mode)."""
    p = argparse.ArgumentParser(prog="ft_qwen3_generative_lora.py", add_help=False, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                description=__doc__.split("\n\n", 1)[0].strip())
    p.add_argument("--mode", choices=MODES, default="train",
                   help="train (default): LoRA-train, like `qwen-ft train`; validate: score a run's validation "
                        "rows, like `qwen-ft validate`; test: label the given texts, like `qwen-ft test`.")
    p.add_argument("--model-path", metavar="DIR",
                   help="validate / test: the run folder that --mode train wrote (its --output-dir).")
    p.add_argument("--num-val-samples", metavar="N", type=int,
                   help="validate: score only the first N rows of the validation split.")
    p.add_argument("-h", "--help", action="store_true", help="Show this help (with --mode M: that mode's flags).")
    return p


def print_help(mode: str) -> None:
    from qwen_ft.cli import build_parser

    print(seed_parser().format_help())
    if mode == "train":
        print(f"Without --data or --config, --mode train reads {SEED_DATA} (split test), as the guide does.\n")
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    print(f"--mode {mode} also takes every flag of `qwen-ft {MODES[mode]}`:\n")
    print(sub.choices[MODES[mode]].format_help())


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
    if "-h" in rest or "--help" in rest:
        print_help(mode)
        raise SystemExit(0)
    if mode == "train" and not any(a.split("=")[0] in ("--data", "--config") for a in rest):
        rest += ["--data", SEED_DATA, "--hub-split", "test"]
    return [MODES[mode], *rest]


if __name__ == "__main__":
    malloc.relaunch_with_huge_pages()  # as the qwen-ft command does
    raise SystemExit(main(translate(sys.argv[1:])))
