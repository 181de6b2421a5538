"""Flags generated from the config dataclasses (each field's help and flag live there once), and the layers
of settings a command line resolves: YAML < environment < flags given explicitly."""

from __future__ import annotations

import argparse
import dataclasses
import typing

from qwen_ft.config import TrainConfig, coerce_layer, env_overrides, flag_for, flatten, load_yaml


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
            kw = {"dest": dest, "default": argparse.SUPPRESS, "help": f.metadata["help"].replace("%", "%%")}
            if sub_hints[f.name] is bool:
                group.add_argument(flag, action="store_const", const=True, **kw)
            else:
                group.add_argument(flag, choices=f.metadata.get("choices"), metavar=f.name.upper(), **kw)
    group = parser.add_argument_group("precision shortcuts")
    for name in ("bf16", "fp16", "fp32"):
        group.add_argument(f"--{name}", dest="model.precision", action="store_const", const=name,
                           default=argparse.SUPPRESS, help=f"Same as --precision {name}.")


def user_layers(args: argparse.Namespace) -> dict:
    """YAML < environment < CLI, as one flat dict of dotted keys, each value converted to its type where it
    came from, so that a bad value is named by its flag, variable or file."""
    layer: dict = {}
    if getattr(args, "config", None):
        layer.update(flatten(_only_sections(load_yaml(args.config), args.config)))
    layer.update(env_overrides())
    flags = {k: v for k, v in vars(args).items() if "." in k}
    layer.update(coerce_layer(flags, lambda key: flag_for(key)))
    return layer


def _only_sections(data: dict, path: str) -> dict:
    from qwen_ft.config import build

    build(TrainConfig, data, path)  # unknown keys -> clear error with a suggestion
    return data
