"""Optimizers by name: the shipped entries below, or any torch.optim / pytorch_optimizer optimizer class.

`get(name)` resolves a name, `check(name, kwargs)` validates a config without a model, `build(...)` makes the
optimizer over a model's trainable parameters. Nothing here is registered at run time: the shipped table is
read-only and a config only *names* an optimizer. Names resolve against an allow-list: only the modules
torch.optim and pytorch_optimizer (and peft.optimizers for LoRA+) are ever imported, so a config string
such as "os.system" or "this.s" is refused before anything is imported, and whatever resolves must be a
`torch.optim.Optimizer` subclass.

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
  with each element's step size clipped to bounds that close in on final_lr (an SGD step); see
  `adabound_bounds`. With gamma 1e-3 and ~100 steps the bounds are still ~120x apart at the end
  (t = 100: [0.091, 11] x final_lr), so within such a budget AdaBound *is* Adam at 1e-3; the switch to SGD
  needs gamma * t >> 1 (gamma ~0.1 for 100 steps: [0.91, 1.1] x final_lr). Weight decay is coupled
  (added to the gradient), as in the paper; `weight_decouple: true` gives AdamW-style decay.
- lion 5e-5: Lion's update is sign(...), so every element moves by exactly lr (Adam's move by <= ~lr);
  Chen et al. 2023 advise a 3-10x smaller lr than AdamW's (and a 3-10x larger weight decay).
- schedulefree_adamw 1e-3 (pytorch_optimizer.ScheduleFreeAdamW): AdamW steps on a sequence z whose running
  average x is what gets evaluated; the averaging damps the steps, and the authors' README reports
  1-10x AdamW's (scheduled) lr working, so 5x the AdamW default. Needs its train/eval switch: `eval_mode`,
  `OptimizerModeCallback`. It schedules itself: a constant Trainer schedule (with warm-up) suits it.
- loraplus 2e-4 (preset) with loraplus_lr_ratio 16: AdamW whose A matrices take the preset's lr and whose
  B matrices take 16x that (Hayou et al. 2024: ratio ~2^4 works across their tasks).
- muon 2e-4 (preset): Newton-Schulz-orthogonalized momentum on the 2-D LoRA matrices, with Moonlight's
  shape factor 0.2 * sqrt(max(rows, cols)) (`use_adjusted_lr: true`), which makes Muon's per-element
  update RMS ~0.2 * lr like AdamW's, so AdamW's rate (and weight decay) carry over (Liu et al. 2025).

Any other optimizer by class name ("Adagrad", "torch.optim.Adagrad", "pytorch_optimizer.Ranger") uses its
constructor's own default lr.
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from transformers import TrainerCallback

from qwen_ft.errors import UserError

ALLOWED_MODULES = ("torch.optim", "pytorch_optimizer")  # the only modules a name may resolve into
KINDS = ("plain", "loraplus", "muon", "schedulefree")


@dataclass(frozen=True)
class OptimizerSpec:
    name: str
    cls_path: str  # "torch.optim.AdamW": always inside ALLOWED_MODULES
    default_lr: float | None  # None: the class has no usable default; learning_rate must be set
    defaults: dict = field(default_factory=dict)  # constructor kwargs a config's kwargs override
    uses_preset_lr: bool = False  # Adam-family: the model-size preset's lr applies
    kind: str = "plain"  # how `build` makes it: plain | loraplus | muon | schedulefree

    def load_class(self) -> type[torch.optim.Optimizer]:
        return _resolve_path(self.cls_path)


def _entry(name, cls_path, default_lr, kind="plain", uses_preset_lr=False, **defaults) -> OptimizerSpec:
    return OptimizerSpec(name, cls_path, default_lr, MappingProxyType(defaults), uses_preset_lr, kind)


SHIPPED: MappingProxyType[str, OptimizerSpec] = MappingProxyType({s.name: s for s in (
    _entry("adamw", "torch.optim.AdamW", 2e-4, uses_preset_lr=True, betas=(0.9, 0.999), eps=1e-8),
    _entry("sgd", "torch.optim.SGD", 0.1, momentum=0.9, nesterov=False),
    _entry("adabound", "pytorch_optimizer.AdaBound", 1e-3, final_lr=0.1, gamma=1e-3, weight_decouple=False),
    _entry("lion", "pytorch_optimizer.Lion", 5e-5, betas=(0.9, 0.99)),
    _entry("schedulefree_adamw", "pytorch_optimizer.ScheduleFreeAdamW", 1e-3, "schedulefree", betas=(0.9, 0.999)),
    _entry("loraplus", "torch.optim.AdamW", 2e-4, "loraplus", True, loraplus_lr_ratio=16.0),
    _entry("muon", "pytorch_optimizer.Muon", 2e-4, "muon", True, momentum=0.95, nesterov=True,
           use_adjusted_lr=True),
)})

# Settings with a first-class config field: a kwarg may not set them behind the config's back.
_SHADOWED = {"lr": "learning_rate", "weight_decay": "weight_decay"}
_SHADOWED_BY_KIND = {"loraplus": {"loraplus_weight_decay": "weight_decay"}, "muon": {"adamw_wd": "weight_decay"}}
_INTERNAL = ("params", "optimizer_cls", "use_muon", "model")  # set by `build`, never by a config
_EXTRA_KWARGS = {"loraplus": ("loraplus_lr_ratio", "loraplus_lr_embedding")}  # peft's, besides AdamW's


# ----------------------------------------------------------------------------- resolving names

def _module(path: str):
    """Import one of the allow-listed modules; nothing else is ever imported from a name."""
    if path == "torch.optim":
        return torch.optim
    if path == "pytorch_optimizer":
        import pytorch_optimizer

        return pytorch_optimizer
    raise AssertionError(path)  # callers check ALLOWED_MODULES first


def _catalog(path: str) -> dict[str, tuple[str, type]]:
    """Lower-case name -> (exported name, Optimizer subclass) of an allow-listed module (read, never cached)."""
    return {n.lower(): (n, v) for n, v in vars(_module(path)).items()
            if inspect.isclass(v) and issubclass(v, torch.optim.Optimizer) and v is not torch.optim.Optimizer
            and not n.startswith("_")}


def _resolve_path(dotted: str) -> type[torch.optim.Optimizer]:
    return _find_dotted(dotted)[1]


def _find_dotted(dotted: str) -> tuple[str, type]:
    """("torch.optim.Adagrad", class) for a dotted name in an allow-listed module; refused before any import."""
    module, _, attr = dotted.rpartition(".")
    if module.lower() not in ALLOWED_MODULES:
        raise UserError(f"optimizer '{dotted}' is not in an allowed module: only torch.optim.<Class> and "
                        "pytorch_optimizer.<Class> are accepted (nothing else is imported)",
                        "Name a shipped optimizer (" + ", ".join(SHIPPED) + ") or an optimizer class.")
    module = module.lower()
    found = _catalog(module).get(attr.lower())
    if found is not None:
        return f"{module}.{found[0]}", found[1]
    if hasattr(_module(module), attr):
        raise UserError(f"'{dotted}' is not a torch.optim.Optimizer subclass")
    raise UserError(f"unknown optimizer '{dotted}'" + _did_you_mean(attr, _names(module)))


def _names(module: str) -> list[str]:
    return [n for n, _ in _catalog(module).values()]


def _did_you_mean(word: str, *choice_lists: list[str]) -> str:
    """The closest name of each list (shipped names first), e.g. " (did you mean 'adamw' or 'Adam'?)"."""
    close = []
    for choices in choice_lists:
        lower = {c.lower(): c for c in choices}
        close += [lower[c] for c in difflib.get_close_matches(word.lower(), list(lower), n=1)
                  if c not in {x.lower() for x in close}]
    return " (did you mean " + " or ".join(f"'{c}'" for c in close) + "?)" if close else ""


def _spec_for_class(path: str, cls: type) -> OptimizerSpec:
    lr = inspect.signature(cls.__init__).parameters.get("lr")
    default = lr.default if lr is not None else None
    ok = isinstance(default, (int, float)) and not isinstance(default, bool) and default > 0
    kind = "schedulefree" if callable(getattr(cls, "eval", None)) and callable(getattr(cls, "train", None)) \
        else "plain"
    return OptimizerSpec(path, path, float(default) if ok else None, MappingProxyType({}), False, kind)


def get(name: str) -> OptimizerSpec:
    """A shipped entry, or an optimizer class of torch.optim / pytorch_optimizer; case-insensitive."""
    if not isinstance(name, str) or not name.strip():
        raise UserError(f"optimizer must be a non-empty name, got {name!r}")
    name = name.strip()
    if name.lower() in SHIPPED:
        return SHIPPED[name.lower()]
    if "." in name:
        return _spec_for_class(*_find_dotted(name))
    for module in ALLOWED_MODULES:  # torch.optim first: pytorch_optimizer re-exports some of its classes
        found = _catalog(module).get(name.lower())
        if found is not None:
            return _spec_for_class(f"{module}.{found[0]}", found[1])
    classes = _names("torch.optim") + _names("pytorch_optimizer")
    raise UserError(f"unknown optimizer '{name}'" + _did_you_mean(name, list(SHIPPED), classes),
                    f"Shipped: {', '.join(SHIPPED)}; or any torch.optim / pytorch_optimizer optimizer class by "
                    "name ('Adagrad', 'torch.optim.Adagrad', 'pytorch_optimizer.Ranger').")


# ----------------------------------------------------------------------------- checking kwargs

def _signature(cls: type) -> dict[str, inspect.Parameter]:
    return {n: p for n, p in inspect.signature(cls.__init__).parameters.items()
            if n not in ("self", "params") and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


def _accepted(spec: OptimizerSpec, cls: type) -> list[str]:
    shadowed = {**_SHADOWED, **_SHADOWED_BY_KIND.get(spec.kind, {})}
    names = [n for n in _signature(cls) if n not in shadowed and n not in _INTERNAL]
    return names + list(_EXTRA_KWARGS.get(spec.kind, ()))


def check(name: str, kwargs: dict | None = None) -> OptimizerSpec:
    """Validate a name and its kwargs without a model. Unknown or shadowing kwargs are errors."""
    spec = get(name)
    kwargs = {} if kwargs is None else kwargs
    if not isinstance(kwargs, dict):
        raise UserError(f"optimizer kwargs must be a mapping, got {kwargs!r}")
    cls = spec.load_class()
    where = f"optimizer '{spec.name}' ({spec.cls_path})"
    required = [n for n, p in _signature(cls).items() if p.default is p.empty]
    if required:
        raise UserError(f"{where} cannot be used: it needs {', '.join(required)}, which a config cannot supply "
                        "(it wraps another optimizer or needs the model)")
    if "lr" not in _signature(cls):
        raise UserError(f"{where} cannot be used: it takes no 'lr' argument, so learning_rate would be ignored")
    problems = []
    ratio = kwargs.get("loraplus_lr_ratio", 1.0)
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or ratio < 1:
        problems.append(f"loraplus_lr_ratio must be a number >= 1 (got {ratio!r})")
    shadowed = {**_SHADOWED, **_SHADOWED_BY_KIND.get(spec.kind, {})}
    for k in kwargs:
        if k in shadowed:
            problems.append(f"kwargs.{k} would override a first-class setting: use learning_rate / weight_decay "
                            f"(here: {shadowed[k]})")
        elif k in _INTERNAL:
            problems.append(f"kwargs.{k} is set by qwen-ft from the model, not by a config")
    accepted = _accepted(spec, cls)
    bad = [k for k in kwargs if k not in accepted and k not in shadowed and k not in _INTERNAL]
    if bad:
        hints = [f"'{k}'" + _did_you_mean(k, accepted) for k in bad]
        problems.append(f"unknown argument(s) for {where}: {', '.join(hints)}")
    if problems:
        raise UserError([f"{where}: {p}" if not p.startswith("unknown") else p for p in problems],
                        f"Accepted kwargs: {', '.join(accepted)}")
    _dry_run(spec, cls, kwargs)
    return spec


def _dry_run(spec: OptimizerSpec, cls: type, kwargs: dict) -> None:
    """Construct over one dummy tensor so that bad *values* (betas: 0.9, momentum: -1) fail up front."""
    kw = _plain({**spec.defaults, **kwargs})
    for k in _EXTRA_KWARGS.get(spec.kind, ()):
        kw.pop(k, None)
    dummy = torch.nn.Parameter(torch.zeros(2, 2))
    params = [{"params": [dummy], "use_muon": True}] if spec.kind == "muon" else [dummy]
    lr = spec.default_lr if spec.default_lr is not None else 1e-3
    try:
        cls(params, lr=lr, **kw)
    except (ValueError, TypeError, RuntimeError) as e:
        raise UserError(f"optimizer '{spec.name}' rejects kwargs {kwargs}: {e}") from None


def _plain(kwargs: dict) -> dict:
    """YAML gives lists where constructors expect tuples (betas)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}


def default_lr(name: str, preset_lr: float | None) -> float:
    """Adam-family entries take the model-size preset's lr; the others their own default."""
    spec = get(name)
    if spec.uses_preset_lr and preset_lr is not None:
        return preset_lr
    if spec.default_lr is None:
        raise UserError(f"optimizer '{spec.name}' has no default learning rate", "Set learning_rate.")
    return spec.default_lr


# ----------------------------------------------------------------------------- building

def build(name: str, model: torch.nn.Module, lr: float, weight_decay: float,
          kwargs: dict | None = None) -> torch.optim.Optimizer:
    """The optimizer over `model`'s trainable parameters (1-D ones - biases, norm gains - without decay)."""
    spec = check(name, kwargs)
    kw = _plain({**spec.defaults, **(kwargs or {})})
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise UserError(f"optimizer '{spec.name}': the model has no trainable parameters")
    cls = spec.load_class()
    try:
        if spec.kind == "loraplus":
            return _build_loraplus(model, named, lr, weight_decay, kw)
        if spec.kind == "muon":
            return _build_muon(cls, named, lr, weight_decay, kw)
        has_wd = "weight_decay" in _signature(cls)
        if not has_wd and weight_decay:
            raise UserError(f"optimizer '{spec.name}' has no weight decay, but weight_decay is {weight_decay}",
                            "Set weight_decay: 0 (--weight-decay 0) for it.")
        groups = _decay_groups(named, weight_decay if has_wd else None)
        return cls(groups, lr=lr, **kw)
    except (ValueError, TypeError) as e:
        raise UserError(f"optimizer '{spec.name}': {e}") from None


def _decay_groups(named, weight_decay: float | None, **extra) -> list[dict]:
    """Matrices decay, 1-D tensors (biases, norm gains) do not - the Trainer's default rule, by shape."""
    groups = []
    for params, wd in (([p for _, p in named if p.ndim >= 2], weight_decay),
                       ([p for _, p in named if p.ndim < 2], 0.0)):
        if params:
            groups.append({"params": params, **extra, **({} if weight_decay is None else {"weight_decay": wd})})
    return groups


def _build_loraplus(model, named, lr, weight_decay, kw) -> torch.optim.Optimizer:
    from peft.optimizers import create_loraplus_optimizer

    if not any("lora_B" in n for n, _ in named):
        raise UserError("optimizer 'loraplus' needs a LoRA model: no trainable lora_B matrices found")
    ratio = float(kw.pop("loraplus_lr_ratio"))  # check() made sure it is >= 1
    # peft gives B matrices (and any 1-D trainable tensor) lr * ratio and skips decay on biases and norms;
    # it takes the decay as loraplus_weight_decay, not weight_decay.
    return create_loraplus_optimizer(model, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=ratio,
                                     loraplus_weight_decay=weight_decay, **kw)


def _build_muon(cls, named, lr, weight_decay, kw) -> torch.optim.Optimizer:
    # pytorch_optimizer.Muon, not torch.optim.Muon: torch 2.13 has one, but it refuses any non-2-D parameter
    # and has no AdamW group, and the Trainer needs a single optimizer (one state_dict, one lr schedule).
    # Muon orthogonalizes a *matrix* update: the 2-D LoRA matrices get it. A 1-D tensor (bias, norm gain) has
    # no matrix to orthogonalize, and a >2-D one would be flattened to an arbitrary matrix view, so every
    # non-2-D trainable tensor goes to an AdamW group (use_muon=False) at adamw_lr (default: lr).
    adamw_lr = kw.pop("adamw_lr", lr)
    matrices = [(n, p) for n, p in named if p.ndim == 2]
    others = [(n, p) for n, p in named if p.ndim != 2]
    groups = [{"params": [p for _, p in matrices], "use_muon": True, "lr": lr, "weight_decay": weight_decay}]
    groups = groups if matrices else []
    groups += _decay_groups(others, weight_decay, use_muon=False, lr=adamw_lr)
    return cls(groups, lr=lr, adamw_lr=adamw_lr, adamw_wd=weight_decay, **kw)


# ----------------------------------------------------------------------------- schedule-free mode

def _train_mode(optimizer) -> bool | None:
    """True/False for a schedule-free optimizer's mode; None for any other optimizer."""
    if optimizer is None:
        return None
    flags = [g["train_mode"] for g in optimizer.param_groups if "train_mode" in g]
    if flags:
        return all(flags)
    flag = getattr(optimizer, "train_mode", None)  # pytorch_optimizer.ScheduleFreeWrapper keeps one flag
    return flag if isinstance(flag, bool) else None


def _set_mode(optimizer, train: bool) -> None:
    mode = _train_mode(optimizer)
    if mode is not None and mode != train:
        optimizer.train() if train else optimizer.eval()


@contextlib.contextmanager
def eval_mode(optimizer) -> Iterator[Any]:
    """Schedule-free: the model holds the averaged (eval) weights inside, the training ones after."""
    if _train_mode(optimizer) is not True:  # not schedule-free, or already in eval mode: leave it alone
        yield optimizer
        return
    optimizer.eval()
    try:
        yield optimizer
    finally:
        optimizer.train()


class OptimizerModeCallback(TrainerCallback):
    """A schedule-free optimizer in eval mode (averaged weights) for evaluation *and* checkpoint saving.

    The Trainer itself calls `optimizer.eval()` in its evaluation loop and `optimizer.train()` in each
    training step (duck-typed, as for its built-in `schedule_free_*` optims), but saves checkpoints in
    whatever mode it is in; the schedule-free authors ask for eval mode when saving. So: eval when the step
    or epoch is about to evaluate or save (add this callback after any callback that sets
    `control.should_save`), train again after the save, or after an evaluation that no save follows.
    At the end of training the model is left with the averaged weights, for the final save and validation.
    No-op for every other optimizer.
    """

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        _set_mode(optimizer, train=True)

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        if control.should_evaluate or control.should_save:
            _set_mode(optimizer, train=False)

    on_epoch_end = on_step_end

    def on_evaluate(self, args, state, control, optimizer=None, **kwargs):
        _set_mode(optimizer, train=False)
        # save_strategy "best" decides whether to save only after this event: stay in eval for it
        if not control.should_save and str(getattr(args, "save_strategy", "")).lower().rpartition(".")[2] != "best":
            _set_mode(optimizer, train=True)

    def on_save(self, args, state, control, optimizer=None, **kwargs):
        _set_mode(optimizer, train=True)

    def on_train_end(self, args, state, control, optimizer=None, **kwargs):
        if _train_mode(optimizer) is None:
            return
        if getattr(args, "load_best_model_at_end", False) and state.best_model_checkpoint is not None:
            # the Trainer has just loaded a checkpoint saved in eval mode: the weights are the averaged ones
            # already, so only the flag changes (optimizer.eval() would average them a second time)
            for g in optimizer.param_groups:
                if "train_mode" in g:
                    g["train_mode"] = False
        else:
            _set_mode(optimizer, train=False)


# ----------------------------------------------------------------------------- measurements

def state_bytes(optimizer) -> int:
    """Bytes held by the tensors in `optimizer.state` (moments, momentum buffers, step counters)."""
    seen: set[int] = set()

    def count(value) -> int:
        if isinstance(value, torch.Tensor):
            if id(value) in seen:
                return 0
            seen.add(id(value))
            return value.numel() * value.element_size()
        if isinstance(value, dict):
            return sum(count(v) for v in value.values())
        if isinstance(value, (list, tuple)):
            return sum(count(v) for v in value)
        return 0

    return sum(count(s) for s in optimizer.state.values())


def adabound_bounds(final_lr: float, gamma: float, lr: float, base_lr: float, step: int) -> tuple[float, float]:
    """AdaBound's clip on each element's step size at step t (1-based), as pytorch_optimizer applies it.

    final = final_lr * lr / base_lr (the final rate follows the lr schedule; base_lr is the group's lr when
    the optimizer was built), lower = final * (1 - 1 / (gamma t + 1)), upper = final * (1 + 1 / (gamma t)).
    Each element moves by clip(lr * sqrt(1 - b2^t) / (1 - b1^t) / (sqrt(v_t) + eps), lower, upper) * m_t.
    upper / lower = (gamma t + 1)^2 / (gamma t)^2: ~121 at gamma t = 0.1 (gamma 1e-3, 100 steps: Adam); the
    bounds are within 1.5x of each other only past gamma t ~ 5.
    """
    final = final_lr * lr / base_lr if base_lr > 0 else 0.0
    return final * (1 - 1 / (gamma * step + 1)), final * (1 + 1 / (gamma * step))


__all__ = ["ALLOWED_MODULES", "SHIPPED", "OptimizerModeCallback", "OptimizerSpec", "adabound_bounds", "build",
           "check", "default_lr", "eval_mode", "get", "state_bytes"]
