"""`qwen-ft` command line: argument parsing only; each subcommand lives in qwen_ft.commands.

Flags of `train` are generated from the config dataclasses (each field's help and flag live there once).
Only flags given explicitly reach the config, so that precedence (preset < YAML < env < CLI) holds.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import logging
import sys
import typing

from qwen_ft import distributed as dist
from qwen_ft.config import TrainConfig, env_overrides, flatten, load_yaml
from qwen_ft.errors import UserError

COMMANDS = {"train": "train", "validate": "validate", "test": "predict", "merge": "merge", "study": "study"}


def add_config_flags(parser: argparse.ArgumentParser, cls=TrainConfig) -> None:
    """One flag per config field (`--lora-rank` -> lora.rank), absent unless given."""
    hints = typing.get_type_hints(cls)
    for section in dataclasses.fields(cls):
        group = parser.add_argument_group(section.name)
        sub_hints = typing.get_type_hints(hints[section.name])
        for f in dataclasses.fields(hints[section.name]):
            flag = f.metadata.get("flag")
            if not flag:
                continue
            dest = f"{section.name}.{f.name}"
            kw = {"dest": dest, "default": argparse.SUPPRESS, "help": f.metadata["help"]}
            if sub_hints[f.name] is bool:
                group.add_argument(flag, action="store_const", const=True, **kw)
            else:
                group.add_argument(flag, choices=f.metadata.get("choices"), metavar=f.name.upper(), **kw)
    group = parser.add_argument_group("precision shortcuts")
    for name in ("bf16", "fp16", "fp32"):
        group.add_argument(f"--{name}", dest="model.precision", action="store_const", const=name,
                           default=argparse.SUPPRESS, help=f"Same as --precision {name}.")


def user_layers(args: argparse.Namespace) -> dict:
    """YAML < environment < CLI, as one flat dict of dotted keys."""
    layer: dict = {}
    if getattr(args, "config", None):
        layer.update(flatten(_only_sections(load_yaml(args.config), args.config)))
    layer.update(env_overrides())
    layer.update({k: v for k, v in vars(args).items() if "." in k})
    return layer


def _only_sections(data: dict, path: str) -> dict:
    from qwen_ft.config import build

    build(TrainConfig, data, path)  # unknown keys -> clear error with a suggestion
    return data


def quiet_libraries(debug: bool) -> None:
    """Library progress bars and deprecation chatter hide our own progress lines."""
    if debug:
        return
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qwen-ft", description="LoRA-fine-tune a causal LM to generate a category label or an answer letter.")
    parser.add_argument("--debug", action="store_true", help="Show tracebacks.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module in COMMANDS.items():
        if importlib.util.find_spec(f"qwen_ft.commands.{module}") is not None:
            importlib.import_module(f"qwen_ft.commands.{module}").add_parser(sub, name)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    dist.setup_logging(debug)
    quiet_libraries(debug)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except UserError as e:
        if debug:
            raise
        print(f"qwen-ft {args.command}{dist.rank_tag()}: error: {e.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        logging.shutdown()
    return 0
