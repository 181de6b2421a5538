"""`qwen-ft train`: flags / YAML / environment -> `qwen_ft.training.train` -> run folder."""

from __future__ import annotations

from pathlib import Path


def run_train(user: dict, resume: bool = False, overwrite: bool = False, model_hook=None,
              config_file: str | None = None) -> Path:
    """`user`: the flat layers of the command line (YAML < environment < flags)."""
    from qwen_ft.training import train

    return train(user, resume=resume, overwrite=overwrite, model_hook=model_hook,
                 inputs={"--config": config_file}).path


def add_parser(sub, name: str) -> None:
    from qwen_ft.config_flags import add_config_flags, user_layers

    p = sub.add_parser(name, help="LoRA-train a model to generate labels; writes a run folder.")
    p.add_argument("--config", help="YAML file with sections model/data/lora/optim/train.")
    p.add_argument("--resume", action="store_true", help="Continue the unfinished run in --output-dir.")
    p.add_argument("--overwrite", action="store_true",
                   help="Replace the qwen-ft run in --output-dir (never another folder): the new run is built beside "
                        "it and replaces it only when complete.")
    add_config_flags(p)
    p.set_defaults(func=lambda a: run_train(user_layers(a), resume=a.resume, overwrite=a.overwrite,
                                            config_file=a.config))
