"""The optimizer registry. Adding one is one `register(...)` line, or a YAML entry with an import path.

Default learning rates differ per optimizer because their update sizes differ (LoRA on a 0.1-8B model):
- adamw 2e-4: Adam's normalized steps make ~1e-4..5e-4 the usual LoRA range; the model-size preset
  refines it (3e-4 for 0.6B, 1e-4 for 7B+, ...).
- sgd 2e-2 (momentum 0.9): raw gradients of LoRA matrices are small (B starts at zero), so SGD needs a
  ~100x larger step than Adam to move at all; with momentum 0.9 the effective step is 10x lr.
- adabound 1e-3 with final_lr 0.1: the paper's defaults (Luo et al. 2019): Adam-like early, bounded
  towards an SGD step of final_lr as training goes on.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from dataclasses import dataclass, field
from typing import Any

from qwen_ft.errors import UserError


@dataclass(frozen=True)
class OptimizerSpec:
    name: str
    target: str  # import path "module.Class"
    default_lr: float
    defaults: dict = field(default_factory=dict)
    uses_preset_lr: bool = False  # Adam-family: the model-size preset's lr applies

    def load_class(self):
        module, _, cls = self.target.rpartition(".")
        try:
            return getattr(importlib.import_module(module), cls)
        except (ImportError, AttributeError) as e:
            raise UserError(f"optimizer '{self.name}': cannot import {self.target}: {e}") from None


REGISTRY: dict[str, OptimizerSpec] = {}


def register(name: str, target: str, default_lr: float, uses_preset_lr: bool = False, **defaults: Any) -> OptimizerSpec:
    spec = OptimizerSpec(name, target, default_lr, dict(defaults), uses_preset_lr)
    REGISTRY[name] = spec
    return spec


register("adamw", "torch.optim.AdamW", 2e-4, uses_preset_lr=True, betas=(0.9, 0.999), eps=1e-8)
register("sgd", "torch.optim.SGD", 2e-2, momentum=0.9, nesterov=False)
register("adabound", "pytorch_optimizer.AdaBound", 1e-3, final_lr=0.1, gamma=1e-3, weight_decouple=False)


def get(name: str) -> OptimizerSpec:
    if name not in REGISTRY:
        close = difflib.get_close_matches(name, list(REGISTRY), n=1)
        raise UserError(f"unknown optimizer '{name}'" + (f" (did you mean '{close[0]}'?)" if close else ""),
                        f"Known: {', '.join(sorted(REGISTRY))}. Add one with optimizers.register(...) or a YAML "
                        "entry {target: module.Class, lr: ..., kwargs: {...}}.")
    return REGISTRY[name]


def from_yaml(name: str, entry: dict) -> OptimizerSpec:
    """A study YAML entry: {target: 'module.Class', lr: 1e-3, kwargs: {...}} registers a new optimizer."""
    unknown = set(entry) - {"target", "lr", "kwargs"}
    if unknown or "target" not in entry or "lr" not in entry:
        raise UserError(f"optimizer entry '{name}' needs keys target and lr (and optional kwargs); "
                        f"got {sorted(entry)}")
    spec = register(name, str(entry["target"]), float(entry["lr"]), **dict(entry.get("kwargs") or {}))
    check_kwargs(spec, spec.defaults)
    return spec


def check_kwargs(spec: OptimizerSpec, kwargs: dict) -> None:
    """Unknown keyword arguments are an error, never silently dropped."""
    cls = spec.load_class()
    params = inspect.signature(cls.__init__).parameters
    known = [n for n, p in params.items() if n not in ("self", "params") and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    if not known:
        return  # nothing to check against
    bad = [k for k in kwargs if k not in known]
    if bad:
        hints = [f"'{k}'" + (f" (did you mean '{c[0]}'?)" if (c := difflib.get_close_matches(k, known, n=1)) else "")
                 for k in bad]
        raise UserError(f"unknown argument(s) for optimizer '{spec.name}' ({spec.target}): {', '.join(hints)}",
                        f"Accepted: {', '.join(known)}")


def resolve(name: str, lr: float, weight_decay: float, kwargs: dict | None = None) -> tuple[type, dict]:
    """(optimizer class, constructor kwargs) - what `Trainer(optimizer_cls_and_kwargs=...)` takes."""
    spec = get(name)
    merged = {**spec.defaults, **(kwargs or {})}
    check_kwargs(spec, merged)
    return spec.load_class(), {"lr": lr, "weight_decay": weight_decay, **merged}


def default_lr(name: str, preset_lr: float | None) -> float:
    spec = get(name)
    return preset_lr if (spec.uses_preset_lr and preset_lr is not None) else spec.default_lr
