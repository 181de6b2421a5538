"""`qwen-ft study`: compare optimizers - data -> train (x optimizers) -> merge -> eval -> analysis."""

from __future__ import annotations

from qwen_ft.study.config import PHASES, load_study_config
from qwen_ft.study.phases import Study, run_study


def run(configs: list[str], seed: int | None = None, phases: list[str] | None = None,
        optimizers: list[str] | None = None, force: bool = False, output_dir: str | None = None) -> Study:
    cfg = load_study_config(configs, {"seed": seed, "output_dir": output_dir})
    return run_study(cfg, phases, optimizers, force)


def add_parser(sub, name: str) -> None:
    p = sub.add_parser(name, help="Compare optimizers: data, train, merge, eval, analysis (resumable).")
    p.add_argument("--config", action="append", required=True,
                   help="Study YAML (e.g. configs/demo.yaml); repeat to layer files (later ones win).")
    p.add_argument("--seed", type=int, default=None, help="Seed for splits, LoRA init and data order.")
    p.add_argument("--phases", nargs="+", choices=PHASES, default=None, help="Run only these phases.")
    p.add_argument("--optimizers", nargs="+", default=None, help="Run only these optimizers of the config.")
    p.add_argument("--force", action="store_true", help="Redo the selected phases even when up to date.")
    p.add_argument("--output-dir", default=None, help="Study folder (overrides output_dir in the config).")
    p.set_defaults(func=lambda a: run(a.config, a.seed, a.phases, a.optimizers, a.force, a.output_dir))
