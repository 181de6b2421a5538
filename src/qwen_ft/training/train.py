"""`train(config) -> RunResult`, the one training function that `qwen-ft train`, the seed script,
torchrun/accelerate launches and every study trial call.

config -> setup data (tokenizer, tokenized splits) -> setup model (base + LoRA) -> run-folder start or resume
-> setup trainer (1..N processes) -> train -> finish (adapter, metrics, COMPLETE; see runs.py for the layout).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from qwen_ft import distributed as dist
from qwen_ft import optimizers
from qwen_ft.checkpoints import remove_torn_checkpoints
from qwen_ft.config import TrainConfig, config_hash, resolve
from qwen_ft.data.prepare import Prepared
from qwen_ft.encoding import PromptEncoder
from qwen_ft.errors import TrainingInterrupted, UserError
from qwen_ft.models import apply_lora, compiled_blocks, frozen_in_compute_dtype, load_model, load_tokenizer
from qwen_ft.outputs import OutputPlan, claim_output, staged_dir
from qwen_ft.precision import inference_dtype, resolve_precision
from qwen_ft.provenance import env_info
from qwen_ft.run_checks import labels_digest
from qwen_ft.runs import RunDir
from qwen_ft.training import batches
from qwen_ft.training.callbacks import (
    CheckpointTriggers,
    DivergenceGuard,
    EpochMetrics,
    StepTimer,
    strip_default_printing,
)
from qwen_ft.training.inputs import Resolved, base_model_files, check_inputs, encoded_splits
from qwen_ft.training.trainer import (
    SeededTrainer,
    tracker_environment,
    training_arguments,
    use_tensorboard_folder,
)

log = logging.getLogger(__name__)


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


@dataclasses.dataclass
class _Data:
    """What setup data produced: the tokenizer, the prompt encoder and the tokenized splits."""

    tokenizer: Any
    encoder: PromptEncoder
    train_ds: Any
    val_ds: Any
    n_truncated: int  # prompts (train + validation) whose question text was cut to --max-length


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
    """The recipe, step by step; the run folder is `plan.work` (the output folder, or its staging sibling on
    --overwrite)."""
    cfg = r.config
    run = RunDir(plan.work)
    precision = resolve_precision(cfg.model.precision)
    _log_start(r, prepared, precision)
    data = _setup_data(r, prepared, encode_cache)
    model = _setup_model(r, prepared, data.tokenizer, base_model, model_hook)
    checkpoint = _start_or_resume(run, plan.mode, r, prepared, precision, data.n_truncated)
    timer = StepTimer()
    with tracker_environment(cfg.train.report_to, run):
        trainer = _setup_trainer(cfg, run, model, data.tokenizer, data.train_ds, data.val_ds, precision,
                                 [timer, *callbacks])
        train_time = _fit(trainer, model, cfg, precision, checkpoint, run)
    return _finish(trainer, r, run, plan, data, prepared, timer, train_time)


def _global_batch(cfg: TrainConfig) -> int:
    return cfg.train.batch_size * dist.world_size() * cfg.train.grad_accum


def _log_start(r: Resolved, prepared: Prepared, precision: str) -> None:
    cfg = r.config
    if dist.is_main():
        log.info("qwen-ft train: %s (%s params, preset %s), %s", cfg.model.model, f"{r.n_params / 1e6:.1f}M",
                 r.preset, prepared.summary())
        log.info("batch: %d per device x %d processes x %d grad-accum = %d global; precision %s",
                 cfg.train.batch_size, dist.world_size(), cfg.train.grad_accum, _global_batch(cfg), precision)
        log.info("resolved config:\n%s", _indent(cfg))


def _setup_data(r: Resolved, prepared: Prepared, encode_cache: dict | None) -> _Data:
    """The tokenizer and the tokenized train and validation splits (`--head classification`: the prompts
    alone, with class ids)."""
    cfg = r.config
    tokenizer = load_tokenizer(r.model_path, cfg.model.trust_remote_code)
    encoder = PromptEncoder(tokenizer, prepared.task, cfg.model.max_length)
    head_pad = tokenizer.pad_token_id if cfg.model.head == "classification" else None
    train_ds, val_ds, n_truncated = encoded_splits(encoder, prepared, encode_cache, head_pad)
    return _Data(tokenizer, encoder, train_ds, val_ds, n_truncated)


def _setup_model(r: Resolved, prepared: Prepared, tokenizer, base_model, model_hook):
    """The base model (a copy of `base_model`, else loaded from disk) with LoRA adapters, then `model_hook`."""
    cfg = r.config
    head = cfg.model.head == "classification"
    torch.manual_seed(cfg.train.seed)
    if base_model is not None:
        model = copy.deepcopy(base_model)
    else:  # seeded above: a classification head's random start is reproducible
        model = load_model(r.model_path, torch.float32, "cpu", cfg.model.attn_implementation,
                           cfg.model.trust_remote_code, labels=prepared.task.labels if head else None,
                           pad_token_id=tokenizer.pad_token_id if head else None)
    model.config.use_cache = False
    model = apply_lora(model, cfg.lora, cfg.model.gradient_checkpointing)
    if model_hook is not None:
        model = model_hook(model)
    return model


def _start_or_resume(run: RunDir, mode: str, r: Resolved, prepared: Prepared, precision: str,
                     n_truncated: int) -> Path | None:
    """The checkpoint to resume from (None: the start); a new run's inputs are written first. Only now,
    with every input accepted, is the run folder touched."""
    checkpoint = None
    if dist.is_main():
        if mode == "resume":
            checkpoint = run.last_checkpoint()
            for torn in remove_torn_checkpoints(run.checkpoints, checkpoint):
                log.warning("removed %s: it was cut short when the run was killed", torn)
            log.info("resuming from %s", checkpoint or "the start (no checkpoint had been saved)")
        else:
            _write_run_start(run, r, prepared, precision, dist.world_size(), _global_batch(r.config), n_truncated)
    dist.barrier()
    if mode == "resume" and not dist.is_main():
        checkpoint = run.last_checkpoint()
    return checkpoint


def _setup_trainer(cfg: TrainConfig, run: RunDir, model, tokenizer, train_ds, val_ds, precision: str,
                   extra_callbacks: list) -> SeededTrainer:
    """The Trainer over the run: its arguments (trainer.training_arguments), qwen-ft's callbacks, the collator
    and the loss (looked up in `batches` when the Trainer is built, so that a test can wrap it)."""
    from transformers import EarlyStoppingCallback

    t = cfg.train
    args = training_arguments(cfg, run, precision)
    dist.require_trainer_world(args.world_size)
    callbacks = [EpochMetrics(run), DivergenceGuard(), CheckpointTriggers(t.save_steps),
                 optimizers.OptimizerModeCallback(), *extra_callbacks]
    if t.early_stopping_patience > 0:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=t.early_stopping_patience))
    head = cfg.model.head == "classification"
    trainer = SeededTrainer(
        model=model, args=args, train_dataset=train_ds, eval_dataset=val_ds,
        data_collator=batches.collator(model, tokenizer, head, not dist.use_cuda()),
        compute_loss_func=batches.class_loss if head else batches.answer_loss, callbacks=callbacks,
        optim_args=cfg.optim,
    )
    strip_default_printing(trainer)
    if t.report_to == "tensorboard":
        use_tensorboard_folder(trainer, run.path / "tensorboard")
    return trainer


def _fit(trainer: SeededTrainer, model, cfg: TrainConfig, precision: str, checkpoint: Path | None,
         run: RunDir) -> float:
    """trainer.train from `checkpoint` (None: the start); its wall time. Stopped by a signal: a checkpoint
    was saved and TrainingInterrupted says how to continue."""
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
    return train_time


def _finish(trainer: SeededTrainer, r: Resolved, run: RunDir, plan: OutputPlan, data: _Data, prepared: Prepared,
            timer: StepTimer, train_time: float) -> RunResult:
    """The adapter and tokenizer saved, the final metrics line and COMPLETE written, the checkpoints removed;
    the trained model back in memory."""
    per_rank = dist.gather_objects(_rank_report(trainer))
    dist.check_replicas(per_rank)
    best_step = _best_step(trainer)
    state_bytes = optimizers.state_bytes(trainer.optimizer) if trainer.optimizer is not None else 0
    trainer.save_model(str(run.path))  # on every rank: FSDP / ZeRO-3 gather the sharded adapter here
    final = {}
    if dist.is_main():
        (run / "training_args.bin").unlink(missing_ok=True)
        data.tokenizer.save_pretrained(run.path)
        run.write_model_card()  # replaces peft's empty template card
        final = _final_record(trainer, r.config, per_rank, best_step, state_bytes, data.train_ds, timer, train_time,
                              run)
        run.mark_complete({"finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "config_hash": config_hash(r.config),
                           **{k: final[k] for k in ("epochs_run", "best_val_loss", "best_step", "train_time_s")}})
        shutil.rmtree(run.checkpoints, ignore_errors=True)  # after the marker: a kill here loses nothing
        log.info("done in %.0fs: best val_loss %.4f (step %s) after %.1f epochs; run folder %s", train_time,
                 trainer.state.best_metric or float("nan"), best_step, trainer.state.epoch or 0, plan.target)
    dist.barrier()
    model = trainer.accelerator.unwrap_model(trainer.model)
    model.eval()
    return RunResult(path=run.path, config=r.config, model=model, tokenizer=data.tokenizer, encoder=data.encoder,
                     prepared=prepared, steps=trainer.state.global_step, best_step=best_step,
                     best_val_loss=trainer.state.best_metric, epochs_run=trainer.state.epoch or 0,
                     train_seconds=train_time, step_seconds=timer.seconds, optimizer_state_bytes=state_bytes,
                     final=final)


def _final_record(trainer, cfg: TrainConfig, per_rank: list[dict], best_step: int | None, state_bytes: int,
                  train_ds, timer: StepTimer, train_time: float, run: RunDir) -> dict:
    """metrics.jsonl's `final` line (main rank), appended; with several processes, a line on how they ran."""
    world = dist.world_size()
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
        "train_tokens_per_s": round(tokens / train_time, 1), "train_loss": _mean_step_loss(run),
        "optimizer_state_bytes": state_bytes,
        "world_size": world, "global_batch": _global_batch(cfg), **dist.max_memory(per_rank), "per_rank": per_rank,
    }
    run.append_metrics(final)
    return final


def _best_step(trainer) -> int | None:
    """The optimizer step whose checkpoint was restored at the end (best validation loss)."""
    step = getattr(trainer.state, "best_global_step", None)
    if step:
        return int(step)
    ckpt = trainer.state.best_model_checkpoint
    return int(ckpt.rsplit("-", 1)[-1]) if ckpt and ckpt.rsplit("-", 1)[-1].isdigit() else None


def _mean_step_loss(run: RunDir) -> float | None:
    """Mean logged training loss over the whole run, from metrics.jsonl, so a resumed run reports the same value
    as an uninterrupted one (the Trainer's own figure covers only the steps since the resume)."""
    losses = [r["loss"] for r in run.metrics() if r.get("type") == "step"]
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
        staged = RunDir(out)
        staged.write_config(r.config)
        staged.write_label_mapping(prepared.task.to_mapping())
        for name, rows in prepared.splits.items():
            staged.write_split(name, rows)
        staged.write_info({
            "base_model": r.config.model.model, "base_model_path": r.model_path, "n_params": r.n_params,
            "preset": r.preset, "base_shape": r.base_shape, "precision": precision, "world_size": world,
            "per_device_batch": r.config.train.batch_size, "global_batch": global_batch,
            "truncated_prompts": n_truncated, "command": " ".join(sys.argv),
            **({"split_groups": prepared.groups} if prepared.groups else {}),
            **({"near_duplicates": prepared.screen} if prepared.screen else {}),
            "labels_sha256": labels_digest(prepared.task.labels), "input_files": r.input_files,
            "base_model_files": base_model_files(r), **env_info(),
        })
        staged.write_metrics([])
