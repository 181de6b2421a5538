"""The study's typed config: one `TrainConfig` (the sections of `qwen-ft train`, shared by every run) plus
the tuning protocol, the optimizers to compare, evaluation and merging.

A study YAML holds `model:`, `data:`, `lora:`, `optim:`, `train:` (exactly as for `qwen-ft train`), then:

    protocol:                       # identical for every optimizer
      trials: 6                     # per optimizer
      sampler: qmc                  # qmc: scrambled Sobol points (quasirandom); tpe; random
      final_seeds: [1, 2, 3]
      tune_rows: 300                # tuning split carved from the training data (never the validation set)
      trial_max_steps: 120          # budget of a trial; finals use final_max_steps (default: train.epochs)
      eval_steps: 40                # tuning-split loss every N steps: checkpoint selection + early stopping
      curve_every: 40               # finals: accuracy on curve_rows validation questions every N steps
      target: 0.35                  # time-to-target: the first step/second at which accuracy >= target
    optimizers:
      adamw:
        search: {learning_rate: {low: 1.0e-4, high: 3.0e-3, log: true}}
      adabound:
        search: {learning_rate: {...}, final_lr: {...}, gamma: {...}}   # non-optim keys: optimizer kwargs
        fixed: {weight_decay: 0.0}                                        # optim keys or kwargs, not searched

`include: [other.yaml]` loads other files first (paths relative to this one). Precedence: defaults <
model-size preset < YAML < environment < command-line flags. Reading a config never registers,
imports or runs anything named in it: optimizer names resolve through `optimizers.check` (an allow-list).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwen_ft import optimizers
from qwen_ft.config import OptimArgs, TrainConfig, arg, build, env_overrides, load_yaml
from qwen_ft.errors import Problems, UserError

PHASES = ("data", "train", "merge", "eval", "analysis")
SHARED = ("model", "data", "lora", "optim", "train")
OPTIM_KEYS = tuple(f.name for f in dataclasses.fields(OptimArgs) if f.name not in ("optimizer", "kwargs"))
PLAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")  # optimizer names become folder names


@dataclass
class ProtocolArgs:
    trials: int = arg(4, "Trials per optimizer (the same number for every optimizer).")
    sampler: str = arg("qmc", "qmc: scrambled Sobol points (quasirandom, enqueued, several workers); tpe: Optuna's "
                       "TPE (sequential); random.", choices=("qmc", "tpe", "random"))
    final_seeds: list = arg([1, 2], "Seeds of the final runs of each optimizer's best trial (LoRA init, data order).")
    tune_rows: int = arg(100, "Rows carved from the training data as the tuning split (trial scores, checkpoint "
                              "selection, early stopping); disjoint from the validation set.")
    trial_max_steps: int | None = arg(None, "Optimizer steps per trial (default: the train section's epochs).")
    final_max_steps: int | None = arg(None, "Optimizer steps per final run (default: the train section's epochs).")
    eval_steps: int | None = arg(None, "Tuning-split loss every N steps (default: every epoch).")
    curve_every: int | None = arg(None, "Finals: accuracy on `curve_rows` validation questions every N steps "
                                        "(time-to-target; default: eval_steps).")
    curve_rows: int = arg(200, "Validation questions scored for the learning curves (a fixed seeded sample).")
    target: float | None = arg(None, "Accuracy whose first attainment gives time-to-target and steps-to-target.")
    equivalence_margin: float = arg(0.02, "TOST margin: 'equivalent' only when the difference is shown to lie "
                                          "within +-margin (0.02 = 2 points).")
    tracking: str = arg("none", "Also log every trial and final as a run of one MLflow experiment (a file store in "
                        "<output_dir>/mlruns; `mlflow ui --backend-store-uri <output_dir>/mlruns`).",
                        choices=("none", "mlflow"))
    storage: str | None = arg(None, "Optuna storage URL (default sqlite:///<output_dir>/optuna.db); an RDB URL "
                                    "(postgresql://..., mysql://...) lets workers on several machines share it.")


@dataclass
class EvalArgs:
    split: str = arg("validation", "Split of the data phase that scores the finals.", choices=("validation", "test"))
    batch_size: int = arg(16, "Prompts per forward pass.")
    max_samples: int | None = arg(None, "Score only the first N rows of the split (quick looks).")
    decode: str = arg("constrained", "constrained: greedy over the row's answers (fast); exact: each answer's "
                      "full probability, argmax.", choices=("constrained", "exact"))
    normalize: str = arg("none", "Exact scoring: divide each answer's log-probability by its tokens (token) or "
                         "characters (char, lm-evaluation-harness acc_norm).", choices=("none", "token", "char"))
    precision: str = arg("auto", "Inference dtype: auto (bf16 where supported, else fp32), fp32, bf16.",
                         choices=("auto", "fp32", "bf16", "fp16"))


@dataclass
class MergeArgs:
    dtype: str = arg("auto", "Dtype of the saved merged weights: auto (the base model's own), fp32, bf16, fp16.",
                     choices=("auto", "fp32", "bf16", "fp16"))
    verify_samples: int = arg(4, "Prompts on which merged logits are checked against base+adapter logits (fp32).")
    tolerance: float = arg(1e-3, "Largest allowed |merged - (base+adapter)| logit difference, relative to the "
                                 "largest logit.")


@dataclass
class SearchRange:
    low: float
    high: float
    log: bool = True


@dataclass
class OptimizerEntry:
    """One arm of the comparison: an optimizer, its search space and its fixed settings."""

    name: str
    optimizer: str
    search: dict[str, SearchRange]
    fixed: dict[str, Any]

    def optim(self, base: OptimArgs, params: dict[str, float]) -> OptimArgs:
        """The OptimArgs of a run with `params` (a point of the search space)."""
        o = copy.deepcopy(base)
        o.optimizer = self.optimizer
        o.learning_rate = None
        o.kwargs = dict(base.kwargs or {})
        for key, value in {**self.fixed, **params}.items():
            if key == "kwargs":
                o.kwargs.update(value or {})
            elif key in OPTIM_KEYS:
                setattr(o, key, value)
            else:
                o.kwargs[key] = value
        return o

    def spec(self) -> dict:
        return {"optimizer": self.optimizer, "fixed": self.fixed,
                "search": {k: dataclasses.asdict(v) for k, v in self.search.items()}}


@dataclass
class StudyConfig:
    base: TrainConfig
    protocol: ProtocolArgs = field(default_factory=ProtocolArgs)
    eval: EvalArgs = field(default_factory=EvalArgs)
    merge: MergeArgs = field(default_factory=MergeArgs)
    optimizers: dict[str, OptimizerEntry] = field(default_factory=dict)
    output_dir: str = "."
    seed: int = 42
    demo: bool = False

    @property
    def out(self) -> Path:
        return Path(self.output_dir)

    def spec(self) -> dict:
        """What study.json records (the report reads it)."""
        return {"protocol": dataclasses.asdict(self.protocol), "eval": dataclasses.asdict(self.eval),
                "optimizers": {n: e.spec() for n, e in self.optimizers.items()}, "seed": self.seed,
                "demo": self.demo}


# ----------------------------------------------------------------------------- loading

STUDY_KEYS = {"protocol", "eval", "merge", "optimizers", "output_dir", "seed", "demo", "include"}


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
    """Deep merge of sections (later wins); `kwargs` and `search` mappings are replaced as a whole."""
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict) and k not in ("kwargs", "search"):
            _merge(base[k], v)
        else:
            base[k] = v


DEFAULT_OPTIMIZERS = {"adamw": {}, "sgd": {}, "adabound": {}}


def load_study_config(paths: list[str | Path], overrides: dict | None = None,
                      env: dict | None = None) -> StudyConfig:
    """YAML files (in order) < environment overrides < `overrides` (seed, output_dir from the command line)."""
    data = read_layers(paths) if paths else {}
    where = ", ".join(str(p) for p in paths) or "study config"
    p = Problems()
    for key in data:
        if key not in STUDY_KEYS and key not in SHARED:
            close = difflib.get_close_matches(str(key), [*STUDY_KEYS, *SHARED], n=1)
            p.add(f"{where}: unknown key '{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
    base = p.attempt(build, TrainConfig, {k: data[k] for k in SHARED if k in data}, where)
    protocol = p.attempt(build, ProtocolArgs, data.get("protocol") or {}, f"{where}: protocol")
    ev = p.attempt(build, EvalArgs, data.get("eval") or {}, f"{where}: eval")
    merge = p.attempt(build, MergeArgs, data.get("merge") or {}, f"{where}: merge")
    p.raise_if_any("See configs/demo.yaml for a complete study config.")
    for key, value in env_overrides(env).items():
        section, leaf = key.split(".")
        setattr(getattr(base, section), leaf, value)
    base = build(TrainConfig, dataclasses.asdict(base), where)  # re-coerce environment values to their types
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    cfg = StudyConfig(base=base, protocol=protocol, eval=ev, merge=merge,
                      output_dir=str(overrides.get("output_dir", data.get("output_dir", "."))),
                      seed=int(overrides.get("seed", data.get("seed", 42))), demo=bool(data.get("demo", False)))
    raw = data.get("optimizers", DEFAULT_OPTIMIZERS)
    if not isinstance(raw, dict) or not raw:
        raise UserError(f"{where}: optimizers must be a mapping name -> entry with at least one optimizer")
    cfg.optimizers = _entries(raw, where)
    validate(cfg, where)
    return cfg


def _entries(raw: dict, where: str) -> dict[str, OptimizerEntry]:
    p = Problems()
    out = {}
    for name, entry in raw.items():
        at = f"{where}: optimizers.{name}"
        name = str(name)
        if not PLAIN_NAME.match(name):
            p.add(f"{at}: the name must be a plain name (letters, digits, '_' or '-', at most 64): it becomes a "
                  "folder name")
            continue
        entry = entry or {}
        if not isinstance(entry, dict):
            p.add(f"{at}: expected a mapping with optimizer / search / fixed, got {entry!r}")
            continue
        unknown = [k for k in entry if k not in ("optimizer", "search", "fixed")]
        for k in unknown:
            hint = " (put it under 'fixed:' or 'search:')" if k in OPTIM_KEYS or k == "kwargs" else ""
            p.add(f"{at}: unknown key '{k}'{hint}")
        search, fixed = entry.get("search") or {}, entry.get("fixed") or {}
        if not isinstance(search, dict) or not isinstance(fixed, dict):
            p.add(f"{at}: search and fixed must be mappings")
            continue
        ranges = {}
        for key, r in search.items():
            rng = _range(f"{at}.search.{key}", r, p)
            if rng is not None:
                ranges[str(key)] = rng
        out[name] = OptimizerEntry(name, str(entry.get("optimizer", name)), ranges, dict(fixed))
    p.raise_if_any("Each optimizer entry: {optimizer: NAME, search: {learning_rate: {low, high, log}}, fixed: {...}}")
    return out


def _range(at: str, r: Any, p: Problems) -> SearchRange | None:
    if isinstance(r, (list, tuple)) and len(r) == 2:
        r = {"low": r[0], "high": r[1]}
    if not isinstance(r, dict) or set(r) - {"low", "high", "log"} or not {"low", "high"} <= set(r):
        p.add(f"{at}: expected {{low: X, high: Y, log: true|false}} or [X, Y], got {r!r}")
        return None
    try:
        rng = SearchRange(float(r["low"]), float(r["high"]), bool(r.get("log", True)))
    except (TypeError, ValueError):
        p.add(f"{at}: low and high must be numbers, got {r!r}")
        return None
    if not rng.low < rng.high or (rng.log and rng.low <= 0):
        p.add(f"{at}: need low < high (and low > 0 on a log scale), got {rng.low}..{rng.high}")
        return None
    return rng


def validate(cfg: StudyConfig, where: str) -> None:
    pr, p = cfg.protocol, Problems()
    p.check(pr.trials >= 1, f"{where}: protocol.trials must be >= 1 (got {pr.trials})")
    p.check(bool(pr.final_seeds) and all(isinstance(s, int) or str(s).lstrip("-").isdigit()
                                        for s in pr.final_seeds),
            f"{where}: protocol.final_seeds must be a list of integers (got {pr.final_seeds})")
    pr.final_seeds = [int(s) for s in pr.final_seeds] if p.items == [] else pr.final_seeds
    p.check(len(set(pr.final_seeds)) == len(pr.final_seeds), f"{where}: protocol.final_seeds repeat a seed")
    if not p.items:  # before the first trial, not after all of them
        from qwen_ft.config import seed_problem

        for s_ in pr.final_seeds:
            p.check(seed_problem(s_) is None, f"{where}: protocol.final_seeds: {seed_problem(s_)}")
    p.check(pr.tune_rows >= 2, f"{where}: protocol.tune_rows must be >= 2")
    for key in ("trial_max_steps", "final_max_steps", "eval_steps", "curve_every"):
        v = getattr(pr, key)
        p.check(v is None or v > 0, f"{where}: protocol.{key} must be > 0 (got {v})")
    p.check(pr.curve_rows >= 1, f"{where}: protocol.curve_rows must be >= 1")
    p.check(pr.target is None or 0 < pr.target <= 1, f"{where}: protocol.target is an accuracy in (0, 1]")
    p.check(0 < pr.equivalence_margin < 1, f"{where}: protocol.equivalence_margin must be in (0, 1)")
    p.check(cfg.eval.batch_size > 0, f"{where}: eval.batch_size must be > 0")
    p.check(cfg.eval.decode == "exact" or cfg.eval.normalize == "none",
            f"{where}: eval.normalize {cfg.eval.normalize} needs eval.decode exact")
    p.check(cfg.merge.verify_samples > 0, f"{where}: merge.verify_samples must be > 0")
    p.attempt(cfg.base.validate)
    p.check(cfg.base.model.head == "generative", f"{where}: model.head {cfg.base.model.head}: a study trains and "
            "compares generative runs only (its decoding, baselines and merged models score written labels); train "
            "a classification-head baseline with `qwen-ft train --head classification`")
    for name, entry in cfg.optimizers.items():
        kwargs = entry.optim(cfg.base.optim, {k: r.low for k, r in entry.search.items()}).kwargs
        try:
            optimizers.check(entry.optimizer, kwargs)
        except UserError as e:
            p.items.extend(f"{where}: optimizers.{name}: {m}" for m in e.problems)
    out = cfg.out
    p.check(not out.exists() or out.is_dir(), f"{where}: output_dir {out} exists and is not a folder")
    p.raise_if_any("See configs/demo.yaml for a complete study config.")
