"""Typed configuration: one dataclass per command, presets by model size, precedence, validation.

Precedence (lowest first): dataclass defaults < model-size preset < YAML file < environment < CLI flags.
Every field carries its help text and CLI flag once, in its metadata; the parser is generated from it.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from qwen_ft.errors import Problems, UserError


def arg(default: Any, help: str, flag: str | None = None, choices: tuple | None = None, **kw):
    meta = {"help": help, "flag": flag, "choices": choices}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


@dataclass
class ModelArgs:
    model: str = arg("smollm2-135m", "Hub id, local folder, or 'smollm2-135m' (the embedded default).", "--model")
    trust_remote_code: bool = arg(False, "Allow model code from the hub (off unless asked).", "--trust-remote-code")
    precision: str = arg(
        "auto",
        "Compute dtype: auto (bf16 where the device supports it, else fp32), fp32, bf16, fp16.",
        "--precision",
        ("auto", "fp32", "bf16", "fp16"),
    )
    attn_implementation: str | None = arg(None, "Attention kernel (sdpa, eager, flash_attention_2).", "--attn-implementation")
    gradient_checkpointing: bool = arg(False, "Recompute activations in backward (less memory, ~20% slower).", "--gradient-checkpointing")
    max_length: int = arg(512, "Longest prompt+answer in tokens; longer questions are truncated (never the instruction or answer).", "--max-length")
    head: str = arg("generative", "generative: the model writes the label (LoRA on the language model); classification: "
                    "a baseline with a linear head over the labels on the prompt's last token (sequence "
                    "classification + LoRA, category tasks only; decode 'head').", "--head",
                    ("generative", "classification"))


@dataclass
class DataArgs:
    data: str = arg("demo", "'demo', 'demo-mc', a hub id, or a local .jsonl/.json/.csv/.parquet file.", "--data")
    task: str = arg("auto", "category (text -> label) or multiple_choice (question + choices -> letter).", "--task",
                    ("auto", "category", "multiple_choice"))
    hub_split: str | None = arg(None, "Split to read from a hub data set (default: train, else test).", "--hub-split")
    text_column: str | None = arg(None, "Column holding the text (default: question/text/...).", "--text-column")
    label_column: str | None = arg(None, "Column holding the label (default: category/label/...).", "--label-column")
    max_samples_per_category: int | None = arg(None, "Sample at most this many rows per label (seeded).", "--max-samples-per-category")
    max_samples: int | None = arg(None, "Sample at most this many rows in all (seeded, after per-label sampling).", "--max-samples")
    max_train_samples_per_category: int | None = arg(
        None, "After splitting, train on at most this many rows per label (seeded); validation and test keep "
        "their full share of the data (for learning curves on fixed validation rows).",
        "--max-train-samples-per-category")
    validation_data: str | None = arg(None, "Separate validation source; then --data is split only into train/test.", "--validation-data")
    max_validation_samples: int | None = arg(None, "Use at most this many validation rows (seeded sample).", "--max-validation-samples")
    val_fraction: float = arg(0.2, "Fraction of rows for validation.", "--val-fraction")
    test_fraction: float = arg(0.2, "Fraction of rows for test.", "--test-fraction")
    split_by: str | None = arg(
        None, "Hold whole groups out: the values of this column (e.g. MMLU-Pro's src) are groups, and the test "
        "split is made of groups drawn with --seed (about --test-fraction of the rows) that no training or "
        "validation row comes from; validation stays a stratified sample of the other rows. Needs "
        "--test-fraction > 0; RUN/run.json lists the held-out groups (split_groups).", "--split-by")
    augment: str | None = arg(
        None, "Training-time noise, typos:RATE (RATE in [0, 1]): after splitting, append to the training split "
        "one copy of every training row with about RATE of its question's characters swapped, dropped or "
        "duplicated (seeded with --seed; ids end in '-aug'). Doubles the training rows; validation and test "
        "are never touched.", "--augment")
    dedup: str | None = arg(
        None, "The near-duplicate screen (always run; counts in run.json) drops evaluation rows that copy a training "
        "row: exact (after normalising case, punctuation and spacing) or near (also word-bigram Jaccard >= 0.8).",
        "--dedup", (None, "exact", "near"))
    holdout_groups: list[str] | None = arg(
        None, "With --split-by: hold out exactly these groups as the test split instead of drawing them "
        "(cross-validation folds).", "--holdout-groups")
    balance: str | None = arg(
        None, "oversample: repeat the training rows of smaller labels (seeded) until every label has as many "
        "as the largest (class-balanced sampling).", "--balance", (None, "oversample"))
    answer_format: str = arg("letter", "Multiple choice: the model writes the letter, or the text of the correct "
                             "choice (mapped back to its letter; for models too small to bind letters).",
                             "--answer-format", ("letter", "text"))
    prompt_style: str = arg("chat", "chat: the tokenizer's chat template (instruction as system message); plain: no "
                            "template, '<question>\\nAnswer: <answer>' as lm-evaluation-harness scores multiple "
                            "choice (answers carry no end token, so scoring is exact).", "--prompt-style",
                            ("chat", "plain"))
    instruction: str | None = arg(None, "System instruction; {labels} is replaced by the label list.", "--instruction")
    question_template: str | None = arg(None, "User message; {question} (and {choices} for multiple choice).", "--question-template")


@dataclass
class LoraArgs:
    rank: int | None = arg(None, "LoRA rank (default: size preset).", "--lora-rank")
    alpha: float | None = arg(None, "LoRA alpha (default: size preset, 2 x rank).", "--lora-alpha")
    dropout: float | None = arg(None, "LoRA dropout (default: size preset).", "--lora-dropout")
    target_modules: list[str] | None = arg(None, "Modules to adapt (default: q,k,v,o,gate,up,down projections).", "--lora-target-modules")


@dataclass
class OptimArgs:
    optimizer: str = arg("adamw", "Optimizer from the registry (adamw, sgd, adabound, ...).", "--optimizer")
    learning_rate: float | None = arg(None, "Peak learning rate (default: preset for adamw, the optimizer's own otherwise).", "--learning-rate")
    weight_decay: float = arg(0.01, "Weight decay.", "--weight-decay")
    warmup_ratio: float = arg(0.1, "Fraction of steps for linear warm-up.", "--warmup-ratio")
    max_grad_norm: float = arg(1.0, "Gradient clipping norm (0 disables).", "--max-grad-norm")
    lr_scheduler: str = arg("cosine", "Learning-rate schedule (transformers name: cosine, linear, constant...).", "--lr-scheduler")
    kwargs: dict = arg({}, "Extra optimizer keyword arguments (YAML only); unknown ones are an error.")


@dataclass
class TrainArgs:
    epochs: int | None = arg(None, "Training epochs (default: size preset).", "--epochs")
    batch_size: int | None = arg(None, "Per-device batch size (default: size preset).", "--batch-size")
    eval_batch_size: int | None = arg(None, "Per-device batch size for validation loss (default: 2 x batch).", "--eval-batch-size")
    grad_accum: int = arg(1, "Gradient accumulation steps.", "--grad-accum")
    early_stopping_patience: int = arg(2, "Stop after this many epochs without a better val loss (0: off).", "--early-stopping-patience")
    seed: int = arg(42, "Seed for sampling, splitting, LoRA init and data order.", "--seed")
    output_dir: str | None = arg(None, "Run folder (default: runs/<model>-<data>).", "--output-dir")
    gpu_id: int | None = arg(None, "Use this GPU in a single-process run (torchrun: LOCAL_RANK decides).", "--gpu-id")
    save_steps: int | None = arg(None, "Also checkpoint every N optimizer steps (always at each epoch end).", "--save-steps")
    max_steps: int | None = arg(None, "Stop after N optimizer steps (overrides epochs for the schedule).", "--max-steps")
    logging_steps: int = arg(1, "Log train loss every N steps.", "--logging-steps")
    torch_compile: bool = arg(False, "Compile each layer's MLP and norms with torch.compile for training "
                              "(CPU: 1.4x per step on MMLU-Pro batches, ~1.1x over a whole run, none on the demo; "
                              "compiles once per machine, cached).",
                              "--torch-compile")
    eval_steps: int | None = arg(None, "Evaluate (validation loss, checkpoint selection, early stopping) every N "
                                 "optimizer steps instead of every epoch.", "--eval-steps")
    report_to: str = arg("none", "Experiment tracking: none, tensorboard (event files in RUN/tensorboard), mlflow "
                         "(file store in RUN/mlruns unless MLFLOW_TRACKING_URI is set), trackio, wandb.",
                         "--report-to", ("none", "tensorboard", "mlflow", "trackio", "wandb"))


@dataclass
class TrainConfig:
    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataArgs = field(default_factory=DataArgs)
    lora: LoraArgs = field(default_factory=LoraArgs)
    optim: OptimArgs = field(default_factory=OptimArgs)
    train: TrainArgs = field(default_factory=TrainArgs)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = "config") -> TrainConfig:
        return build(cls, d, where)

    def validate(self) -> None:
        p = Problems()
        lo, tr, op, da, mo = self.lora, self.train, self.optim, self.data, self.model
        p.check(lo.rank is None or lo.rank > 0, f"--lora-rank must be > 0 (got {lo.rank})")
        p.check(lo.alpha is None or lo.alpha > 0, f"--lora-alpha must be > 0 (got {lo.alpha})")
        p.check(lo.dropout is None or 0 <= lo.dropout < 1, f"--lora-dropout must be in [0, 1) (got {lo.dropout})")
        p.check(op.learning_rate is None or op.learning_rate > 0, f"--learning-rate must be > 0 (got {op.learning_rate})")
        p.check(op.weight_decay >= 0, f"--weight-decay must be >= 0 (got {op.weight_decay})")
        p.check(0 <= op.warmup_ratio < 1, f"--warmup-ratio must be in [0, 1) (got {op.warmup_ratio})")
        p.check(op.max_grad_norm >= 0, f"--max-grad-norm must be >= 0 (got {op.max_grad_norm})")
        p.check(tr.epochs is None or tr.epochs > 0, f"--epochs must be > 0 (got {tr.epochs})")
        p.check(tr.batch_size is None or tr.batch_size > 0, f"--batch-size must be > 0 (got {tr.batch_size})")
        p.check(tr.eval_batch_size is None or tr.eval_batch_size > 0, f"--eval-batch-size must be > 0 (got {tr.eval_batch_size})")
        p.check(tr.grad_accum > 0, f"--grad-accum must be > 0 (got {tr.grad_accum})")
        p.check(tr.early_stopping_patience >= 0, f"--early-stopping-patience must be >= 0 (got {tr.early_stopping_patience})")
        p.check(tr.max_steps is None or tr.max_steps > 0, f"--max-steps must be > 0 (got {tr.max_steps})")
        p.check(tr.save_steps is None or tr.save_steps > 0, f"--save-steps must be > 0 (got {tr.save_steps})")
        p.check(tr.eval_steps is None or tr.eval_steps > 0, f"--eval-steps must be > 0 (got {tr.eval_steps})")
        p.check(tr.logging_steps > 0, f"--logging-steps must be > 0 (got {tr.logging_steps})")
        p.check(mo.max_length >= 32, f"--max-length must be >= 32 (got {mo.max_length})")
        for name in ("max_samples_per_category", "max_samples", "max_validation_samples",
                     "max_train_samples_per_category"):
            v = getattr(da, name)
            p.check(v is None or v > 0, f"--{name.replace('_', '-')} must be > 0 (got {v})")
        p.check(0 < da.val_fraction < 1, f"--val-fraction must be in (0, 1) (got {da.val_fraction})")
        p.check(0 <= da.test_fraction < 1, f"--test-fraction must be in [0, 1) (got {da.test_fraction})")
        p.check(da.val_fraction + da.test_fraction < 0.9, "--val-fraction + --test-fraction must leave >= 10% for training")
        p.check(not da.split_by or da.test_fraction > 0, f"--split-by {da.split_by} holds groups out as the test "
                f"split and needs --test-fraction > 0 (got {da.test_fraction})")
        p.check(not da.holdout_groups or bool(da.split_by), "--holdout-groups names groups of --split-by COLUMN")
        p.check(da.dedup in (None, "exact", "near"), f"--dedup must be exact or near (got {da.dedup!r})")
        p.check(da.balance in (None, "oversample"), f"--balance must be oversample (got {da.balance!r})")
        if da.augment is not None:
            from qwen_ft.perturb import parse_perturbation

            p.attempt(parse_perturbation, da.augment, "--augment")
        p.check(tr.gpu_id is None or tr.gpu_id >= 0, f"--gpu-id must be >= 0 (got {tr.gpu_id})")
        p.check(seed_problem(tr.seed) is None, seed_problem(tr.seed) or "")
        p.check(mo.max_length <= 1_000_000, f"--max-length must be <= 1000000 (got {mo.max_length})")
        for name in ("epochs", "batch_size", "eval_batch_size", "grad_accum"):
            v = getattr(tr, name)
            p.check(v is None or v <= 1_000_000, f"--{name.replace('_', '-')} must be <= 1000000 (got {v})")
        p.check(op.lr_scheduler in LR_SCHEDULERS, f"--lr-scheduler {op.lr_scheduler!r} is not a schedule"
                + _did_you_mean(op.lr_scheduler, LR_SCHEDULERS) + f"; known: {', '.join(LR_SCHEDULERS)}")
        p.check(mo.head in HEADS, f"--head {mo.head!r} is not a head; known: {', '.join(HEADS)}")
        p.check(mo.attn_implementation in (None, *ATTENTION), f"--attn-implementation {mo.attn_implementation!r} "
                f"is not an attention kernel" + _did_you_mean(mo.attn_implementation or "", ATTENTION)
                + f"; known: {', '.join(ATTENTION)}")
        p.raise_if_any()


# ----------------------------------------------------------------------------- presets

def seed_problem(seed: int) -> str | None:
    if 0 <= seed < 2**32:
        return None
    return f"--seed must be in [0, 2**32) (got {seed}): numpy and the data split take only non-negative 32-bit seeds"


# transformers schedules that need no extra arguments (cosine_with_min_lr & co. need lr_scheduler_kwargs)
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "inverse_sqrt", "reduce_lr_on_plateau")
HEADS = ("generative", "classification")
# attention kernels built into transformers; hub kernels ("org/repo") would load code, so they are not offered
ATTENTION = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")


def _did_you_mean(value: str, known) -> str:
    close = difflib.get_close_matches(str(value), list(known), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


@dataclass(frozen=True)
class Preset:
    name: str
    max_params: float
    values: dict


# From the seed guide's table (0.6B / 1.7B / 7B+); the "tiny" row is ours, for sub-0.5B models on CPU:
# lora_dropout 0 because dropout costs ~50% of CPU training speed and such short runs do not overfit.
PRESETS = [
    Preset("tiny (<0.3B)", 0.3e9, {"lora.rank": 16, "lora.alpha": 32, "lora.dropout": 0.0,
                                   "optim.learning_rate": 5e-4, "train.batch_size": 8, "train.epochs": 3}),
    Preset("0.6B (<1.2B)", 1.2e9, {"lora.rank": 16, "lora.alpha": 32, "lora.dropout": 0.05,
                                   "optim.learning_rate": 3e-4, "train.batch_size": 8, "train.epochs": 5}),
    Preset("1.7B (<5B)", 5e9, {"lora.rank": 16, "lora.alpha": 32, "lora.dropout": 0.1,
                               "optim.learning_rate": 2e-4, "train.batch_size": 16, "train.epochs": 5}),
    Preset("7B+", float("inf"), {"lora.rank": 32, "lora.alpha": 64, "lora.dropout": 0.1,
                                 "optim.learning_rate": 1e-4, "train.batch_size": 4, "train.epochs": 3}),
]


def preset_for(n_params: int) -> Preset:
    return next(p for p in PRESETS if n_params < p.max_params)


# ----------------------------------------------------------------------------- building

def _sections(cls) -> dict[str, type]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        raise UserError(f"{where}: expected true/false, got {value!r}")
    if tp in (int, float):
        return _number(value, tp, where)
    if tp is str:
        if isinstance(value, (dict, list)):
            raise UserError(f"{where}: expected text, got {value!r}")
        return str(value)
    if origin is list or tp is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{where}: expected a list, got {value!r}")
        return [str(v) for v in value]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    return value


def _number(value: Any, tp: type, where: str) -> int | float:
    """An int or a finite float from a number or its text; '3', '3.0' and '1e3' are whole numbers, '0.5' is not."""
    number = None
    if not isinstance(value, bool) and isinstance(value, (int, float, str)):
        try:
            number = int(value) if tp is int and not isinstance(value, float) else float(value)
        except (TypeError, ValueError, OverflowError):
            try:
                number = float(value)
            except (TypeError, ValueError, OverflowError):
                number = None
    if number is None:
        raise UserError(f"{where}: expected a number ({tp.__name__}), got {value!r}")
    if not math.isfinite(number):
        raise UserError(f"{where}: expected a finite number, got {value!r}")
    if tp is float:
        return float(number)
    if isinstance(number, float) and not number.is_integer():
        raise UserError(f"{where}: expected a whole number (int), got {value!r}")
    return int(number)


def build(cls, data: dict, where: str = "config", _sections_of_parent: dict | None = None):
    """Build a (nested) config dataclass from a nested dict, rejecting unknown keys with a suggestion."""
    data = data or {}
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = _sections(cls)
    p = Problems()
    for key in data:
        if key not in hints:
            p.add(f"{where}: unknown key '{key}'" + _suggest(str(key), hints, _sections_of_parent))
    kwargs = {}
    for name, tp in hints.items():
        if name not in data:
            continue
        if dataclasses.is_dataclass(tp):
            kwargs[name] = p.attempt(build, tp, data[name], f"{where}.{name}", hints)
        else:
            kwargs[name] = p.attempt(_coerce, data[name], tp, f"{where}.{name}")
    p.raise_if_any()
    return cls(**kwargs)


def _suggest(key: str, known: dict[str, type], sibling_sections: dict[str, type] | None) -> str:
    """' (did you mean ...?)': a close name here, or the same name in another section."""
    elsewhere = []
    for section, tp in (sibling_sections or {}).items():
        if dataclasses.is_dataclass(tp) and key in {f.name for f in dataclasses.fields(tp)}:
            elsewhere.append(section)
    for section, tp in known.items():  # top level: a field written without its section
        if dataclasses.is_dataclass(tp) and key in {f.name for f in dataclasses.fields(tp)}:
            return f" (did you mean '{section}.{key}'?)"
    if elsewhere:
        return f" (it belongs in the '{elsewhere[0]}' section)"
    close = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(known)})"


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k != "kwargs":
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def unflatten(flat: dict[str, Any]) -> dict:
    out: dict = {}
    for key, v in flat.items():
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = v
    return out


def load_yaml(path: str | os.PathLike) -> dict:
    path = Path(path)
    if path.exists() and not path.is_file():  # a folder, a FIFO (reading it would hang), a device
        raise UserError(f"config file {path} is not a regular file", "Pass a YAML file to --config.")
    if not path.is_file():
        raise UserError(f"config file not found: {path}", "Pass an existing YAML file to --config.")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of sections (model:, data:, lora:, optim:, train:)")
    return data


ENV_OVERRIDES = {  # the study seed's environment overrides
    "TRAIN_BATCH_SIZE": "train.batch_size",
    "GRAD_ACCUM_STEPS": "train.grad_accum",
    "USE_BF16": "model.precision",
    "USE_FLASH_ATTN": "model.attn_implementation",
}


def env_overrides(env: dict | None = None) -> dict[str, Any]:
    env = os.environ if env is None else env
    out: dict[str, Any] = {}
    for var, key in ENV_OVERRIDES.items():
        if var not in env or env[var] == "":
            continue
        value = env[var]
        if var == "USE_BF16":
            out[key] = "bf16" if _coerce(value, bool, f"environment variable {var}") else "fp32"
        elif var == "USE_FLASH_ATTN":
            if _coerce(value, bool, f"environment variable {var}"):
                out[key] = "flash_attention_2"
        else:  # named by the variable, not by the config key it sets
            out[key] = _coerce(value, field_types(TrainConfig)[key], f"environment variable {var}")
    return out


def field_types(cls) -> dict[str, Any]:
    """Dotted key ('train.epochs') -> its type, for every field of a sectioned config dataclass."""
    out = {}
    for section, tp in _sections(cls).items():
        if dataclasses.is_dataclass(tp):
            out.update({f"{section}.{name}": sub for name, sub in _sections(tp).items()})
    return out


def flag_for(key: str, cls=None) -> str:
    """The command-line flag of a dotted key ('train.epochs' -> '--epochs'), else the key itself."""
    cls = cls or TrainConfig
    section, _, name = key.partition(".")
    tp = _sections(cls).get(section)
    if dataclasses.is_dataclass(tp):
        for f in dataclasses.fields(tp):
            if f.name == name and f.metadata.get("flag"):
                return f.metadata["flag"]
    return key


HINTS = {"train.epochs": "--epochs counts whole passes over the data; for part of one, use --max-steps."}


def coerce_layer(layer: dict[str, Any], where, cls=None) -> dict[str, Any]:
    """Values of one layer (flags, YAML) converted to their field types, each problem named by `where(key)`
    (the flag or the file it came from); unknown keys pass through (`build` reports them)."""
    types = field_types(cls or TrainConfig)
    p = Problems()
    out = {}
    for key, value in layer.items():
        if key not in types or value is None:
            out[key] = value
            continue
        try:
            out[key] = _coerce(value, types[key], where(key))
        except UserError as e:
            p.add(e.problems[0], HINTS.get(key))
    p.raise_if_any()
    return out


def resolve(cls, layers: list[dict[str, Any]], where: str = "config", check: bool = True):
    """Merge flat dotted-key layers (lowest precedence first) on top of the defaults and validate."""
    merged = flatten(dataclasses.asdict(cls()))
    for layer in layers:
        merged.update({k: v for k, v in layer.items()})
    cfg = build(cls, unflatten(merged), where)
    if check and hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def save_yaml(obj, path: Path) -> None:
    data = dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj
    path.write_text(yaml.safe_dump(data, sort_keys=False))


LATER_DATA_FIELDS = ("split_by", "augment", "max_train_samples_per_category", "dedup", "holdout_groups", "balance")  # off (None), they hash as before they existed


def without_later_data_fields(data: dict) -> dict:
    """A data section as hashed: the fields of LATER_DATA_FIELDS left out while off, so that unfinished runs
    and study phases written before they existed still match."""
    return {k: v for k, v in data.items() if not (k in LATER_DATA_FIELDS and v is None)}


def config_hash(obj, speed_levers: bool = False) -> str:
    import hashlib
    import json

    data = dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj
    if isinstance(data.get("model"), dict) and data["model"].get("head") == "generative":
        # the default head hashes as before the field existed: unfinished older runs still --resume
        data = {**data, "model": {k: v for k, v in data["model"].items() if k != "head"}}
    if isinstance(data.get("data"), dict):
        data = {**data, "data": without_later_data_fields(data["data"])}
    if not speed_levers and isinstance(data.get("train"), dict) and "torch_compile" in data["train"]:
        # a speed lever (the same results up to float rounding, tests/test_compile.py): a run resumes with or
        # without it, and hashes as runs did before it could be on (`speed_levers=True`: the hash as it was)
        data = {**data, "train": {**data["train"], "torch_compile": False}}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]
