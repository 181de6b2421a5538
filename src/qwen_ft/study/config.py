"""The study's typed config: the shared training sections of `qwen-ft train` plus the optimizers to compare.

A study YAML holds `model:`, `data:`, `lora:`, `optim:`, `train:` (exactly as for `qwen-ft train`; they
apply to every optimizer), `merge:`, `eval:`, and `optimizers:` - a mapping from a name to overrides:

    optimizers:
      adamw: {}                                   # the registry's defaults
      sgd: {learning_rate: 0.05, kwargs: {nesterov: true}}
      sgd_plain: {optimizer: sgd, kwargs: {momentum: 0.0}}        # a variant of a registered one
      adagrad: {target: torch.optim.Adagrad, lr: 0.01, kwargs: {lr_decay: 0.0}}   # a new one

Overrides take any `optim:` key (learning_rate, weight_decay, warmup_ratio, max_grad_norm, lr_scheduler,
kwargs, optimizer). `include: [other.yaml]` loads other files first (paths relative to this one), so
that `training_config.yaml` can pull in `model_config.yaml`.
Precedence: defaults < model-size preset < YAML < per-optimizer entry < environment < CLI flags.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwen_ft import optimizers
from qwen_ft.config import (
    DataArgs,
    LoraArgs,
    ModelArgs,
    OptimArgs,
    TrainArgs,
    TrainConfig,
    arg,
    build,
    env_overrides,
    flatten,
    load_yaml,
    resolve,
)
from qwen_ft.errors import Problems, UserError

PHASES = ("data", "train", "merge", "eval", "analysis")
SHARED = ("model", "data", "lora", "optim", "train")
NEW_OPTIMIZER_KEYS = ("target", "lr")


@dataclass
class MergeArgs:
    dtype: str = arg("auto", "Dtype of the saved merged weights: auto (the base model's own), fp32, bf16, fp16.",
                     choices=("auto", "fp32", "bf16", "fp16"))
    verify_samples: int = arg(4, "Prompts on which merged logits are checked against base+adapter logits (fp32).")
    tolerance: float = arg(1e-3, "Largest allowed |merged - (base+adapter)| logit difference, relative to the "
                                 "largest logit (fp32 rounding of W + BA is ~1e-6).")


@dataclass
class EvalArgs:
    split: str = arg("validation", "Split of the data phase that is scored.", choices=("validation", "test"))
    batch_size: int = arg(16, "Prompts per forward pass.")
    max_samples: int | None = arg(None, "Score only the first N rows of the split (quick looks).")
    decode: str = arg("constrained", "constrained: greedy decoding over the row's answers (fast, as `qwen-ft "
                      "validate`); exact: each answer's full probability, argmax.", choices=("constrained", "exact"))
    free_decode: bool = arg(False, "Also decode freely (greedy text must equal an answer), for comparison.")
    precision: str = arg("auto", "Inference dtype: auto (bf16 where supported, else fp32), fp32, bf16, fp16.",
                         choices=("auto", "fp32", "bf16", "fp16"))


@dataclass
class StudyConfig:
    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataArgs = field(default_factory=DataArgs)
    lora: LoraArgs = field(default_factory=LoraArgs)
    optim: OptimArgs = field(default_factory=OptimArgs)
    train: TrainArgs = field(default_factory=TrainArgs)
    merge: MergeArgs = field(default_factory=MergeArgs)
    eval: EvalArgs = field(default_factory=EvalArgs)
    optimizers: dict = arg({"adamw": {}, "sgd": {}, "adabound": {}},
                           "Optimizer name -> overrides (optim keys), or {target, lr, kwargs} for a new one.")
    output_dir: str = arg(".", "Study folder: data/, experiments/<opt>/, models/<opt>/, results/, notebooks/.")
    seed: int = arg(42, "Seed for sampling, splitting, LoRA init and data order (the same for every optimizer).")
    val_loss_samples: int | None = arg(None, "Rows of the validation split used for the per-epoch validation "
                                             "loss while training (seeded sample; default all). Accuracy is "
                                             "always computed on the whole eval split.")
    include: list[str] = arg([], "Other YAML files loaded first (paths relative to this file).")

    # ------------------------------------------------------------------ derived views
    @property
    def out(self) -> Path:
        return Path(self.output_dir)

    def shared_user(self) -> dict[str, Any]:
        """The shared sections as flat `qwen-ft train` keys; unset (None) keys stay with the preset."""
        shared = {k: v for k, v in dataclasses.asdict(self).items() if k in SHARED}
        flat = {k: v for k, v in flatten(shared).items() if v is not None}
        flat.pop("train.output_dir", None)
        flat["train.seed"] = self.seed
        return flat

    def optimizer_user(self, name: str) -> dict[str, Any]:
        """The shared keys + this optimizer's overrides, ready for `run_train`."""
        entry = dict(self.optimizers[name] or {})
        user = self.shared_user()
        if "target" in entry:  # a new optimizer: register it under its study name
            optimizers.from_yaml(name, {k: entry.pop(k) for k in ("target", "lr", "kwargs") if k in entry})
            user["optim.learning_rate"] = optimizers.get(name).default_lr
        user["optim.optimizer"] = entry.pop("optimizer", name)
        user.update({f"optim.{k}": v for k, v in entry.items()})
        return user

    def validate(self) -> None:
        p = Problems()
        p.check(bool(self.optimizers), "optimizers: list at least one optimizer")
        p.check(self.eval.batch_size > 0, f"eval.batch_size must be > 0 (got {self.eval.batch_size})")
        p.check(self.eval.max_samples is None or self.eval.max_samples > 0, "eval.max_samples must be > 0")
        p.check(self.merge.verify_samples > 0, "merge.verify_samples must be > 0")
        p.check(self.val_loss_samples is None or self.val_loss_samples > 0, "val_loss_samples must be > 0")
        for name, entry in self.optimizers.items():
            where = f"optimizers.{name}"
            try:
                user = self.optimizer_user(name) if _entry_ok(where, entry, p) else None
                if user is not None:
                    cfg = resolve(TrainConfig, [user], where)
                    if cfg.optim.learning_rate is not None:
                        optimizers.resolve(cfg.optim.optimizer, cfg.optim.learning_rate, cfg.optim.weight_decay,
                                           cfg.optim.kwargs)
                    else:
                        optimizers.check_kwargs(optimizers.get(cfg.optim.optimizer), cfg.optim.kwargs)
            except UserError as e:
                p.items.extend(f"{where}: {m}" if not m.startswith(where) else m for m in e.problems)
        p.raise_if_any("See configs/demo.yaml for a complete study config.")


def _entry_ok(where: str, entry: Any, p: Problems) -> bool:
    if entry is None:
        return True
    if not isinstance(entry, dict):
        p.add(f"{where}: expected a mapping of overrides, got {entry!r}")
        return False
    known = [f.name for f in dataclasses.fields(OptimArgs)] + list(NEW_OPTIMIZER_KEYS)
    bad = [k for k in entry if k not in known]
    for k in bad:
        close = difflib.get_close_matches(str(k), known, n=1)
        p.add(f"{where}: unknown key '{k}'" + (f" (did you mean '{close[0]}'?)" if close else
                                               f" (known: {', '.join(known)})"))
    return not bad


# ----------------------------------------------------------------------------- loading

def read_layers(paths: list[str | Path]) -> dict:
    """Nested dict from YAML files (later files win), following `include:` lists."""
    merged: dict = {}
    for path in paths:
        _merge(merged, _read_with_includes(Path(path), set()))
    return merged


def _read_with_includes(path: Path, seen: set) -> dict:
    path = path.resolve()
    if path in seen:
        raise UserError(f"config include loop at {path}")
    data = load_yaml(path)
    includes = data.pop("include", []) or []
    if isinstance(includes, str):
        includes = [includes]
    out: dict = {}
    for inc in includes:
        _merge(out, _read_with_includes(path.parent / inc, seen | {path}))
    _merge(out, data)
    return out


def _merge(base: dict, top: dict) -> None:
    """Deep merge of sections (later wins); `kwargs` mappings are replaced as a whole."""
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict) and k != "kwargs":
            _merge(base[k], v)
        else:
            base[k] = v


def load_study_config(paths: list[str | Path], overrides: dict | None = None,
                      env: dict | None = None) -> StudyConfig:
    """YAML files (in order) < environment overrides < `overrides` (flat keys such as 'seed', 'output_dir')."""
    data = read_layers(paths) if paths else {}
    where = ", ".join(str(p) for p in paths) or "study config"
    cfg = build(StudyConfig, data, where)
    if data.get("optimizers") is not None and not isinstance(data["optimizers"], dict):
        raise UserError(f"{where}: optimizers must be a mapping name -> overrides")
    for key, value in env_overrides(env).items():
        section, leaf = key.split(".")
        setattr(getattr(cfg, section), leaf, value)
    for key, value in (overrides or {}).items():
        if value is not None:
            setattr(cfg, key, value)
    cfg = build(StudyConfig, dataclasses.asdict(cfg), where)  # re-coerce env/override values to their types
    cfg.validate()
    return cfg
