"""`qwen-ft study`: compare optimizers under one tuning protocol - data -> train (trials, finals) -> merge ->
eval (baselines) -> analysis. Resumable; several workers may run it at once on one study."""

from __future__ import annotations

from qwen_ft.study.config import PHASES, load_study_config
from qwen_ft.study.phases import Study, run_study


def run(configs: list[str], seed: int | None = None, phases: list[str] | None = None,
        optimizers: list[str] | None = None, force: bool = False, output_dir: str | None = None,
        trust_remote_code: bool = False) -> Study:
    cfg = load_study_config([packaged_config(c) for c in configs], {"seed": seed, "output_dir": output_dir})
    return run_study(cfg, phases, optimizers, force, trust_remote_code)


def packaged_config(name: str) -> str:
    """`--config demo` (and other names without a path) is the config of that name shipped in the package."""
    from importlib import resources
    from pathlib import Path

    if Path(name).exists() or "/" in name or name.endswith((".yaml", ".yml")):
        return name
    packaged = resources.files("qwen_ft").joinpath("configs", f"{name}.yaml")
    return str(packaged) if packaged.is_file() else name


def add_parser(sub, name: str) -> None:
    p = sub.add_parser(name, help="Compare optimizers: equal tuning budget, several seeds, paired statistics.")
    p.add_argument("--config", action="append", required=True,
                   help="Study YAML (e.g. configs/demo.yaml, or 'demo' for the packaged one); repeat to layer files.")
    p.add_argument("--seed", type=int, default=None, help="Seed for splits, trial points and the trials' runs.")
    p.add_argument("--phases", nargs="+", choices=PHASES, default=None, help="Run only these phases.")
    p.add_argument("--optimizers", nargs="+", default=None, help="Run only these optimizers of the config.")
    p.add_argument("--force", action="store_true", help="Redo the selected phases even when up to date.")
    p.add_argument("--output-dir", default=None, help="Study folder (overrides output_dir in the config).")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="Allow the model's own Python code (never read from the config).")
    p.set_defaults(func=lambda a: run(a.config, a.seed, a.phases, a.optimizers, a.force, a.output_dir,
                                      a.trust_remote_code))


def phase_script(phases: list[str], argv: list[str], doc: str | None, positional_optimizer: bool = False) -> int:
    """The seed's `phases/N_*.py` command lines: thin wrappers around `qwen-ft study --phases ...`."""
    import argparse
    import os
    import sys
    from pathlib import Path

    from qwen_ft import distributed as dist
    from qwen_ft import process
    from qwen_ft.errors import UserError

    p = argparse.ArgumentParser(description=(doc or "").strip().splitlines()[0] if doc else None, allow_abbrev=False)
    if positional_optimizer:
        p.add_argument("optimizer", help="Optimizer of the study config (adamw, sgd, adabound, ...).")
        p.add_argument("run_dir", nargs="?", help="The study's folder for it (<output_dir>/finals/OPTIMIZER; checked).")
    else:
        p.add_argument("--optimizers", nargs="+", default=None)
    p.add_argument("--config", action="append", default=None,
                   help="Study YAML (default: $CONFIG, else configs/demo.yaml).")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--force", action="store_true")
    p.add_argument("--output-dir", default=None)
    a = p.parse_args(argv)
    dist.setup_logging(False)
    process.setup()  # as the qwen-ft command does (its threads and allocator)
    configs = a.config or os.environ.get("CONFIG", "").split() or [
        str(Path(sys.argv[0]).resolve().parents[1] / "configs" / "demo.yaml")]
    try:
        cfg = load_study_config(configs, {"seed": a.seed, "output_dir": a.output_dir})
        only = [a.optimizer] if positional_optimizer else a.optimizers
        if positional_optimizer and a.run_dir is not None:
            from qwen_ft.study.load import StudyFolder

            expected = StudyFolder(cfg.out).finals_dir(a.optimizer)
            if Path(a.run_dir).resolve() not in (expected.resolve(), (cfg.out / "experiments" / a.optimizer).resolve()):
                raise UserError(f"the study's folder for {a.optimizer} is {expected}, not {a.run_dir}",
                                f"Pass {expected} (or nothing), or set output_dir in the config.")
        run_study(cfg, phases, only, a.force)
    except UserError as e:
        print(f"{Path(sys.argv[0]).name}: error: {e.message}", file=sys.stderr)
        return 2
    return 0
