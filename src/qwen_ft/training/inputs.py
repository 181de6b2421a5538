"""A run's inputs: the config resolved against the model's size preset, every input checked together before
anything heavy, and the prepared rows tokenized into the Trainer's datasets."""

from __future__ import annotations

import copy
import dataclasses
import logging
import re
from pathlib import Path

from qwen_ft import distributed as dist
from qwen_ft import optimizers
from qwen_ft.config import TrainConfig, config_hash, preset_for, resolve
from qwen_ft.data.prepare import Prepared, prepare
from qwen_ft.data.sources import DEMOS, demo_path, is_hub
from qwen_ft.encoding import PromptEncoder
from qwen_ft.errors import ConfigDiffersError, Problems, UserError
from qwen_ft.models import (
    EMBEDDED,
    base_shape,
    check_attention,
    count_parameters,
    embedded_gguf,
    load_config,
    resolve_model,
)
from qwen_ft.outputs import OutputPlan, plan_output
from qwen_ft.provenance import data_records, model_record
from qwen_ft.runs import RunDir

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Resolved:
    config: TrainConfig
    model_path: str
    n_params: int
    preset: str
    base_shape: dict
    input_files: dict = dataclasses.field(default_factory=dict)  # run.json's: the digests of the files read


def resolve_config(cfg: TrainConfig | dict) -> Resolved:
    """Fill what the user left unset (None) from the model-size preset; every problem reported at once,
    before anything heavy. The preset is picked from the model's counted parameters (config only).
    `cfg` may also be the command line's flat layers ({"lora.rank": 8, ...}: YAML < env < flags)."""
    p = Problems()
    cfg = resolve(TrainConfig, [cfg], check=False) if isinstance(cfg, dict) else copy.deepcopy(cfg)
    p.attempt(cfg.validate)
    p.attempt(check_attention, cfg.model.attn_implementation)
    model_path = p.attempt(resolve_model, cfg.model.model)
    mconf = p.attempt(load_config, model_path, cfg.model.trust_remote_code) if model_path else None
    n_params = p.attempt(_count_parameters, mconf, model_path) if mconf is not None else None
    o = cfg.optim
    if n_params is None:  # no preset without a model: check the optimizer alone
        p.attempt(optimizers.check, o.optimizer, o.kwargs)
        p.raise_if_any()
    preset = preset_for(n_params)
    for key, value in preset.values.items():
        section, name = key.split(".")
        if name == "learning_rate":
            continue
        if getattr(getattr(cfg, section), name) is None:
            setattr(getattr(cfg, section), name, value)
    if o.learning_rate is None:  # Adam-family: the preset's lr; others: their own default
        o.learning_rate = p.attempt(optimizers.default_lr, o.optimizer, preset.values["optim.learning_rate"])
    p.attempt(optimizers.check, o.optimizer, o.kwargs)
    # a LoRA update of rank above the smallest side of a layer is a full-rank update at more memory
    width = min(v for v in (getattr(mconf, "hidden_size", None), getattr(mconf, "intermediate_size", None)) if v) \
        if mconf is not None and getattr(mconf, "hidden_size", None) else None
    p.check(width is None or cfg.lora.rank <= width, f"--lora-rank {cfg.lora.rank} is above the model's layer width "
            f"{width}: the update would be full rank with more parameters than the layer (use --lora-rank <= {width})")
    p.raise_if_any()
    cfg.train.output_dir = cfg.train.output_dir or default_output_dir(cfg)
    return Resolved(cfg, model_path, n_params, preset.name, base_shape(mconf))


def default_output_dir(cfg: TrainConfig) -> str:
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{Path(cfg.model.model).name}-{Path(cfg.data.data).stem}")
    return f"runs/{slug}"


def _count_parameters(mconf, model_path: str) -> int:
    try:
        return count_parameters(mconf)
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{model_path} is not a causal language model ({type(mconf).__name__}): {e}",
                        "Pass a decoder-only model such as Qwen/Qwen3-0.6B.") from None


def check_inputs(cfg: TrainConfig | dict, resume: bool, overwrite: bool, prepared: Prepared | None = None,
                 inputs: dict | None = None) -> tuple[Resolved, Prepared, OutputPlan]:
    """Flags, model, data and output folder checked together: every problem in one report, nothing written.
    `inputs`: further files the command reads ({"--config": path}); the output may not hold any input."""
    if isinstance(cfg, dict):
        cfg = resolve(TrainConfig, [cfg], check=False)
    p = Problems()
    r = p.attempt(resolve_config, cfg)
    if prepared is None and (not p or not (is_hub(cfg.data.data) or is_hub(cfg.data.validation_data))):
        # local data is cheap to check alongside; a hub download waits until everything else is right
        prepared = p.attempt(prepare, (r.config if r else cfg).data, cfg.train.seed)
    if cfg.model.head == "classification" and prepared is not None and prepared.task.name != "category":
        p.add(f"--head classification trains a head over a fixed label set: category tasks only (this data is "
              f"{prepared.task.name})", "Train multiple choice with the default --head generative.")
    out = Path(r.config.train.output_dir if r else cfg.train.output_dir or default_output_dir(cfg))
    reads = {"--data": cfg.data.data, "--validation-data": cfg.data.validation_data,
             "--model": r.model_path if r else cfg.model.model, **(inputs or {})}
    plan = p.attempt(plan_output, out, resume=resume, overwrite=overwrite, inputs=reads)
    differs = False
    if plan is not None and plan.mode == "resume" and r is not None:
        saved = RunDir(plan.work).config_digest()
        # (runs started with --torch-compile before it hashed as off saved the hash with it on)
        differs = saved not in (config_hash(r.config), config_hash(r.config, speed_levers=True))
        p.check(not differs, f"--resume: the config differs from the unfinished run in {out}; "
                f"use the same flags as before (see {plan.work / 'config.yaml'}), or --overwrite")
    p.raise_if_any(error=ConfigDiffersError if differs else UserError)
    # hashed as soon as read: a file edited while the run trains must not pass for the one trained on
    r.input_files = data_records({flag: demo_path(s) if s in DEMOS else s for flag, s in reads.items()
                                  if flag != "--model"})
    return r, prepared, plan


def base_model_files(r: Resolved) -> dict:
    """run.json's "base_model_files": the weights the base was loaded from (the embedded alias: its converted
    copy and the GGUF shipped in its package), and its hub revision."""
    name = r.config.model.model
    folder = Path(r.model_path) if Path(r.model_path).is_dir() else None
    try:
        extra = (embedded_gguf(name),) if name in EMBEDDED else ()
    except UserError:  # the package was removed after the conversion: the converted copy alone
        extra = ()
    return model_record(name, folder, extra)


def encoded_splits(encoder: PromptEncoder, prepared: Prepared, cache: dict | None, head_pad: int | None):
    """(train dataset, validation dataset, prompts truncated in both); a warning names the truncation."""
    train_ds, n_trunc_train = _encoded(encoder, prepared, "train", cache, head_pad)
    val_ds, n_trunc_val = _encoded(encoder, prepared, "validation", cache, head_pad)
    n_truncated = n_trunc_train + n_trunc_val
    if n_truncated and dist.is_main():
        log.warning("%d of %d prompts were longer than --max-length %d: their question text was truncated "
                    "(the instruction and the answer are kept whole)", n_truncated, len(train_ds) + len(val_ds),
                    encoder.max_length)
    return train_ds, val_ds, n_truncated


def _encoded(encoder: PromptEncoder, prepared: Prepared, split: str, cache: dict | None, head_pad: int | None = None):
    """(tokenized split, prompts truncated) - from `cache` when the same split was encoded the same way.
    `head_pad`: the pad id of a classification-head run, whose examples are the prompts and class ids."""
    from datasets import Dataset

    head = head_pad is not None
    key = (id(prepared), split, encoder.max_length, getattr(encoder.tok, "name_or_path", None), head)
    if cache is not None and key in cache:
        return cache[key]
    encoded = [encoder.example(row, head, head_pad) for row in prepared.splits[split]]
    value = (Dataset.from_list([e for e, _ in encoded]), sum(cut for _, cut in encoded))
    if cache is not None:
        cache[key] = value
    return value
