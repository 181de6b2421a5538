"""The optimizer registry. Adding one is one `register(...)` line, or a YAML entry with an import path.

Default learning rates differ per optimizer because their update sizes differ (LoRA on a 0.1-8B model,
gradients clipped to norm 1.0 as `--max-grad-norm` does by default):
- adamw 2e-4: Adam's normalized steps make ~1e-4..5e-4 the usual LoRA range; the model-size preset
  refines it (5e-4 below 0.3B, 3e-4 for 0.6B, 1e-4 for 7B+, ...). Each element moves by ~lr per step, so
  the whole update has norm ~lr * sqrt(n): ~1 for SmolLM2-135M's 4.9M LoRA parameters at 5e-4.
- sgd 0.1 (momentum 0.9): the raw LoRA gradient is small per element (B starts at zero) and its norm is
  clipped to 1, so an SGD step has norm <= lr, and <= 10 * lr once momentum builds up. lr 0.1 gives the
  same ~1 update norm as Adam above; 1e-2..2e-2 (100x Adam's rate, a common rule of thumb) moves 5-10x
  less per step, too little for a few-epoch LoRA budget.
- adabound 1e-3 with final_lr 0.1, gamma 1e-3: the paper's defaults (Luo et al. 2019): Adam-like early,
  with each element's step size clipped to bounds that close in on final_lr (an SGD step) as
  final_lr * (1 - 1/(gamma t + 1)) <= step <= final_lr * (1 + 1/(gamma t)). Weight decay is coupled
  (added to the gradient), as in the paper; `weight_decouple: true` gives AdamW-style decay.
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
register("sgd", "torch.optim.SGD", 0.1, momentum=0.9, nesterov=False)
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
