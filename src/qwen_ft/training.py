"""The training library: `train(config) -> RunResult`, the one function that `qwen-ft train`, the seed
script, torchrun/accelerate launches and every study trial call.

config -> model + LoRA -> Trainer (1..N processes) -> run folder (see runs.py for its layout).

Speed: batches are left-padded, so every row's answer sits at its end, and the model computes logits
only for the last K+1 positions (`logits_to_keep`) instead of every position x the whole vocabulary.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import Trainer
from transformers.trainer_pt_utils import LengthGroupedSampler

from qwen_ft import attention, optimizers
from qwen_ft import distributed as dist
from qwen_ft.callbacks import (
    CheckpointTriggers,
    DivergenceGuard,
    EpochMetrics,
    StepTimer,
    strip_default_printing,
)
from qwen_ft.config import TrainConfig, config_hash, preset_for, resolve, save_yaml
from qwen_ft.data.prepare import Prepared, prepare
from qwen_ft.data.sources import is_hub
from qwen_ft.encoding import IGNORE, PromptEncoder
from qwen_ft.errors import ConfigDiffersError, Problems, TrainingInterrupted, UserError
from qwen_ft.models import (
    apply_lora,
    base_shape,
    check_attention,
    compiled_blocks,
    count_parameters,
    frozen_in_compute_dtype,
    load_config,
    load_model,
    load_tokenizer,
    resolve_model,
)
from qwen_ft.precision import inference_dtype, resolve_precision
from qwen_ft.runs import (
    OutputPlan,
    RunDir,
    checkpoint_write_error,
    claim_output,
    env_info,
    labels_digest,
    plan_output,
    read_jsonl_tolerant,
    remove_torn_checkpoints,
    staged_dir,
    write_json,
    write_jsonl,
)
from qwen_ft.scoring import left_pad

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- batching and loss

# A training batch runs packed when padding it would compute more than this x its real tokens. Measured
# (SmolLM2-135M, bf16, AMD EPYC 2 cores, benchmarks/levers.py): on length-grouped batches with little padding
# packed steps were ~15 % slower (the per-layer gather of the segments), on the Trainer's batches (80 % real
# tokens on average, the longest example of a mega-batch leading) packing paid: see PackedCollator.
PACK_ABOVE_PADDING = 1.2


class LeftPadCollator:
    """Pads a batch on the left; `labels` keep the answer mask built at encoding time."""

    def __init__(self, pad_id: int, pad_to_multiple_of: int | None = None):
        self.pad_id = pad_id
        self.multiple = pad_to_multiple_of

    def _width(self, features: list[dict]) -> int:
        width = max(len(f["input_ids"]) for f in features)
        return -(-width // self.multiple) * self.multiple if self.multiple else width

    def _inputs(self, features: list[dict], width: int) -> dict:
        input_ids, mask = left_pad([f["input_ids"] for f in features], self.pad_id, "cpu", width)
        return {"input_ids": input_ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}

    def __call__(self, features: list[dict]) -> dict:
        width = self._width(features)
        labels, _ = left_pad([f["labels"] for f in features], IGNORE, "cpu", width)
        # from each row's first answer token to its end (the rows end together): the positions the loss needs
        answer_span = max(len(f["labels"]) - next((j for j, v in enumerate(f["labels"]) if v != IGNORE),
                                                  len(f["labels"])) for f in features)
        return {**self._inputs(features, width), "labels": labels, "logits_to_keep": min(max(answer_span, 1) + 1, width)}


class PackedCollator(LeftPadCollator):
    """A batch whose padding would cost more than PACK_ABOVE_PADDING x its real tokens runs as one row without
    padding (CPU, qwen-ft's attention: `attention.packs`); others are padded on the left as LeftPadCollator pads.
    Packed: the examples one after another, positions restarting at 0 for each, their lengths under
    `attention.SEGMENTS` so that each attends to itself only; logits only where an answer token is predicted
    (plus one unused last position), and `labels` (IGNORE, then those answer tokens) line up with them the way
    `answer_loss` reads a padded batch's last K+1 positions: the loss, the gradients and the Trainer's token count
    are the padded batch's. The linear layers and MLPs compute no padding; the attention lays the segments out
    as [segments, longest] (the same scores as the padded batch, without the masked cross-example pairs).
    Hand-written: transformers' padding-free path (restarting position ids) derives a block-diagonal mask over
    the whole row, which sdpa would score in full (T^2 per head); it stays as a safety net - were the segment
    keyword ever dropped, that mask still keeps the examples apart. `pack_above` 0: every batch packed."""

    def __init__(self, pad_id: int, pack_above: float = PACK_ABOVE_PADDING):
        super().__init__(pad_id)
        self.pack_above = pack_above

    def __call__(self, features: list[dict]) -> dict:
        real = sum(len(f["input_ids"]) for f in features)
        if len(features) * self._width(features) <= self.pack_above * real:
            return super().__call__(features)
        ids, positions, keep, targets, offset = [], [], [], [], 0
        for f in features:
            n = len(f["input_ids"])
            ids += f["input_ids"]
            positions += range(n)
            for j, label in enumerate(f["labels"]):
                if label != IGNORE and j:  # the token at j is predicted at position j - 1
                    keep.append(offset + j - 1)
                    targets.append(label)
            offset += n
        return {"input_ids": torch.tensor([ids]), "position_ids": torch.tensor([positions]),
                "labels": torch.tensor([[IGNORE, *targets]]), "logits_to_keep": torch.tensor([*keep, offset - 1]),
                attention.SEGMENTS: [len(f["input_ids"]) for f in features]}


def answer_loss(outputs, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """Cross-entropy over the answer tokens only; logits cover the last K+1 positions."""
    logits = outputs.logits
    k = logits.size(1) - 1
    targets = labels[:, labels.size(1) - k:].to(logits.device)
    loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                           ignore_index=IGNORE, reduction="sum")
    n = num_items_in_batch if num_items_in_batch is not None else targets.ne(IGNORE).sum()
    return loss / n


class HeadCollator(LeftPadCollator):
    """A classification-head batch (`--head classification`): prompts padded on the left, so each row's last
    prompt token sits in the last column; `labels` are the class ids."""

    def __call__(self, features: list[dict]) -> dict:
        return {**self._inputs(features, self._width(features)),
                "labels": torch.tensor([f["labels"] for f in features], dtype=torch.long)}


def class_loss(outputs, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """The sequence-classification model's own cross-entropy over its pooled logits, summed and divided by the
    rows of the whole (accumulated, all-process) batch as `answer_loss` is: the model's per-micro-batch mean
    would be scaled by neither gradient accumulation nor the process count."""
    logits = outputs.logits.float()
    loss = F.cross_entropy(logits, labels.to(logits.device), reduction="sum")
    return loss / (num_items_in_batch if num_items_in_batch is not None else labels.numel())


class SeededLengthGroupedSampler(LengthGroupedSampler):
    """Length-grouped order drawn from (seed, epoch) alone. The stock sampler draws it from the global RNG,
    whose state at an epoch start a resumed run cannot reproduce, so its data order would differ."""

    def __init__(self, batch_size: int, lengths: list[int], seed: int):
        super().__init__(batch_size, lengths=lengths, generator=torch.Generator())
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:  # called by the Trainer (via accelerate) before each epoch
        self.epoch = epoch

    def __iter__(self):
        self.generator.manual_seed(self.seed + self.epoch)
        return super().__iter__()


class SeededTrainer(Trainer):
    """Trainer whose length-grouped data order depends only on the seed and the epoch (exact resume), and
    whose optimizer comes from qwen-ft's registry (`optimizers.build`: LoRA+ and Muon need the model)."""

    def __init__(self, *args, optim_args=None, **kwargs):
        self.optim_args = optim_args
        super().__init__(*args, **kwargs)

    def create_optimizer(self, model=None):
        if self.optimizer is None and self.optim_args is not None:
            o = self.optim_args
            self.optimizer = optimizers.build(o.optimizer, model or self.model, o.learning_rate, o.weight_decay,
                                              o.kwargs)
            return self.optimizer
        return super().create_optimizer(model) if model is not None else super().create_optimizer()

    def _get_train_sampler(self, train_dataset=None):
        ds = train_dataset if train_dataset is not None else self.train_dataset
        column = self.args.length_column_name
        if self.args.train_sampling_strategy != "group_by_length" or column not in ds.column_names:
            return super()._get_train_sampler(train_dataset)
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return SeededLengthGroupedSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                          list(ds[column]), seed)

    def _save_checkpoint(self, model, trial):
        """A checkpoint that cannot be written (full disk...) is removed whole, and the run stops with one clear
        error; the last complete checkpoint stays the newest, for --resume."""
        try:
            super()._save_checkpoint(model, trial)
        except Exception as e:
            folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
            error = checkpoint_write_error(folder, e)
            if error is None:
                raise
            shutil.rmtree(folder, ignore_errors=True)
            raise error from e




# ----------------------------------------------------------------------------- configuration

@dataclasses.dataclass
class Resolved:
    config: TrainConfig
    model_path: str
    n_params: int
    preset: str
    base_shape: dict


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
        h = plan.work / "config.hash"
        saved = h.read_text().strip() if h.is_file() else None
        # (runs started with --torch-compile before it hashed as off saved the hash with it on)
        differs = saved not in (config_hash(r.config), config_hash(r.config, speed_levers=True))
        p.check(not differs, f"--resume: the config differs from the unfinished run in {out}; "
                f"use the same flags as before (see {plan.work / 'config.yaml'}), or --overwrite")
    p.raise_if_any(error=ConfigDiffersError if differs else UserError)
    return r, prepared, plan


# ----------------------------------------------------------------------------- the training function

@dataclasses.dataclass
class RunResult:
    """What a training run produced. `model` is the trained PEFT model in memory (the best evaluation's
    adapter restored), so that a caller such as a study trial can score it without reloading."""

    path: Path
    config: TrainConfig
    model: Any
    tokenizer: Any
    encoder: PromptEncoder
    prepared: Prepared
    steps: int
    best_step: int | None
    best_val_loss: float | None
    epochs_run: float
    train_seconds: float  # wall time of trainer.train (evaluations and checkpoints included)
    step_seconds: float  # optimizer steps alone
    optimizer_state_bytes: int
    final: dict


def train(cfg: TrainConfig | dict, *, resume: bool = False, overwrite: bool = False, base_model=None,
          prepared: Prepared | None = None, callbacks: tuple = (), model_hook=None,
          encode_cache: dict | None = None, inputs: dict | None = None) -> RunResult:
    """Train one LoRA run into `cfg.train.output_dir`.

    base_model: an already loaded base model (fp32, CPU) to copy instead of loading it from disk: a study
    runs many trials in one process with the base loaded once; a copy of the same weights and the same
    seed give the same run as a fresh process. prepared: splits already prepared (the study's).
    encode_cache: a dict kept by the caller, so that a split is tokenized once for many runs.
    inputs: other files the caller read ({"--config": path}), which the output folder may not contain.
    """
    if isinstance(cfg, dict):
        cfg = resolve(TrainConfig, [cfg], check=False)
    if base_model is not None and cfg.model.head != "generative":
        raise UserError(f"--head {cfg.model.head} loads its own sequence-classification model; a preloaded base "
                        "model (the study's) is a causal LM", "Train the head with qwen-ft train.")
    dist.select_gpu(cfg.train.gpu_id)
    r, prepared, plan = check_inputs(cfg, resume, overwrite, prepared, inputs)  # nothing loaded or written yet
    dist.init()
    # one writer per output folder (a lock beside it); --overwrite trains in a staging folder that replaces
    # the old run only once the new one is complete, so a failure at any point leaves the old run as it was
    with claim_output(plan) if dist.is_main() else contextlib.nullcontext(plan):
        result = _train(r, prepared, plan, base_model, callbacks, model_hook, encode_cache)
    dist.barrier()
    return dataclasses.replace(result, path=plan.target)


def _train(r: Resolved, prepared: Prepared, plan: OutputPlan, base_model, callbacks, model_hook,
           encode_cache) -> RunResult:
    cfg = r.config
    mode = plan.mode
    out = plan.work  # the output folder, or its staging sibling on --overwrite
    run = RunDir(out)

    precision = resolve_precision(cfg.model.precision)
    world = dist.world_size()
    global_batch = cfg.train.batch_size * world * cfg.train.grad_accum
    if dist.is_main():
        log.info("qwen-ft train: %s (%s params, preset %s), %s", cfg.model.model, f"{r.n_params / 1e6:.1f}M",
                 r.preset, prepared.summary())
        log.info("batch: %d per device x %d processes x %d grad-accum = %d global; precision %s",
                 cfg.train.batch_size, world, cfg.train.grad_accum, global_batch, precision)
        log.info("resolved config:\n%s", _indent(cfg))

    tokenizer = load_tokenizer(r.model_path, cfg.model.trust_remote_code)
    encoder = PromptEncoder(tokenizer, prepared.task, cfg.model.max_length)
    head = cfg.model.head == "classification"
    head_pad = tokenizer.pad_token_id if head else None  # `--head classification`: prompts alone, class ids
    train_ds, n_trunc_train = _encoded(encoder, prepared, "train", encode_cache, head_pad)
    val_ds, n_trunc_val = _encoded(encoder, prepared, "validation", encode_cache, head_pad)
    n_truncated = n_trunc_train + n_trunc_val
    if n_truncated and dist.is_main():
        log.warning("%d of %d prompts were longer than --max-length %d: their question text was truncated "
                    "(the instruction and the answer are kept whole)", n_truncated, len(train_ds) + len(val_ds),
                    cfg.model.max_length)

    torch.manual_seed(cfg.train.seed)
    if base_model is not None:
        model = copy.deepcopy(base_model)
    else:
        model = load_model(r.model_path, torch.float32, "cpu", cfg.model.attn_implementation,
                           cfg.model.trust_remote_code, labels=prepared.task.labels if head else None,
                           pad_token_id=head_pad)  # seeded above: the new head's random start is reproducible
    model.config.use_cache = False
    model = apply_lora(model, cfg.lora, cfg.model.gradient_checkpointing)
    if model_hook is not None:
        model = model_hook(model)

    checkpoint = None
    if dist.is_main():  # only now, with every input accepted, is the run folder touched
        if mode == "resume":
            checkpoint = run.last_checkpoint()
            for torn in remove_torn_checkpoints(run.checkpoints, checkpoint):
                log.warning("removed %s: it was cut short when the run was killed", torn)
            log.info("resuming from %s", checkpoint or "the start (no checkpoint had been saved)")
        else:
            _write_run_start(run, r, prepared, precision, world, global_batch, n_truncated)
    dist.barrier()
    if mode == "resume" and not dist.is_main():
        checkpoint = run.last_checkpoint()

    timer = StepTimer()
    trainer = _build_trainer(cfg, run, model, tokenizer, train_ds, val_ds, precision, [timer, *callbacks])
    triggers = next(c for c in trainer.callback_handler.callbacks if isinstance(c, CheckpointTriggers))
    t0 = time.time()
    # on CPU the frozen weights are held in the autocast dtype for the run (the same values, no per-step casts)
    held = inference_dtype(precision) if not dist.use_cuda() else None
    with compiled_blocks(model, cfg.train.torch_compile), frozen_in_compute_dtype(model, held):
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    train_time = time.time() - t0
    if triggers.signal is not None and trainer.state.global_step < trainer.state.max_steps:
        raise TrainingInterrupted(f"training interrupted at step {trainer.state.global_step}; a checkpoint was saved "
                                  f"in {run.checkpoints}", "Continue with the same command plus --resume.")

    per_rank = dist.gather_objects(_rank_report(trainer))
    dist.check_replicas(per_rank)
    best_step = _best_step(trainer)
    state_bytes = optimizers.state_bytes(trainer.optimizer) if trainer.optimizer is not None else 0
    trainer.save_model(str(out))  # on every rank: FSDP / ZeRO-3 gather the sharded adapter here
    final = {}
    if dist.is_main():
        (out / "training_args.bin").unlink(missing_ok=True)
        tokenizer.save_pretrained(out)
        if world > 1:
            log.info("%d processes (%s): model wrapped in %s, %s optimizer steps per rank, adapters %s across "
                     "ranks", world, dist.backend(), per_rank[0]["model_wrapper"],
                     "/".join(str(p["steps"]) for p in per_rank),
                     "identical" if per_rank[0]["adapter_sha256"] else "sharded (not compared)")
        epochs_run = trainer.state.epoch or 0
        tokens = sum(train_ds["length"]) * epochs_run
        final = {
            "type": "final", "step": trainer.state.global_step, "epochs_run": round(epochs_run, 4),
            "best_val_loss": trainer.state.best_metric, "best_step": best_step,
            "train_time_s": round(train_time, 2), "step_time_s": round(timer.seconds, 3),
            "train_samples_per_s": round(len(train_ds) * epochs_run / train_time, 3),
            "train_tokens_per_s": round(tokens / train_time, 1), "train_loss": _mean_step_loss(out / "metrics.jsonl"),
            "optimizer_state_bytes": state_bytes,
            "world_size": world, "global_batch": global_batch, **dist.max_memory(per_rank), "per_rank": per_rank,
        }
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(final) + "\n")
        run.mark_complete({"finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "config_hash": config_hash(cfg),
                           **{k: final[k] for k in ("epochs_run", "best_val_loss", "best_step", "train_time_s")}})
        shutil.rmtree(run.checkpoints, ignore_errors=True)  # after the marker: a kill here loses nothing
        log.info("done in %.0fs: best val_loss %.4f (step %s) after %.1f epochs; run folder %s", train_time,
                 trainer.state.best_metric or float("nan"), best_step, epochs_run, plan.target)
    dist.barrier()
    model = trainer.accelerator.unwrap_model(trainer.model)
    model.eval()
    return RunResult(path=out, config=cfg, model=model, tokenizer=tokenizer, encoder=encoder, prepared=prepared,
                     steps=trainer.state.global_step, best_step=best_step, best_val_loss=trainer.state.best_metric,
                     epochs_run=trainer.state.epoch or 0, train_seconds=train_time, step_seconds=timer.seconds,
                     optimizer_state_bytes=state_bytes, final=final)


def _best_step(trainer) -> int | None:
    """The optimizer step whose checkpoint was restored at the end (best validation loss)."""
    step = getattr(trainer.state, "best_global_step", None)
    if step:
        return int(step)
    ckpt = trainer.state.best_model_checkpoint
    return int(ckpt.rsplit("-", 1)[-1]) if ckpt and ckpt.rsplit("-", 1)[-1].isdigit() else None


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


def _mean_step_loss(metrics: Path) -> float | None:
    """Mean logged training loss over the whole run, from metrics.jsonl, so a resumed run reports the same value
    as an uninterrupted one (the Trainer's own figure covers only the steps since the resume)."""
    losses = [r["loss"] for r in read_jsonl_tolerant(metrics) if r.get("type") == "step"]
    return sum(losses) / len(losses) if losses else None


def _rank_report(trainer) -> dict:
    """What this rank did: its optimizer steps, how the model was wrapped, its adapter's digest, peak memory."""
    from peft import get_peft_model_state_dict

    sharded = trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled  # local tensors are shards: no digest
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    return {"rank": dist.rank(), "steps": trainer.state.global_step,
            "model_wrapper": type(trainer.model_wrapped).__name__,
            "adapter_sha256": None if sharded else dist.tensors_digest(get_peft_model_state_dict(unwrapped)),
            "gradient_checkpointing": bool(getattr(unwrapped, "is_activation_checkpointing", False)),
            **dist.peak_memory()}


def _indent(cfg: TrainConfig) -> str:
    import yaml

    return "\n".join("  " + line for line in yaml.safe_dump(cfg.to_dict(), sort_keys=False).splitlines())


def _write_run_start(run: RunDir, r: Resolved, prepared: Prepared, precision: str, world: int, global_batch: int,
                     n_truncated: int = 0):
    """The run's inputs, staged beside the folder and moved into place whole (replacing it on --overwrite)."""
    with staged_dir(run.path) as out:
        save_yaml(r.config, out / "config.yaml")
        (out / "config.hash").write_text(config_hash(r.config) + "\n")
        write_json(out / "label_mapping.json", prepared.task.to_mapping())
        for name, rows in prepared.splits.items():
            write_jsonl(out / "split" / f"{name}.jsonl", rows)
        write_json(out / "run.json", {
            "base_model": r.config.model.model, "base_model_path": r.model_path, "n_params": r.n_params,
            "preset": r.preset, "base_shape": r.base_shape, "precision": precision, "world_size": world,
            "per_device_batch": r.config.train.batch_size, "global_batch": global_batch,
            "truncated_prompts": n_truncated, "command": " ".join(sys.argv),
            **({"split_groups": prepared.groups} if prepared.groups else {}),
            **({"near_duplicates": prepared.screen} if prepared.screen else {}),
            "labels_sha256": labels_digest(prepared.task.labels), **env_info(),
        })
        (out / "metrics.jsonl").write_text("")


def _build_trainer(cfg: TrainConfig, run: RunDir, model, tokenizer, train_ds, val_ds, precision: str,
                   extra_callbacks: list):
    from transformers import EarlyStoppingCallback, TrainingArguments

    cpu = not dist.use_cuda()
    t, o = cfg.train, cfg.optim
    every = {"eval_strategy": "steps", "eval_steps": t.eval_steps, "save_strategy": "steps",
             "save_steps": t.eval_steps} if t.eval_steps else {"eval_strategy": "epoch", "save_strategy": "epoch"}
    report_to = _tracking(t.report_to, run)
    args = TrainingArguments(
        output_dir=str(run.checkpoints),
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.eval_batch_size or 2 * t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1,
        learning_rate=o.learning_rate,
        weight_decay=o.weight_decay,
        warmup_steps=o.warmup_ratio,
        max_grad_norm=o.max_grad_norm,
        lr_scheduler_type=o.lr_scheduler,
        logging_strategy="steps",
        logging_steps=t.logging_steps,
        logging_nan_inf_filter=False,  # log a NaN loss as NaN (DivergenceGuard stops on it)
        restore_callback_states_from_checkpoint=True,  # early-stopping patience survives a resume
        **every,
        save_total_limit=2,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        seed=t.seed,
        data_seed=t.seed,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=cpu,
        ddp_backend="gloo" if cpu and dist.world_size() > 1 else None,
        ddp_find_unused_parameters=False,
        train_sampling_strategy="group_by_length",
        length_column_name="length",
        remove_unused_columns=False,
        prediction_loss_only=True,
        report_to=report_to,
        disable_tqdm=not (dist.is_main() and sys.stderr.isatty()),
        torch_compile=False,  # --torch-compile compiles the layers' MLP and norms instead (models.compiled_blocks)
        save_only_model=False,
        dataloader_num_workers=0,
    )
    dist.require_trainer_world(args.world_size)
    callbacks = [EpochMetrics(run / "metrics.jsonl"), DivergenceGuard(), CheckpointTriggers(t.save_steps),
                 optimizers.OptimizerModeCallback(), *extra_callbacks]
    if t.early_stopping_patience > 0:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=t.early_stopping_patience))
    head = cfg.model.head == "classification"
    trainer = SeededTrainer(
        model=model, args=args, train_dataset=train_ds, eval_dataset=val_ds,
        data_collator=_collator(model, tokenizer, head, cpu),
        compute_loss_func=class_loss if head else answer_loss, callbacks=callbacks, optim_args=o,
    )
    strip_default_printing(trainer)
    return trainer


def _collator(model, tokenizer, head: bool, cpu: bool):
    """Packed batches where every attention call honours them (LM-head training on the CPU with qwen-ft's
    attention: no padding through the linear layers), else batches padded on the left (to a multiple of 8 on
    GPUs)."""
    multiple = None if cpu else 8
    if head:
        return HeadCollator(tokenizer.pad_token_id, multiple)
    if cpu and attention.packs(model):
        return PackedCollator(tokenizer.pad_token_id)
    return LeftPadCollator(tokenizer.pad_token_id, multiple)


def _tracking(report_to: str, run: RunDir) -> str:
    """`report_to` for the Trainer. Local by default: TensorBoard event files (RUN/tensorboard) and MLflow's
    file store (RUN/mlruns) live inside the run folder unless MLFLOW_TRACKING_URI points elsewhere; nothing
    goes online unless the user chose an online tracker."""
    if report_to == "tensorboard":  # transformers 5 reads the folder from this variable, per Trainer
        os.environ["TENSORBOARD_LOGGING_DIR"] = str((run.path / "tensorboard").resolve())
    if report_to == "mlflow":
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # MLflow 3 reports usage online otherwise
        if not _USER_MLFLOW_URI:
            os.environ["MLFLOW_TRACKING_URI"] = (run.path / "mlruns").resolve().as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow >= 3.7 refuses it otherwise
    return report_to


_USER_MLFLOW_URI = os.environ.get("MLFLOW_TRACKING_URI")
