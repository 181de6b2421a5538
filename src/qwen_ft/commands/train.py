"""`qwen-ft train`: config -> data -> model + LoRA -> Trainer (1..N processes) -> run folder."""

from __future__ import annotations

import dataclasses
import logging
import re
import shutil
import sys
import time
from pathlib import Path

import torch

from qwen_ft import distributed as dist
from qwen_ft import optimizers
from qwen_ft.config import TrainConfig, config_hash, preset_for, resolve, save_yaml
from qwen_ft.data.prepare import Prepared, prepare
from qwen_ft.data.sources import is_hub
from qwen_ft.encoding import PromptEncoder
from qwen_ft.errors import Problems, UserError
from qwen_ft.models import (
    apply_lora,
    base_shape,
    count_parameters,
    load_config,
    load_model,
    load_tokenizer,
    resolve_model,
)
from qwen_ft.precision import resolve_precision
from qwen_ft.runs import (
    RunDir,
    env_info,
    prepare_output_dir,
    read_jsonl_tolerant,
    remove_torn_checkpoints,
    staged_dir,
    write_json,
    write_jsonl,
)
from qwen_ft.training import (
    CheckpointTriggers,
    DivergenceGuard,
    EpochMetrics,
    LeftPadCollator,
    SeededTrainer,
    answer_loss,
    strip_default_printing,
)

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Resolved:
    config: TrainConfig
    model_path: str
    n_params: int
    preset: str
    base_shape: dict


def resolve_config(user: dict) -> Resolved:
    """defaults < size preset < user layers (YAML, env, CLI, already merged into `user`).

    Every problem with the values, the model and the optimizer is reported at once, before anything heavy.
    """
    p = Problems()
    cfg = resolve(TrainConfig, [user], check=False)  # unknown keys / wrong types: one report, at once
    p.attempt(cfg.validate)
    model_path = p.attempt(resolve_model, cfg.model.model)
    mconf = p.attempt(load_config, model_path, cfg.model.trust_remote_code) if model_path else None
    n_params = p.attempt(_count_parameters, mconf, model_path) if mconf is not None else None
    o = cfg.optim
    if n_params is None:  # no preset without a model: check the optimizer with a stand-in learning rate
        p.attempt(optimizers.resolve, o.optimizer, o.learning_rate or 1e-4, o.weight_decay, o.kwargs)
        p.raise_if_any()
    preset = preset_for(n_params)
    cfg = resolve(TrainConfig, [preset.values, user], check=False)
    if "optim.learning_rate" not in user:  # Adam-family: the preset's lr; others: their own default
        lr = p.attempt(optimizers.default_lr, cfg.optim.optimizer, preset.values["optim.learning_rate"])
        cfg.optim.learning_rate = lr or cfg.optim.learning_rate
    p.attempt(optimizers.resolve, cfg.optim.optimizer, cfg.optim.learning_rate, cfg.optim.weight_decay,
              cfg.optim.kwargs)
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


def check_inputs(user: dict, resume: bool, overwrite: bool) -> tuple[Resolved, Prepared, str]:
    """Flags, model, data and output folder checked together: every problem in one report, nothing written."""
    base = resolve(TrainConfig, [user], check=False)
    p = Problems()
    r = p.attempt(resolve_config, user)
    prepared = None
    if not p or not (is_hub(base.data.data) or is_hub(base.data.validation_data)):
        # local data is cheap to check alongside; a hub download waits until everything else is right
        cfg = r.config if r else base
        prepared = p.attempt(prepare, cfg.data, cfg.train.seed)
    out = Path(r.config.train.output_dir if r else base.train.output_dir or default_output_dir(base))
    mode = p.attempt(prepare_output_dir, out, resume, overwrite)
    if mode == "resume" and r is not None:
        saved = (out / "config.hash").read_text().strip() if (out / "config.hash").is_file() else None
        p.check(saved == config_hash(r.config), f"--resume: the config differs from the unfinished run in {out}; "
                f"use the same flags as before (see {out / 'config.yaml'}), or --overwrite")
    p.raise_if_any()
    return r, prepared, mode


def run_train(user: dict, resume: bool = False, overwrite: bool = False, model_hook=None) -> Path:
    dist.select_gpu(user.get("train.gpu_id"))
    r, prepared, mode = check_inputs(user, resume, overwrite)  # before any model loads or folder is written
    cfg = r.config
    out = Path(cfg.train.output_dir)
    run = RunDir(out)

    dist.init()
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
    train_ds = _encode(encoder, prepared.splits["train"])
    val_ds = _encode(encoder, prepared.splits["validation"])
    n_truncated = encoder.n_truncated
    if n_truncated and dist.is_main():
        log.warning("%d of %d prompts were longer than --max-length %d: their question text was truncated "
                    "(the instruction and the answer are kept whole)", n_truncated, len(train_ds) + len(val_ds),
                    cfg.model.max_length)

    torch.manual_seed(cfg.train.seed)
    model = load_model(r.model_path, torch.float32, "cpu", cfg.model.attn_implementation, cfg.model.trust_remote_code)
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

    trainer = _build_trainer(cfg, run, model, tokenizer, train_ds, val_ds, precision)
    triggers = next(c for c in trainer.callback_handler.callbacks if isinstance(c, CheckpointTriggers))
    t0 = time.time()
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    train_time = time.time() - t0
    if triggers.signal is not None and trainer.state.global_step < trainer.state.max_steps:
        raise UserError(f"training interrupted at step {trainer.state.global_step}; a checkpoint was saved in "
                        f"{run.checkpoints}", "Continue with the same command plus --resume.")

    per_rank = dist.gather_objects(_rank_report(trainer))
    dist.check_replicas(per_rank)
    trainer.save_model(str(out))  # on every rank: FSDP / ZeRO-3 gather the sharded adapter here
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
            "best_val_loss": trainer.state.best_metric, "train_time_s": round(train_time, 2),
            "train_samples_per_s": round(len(train_ds) * epochs_run / train_time, 3),
            "train_tokens_per_s": round(tokens / train_time, 1), "train_loss": _mean_step_loss(out / "metrics.jsonl"),
            "world_size": world, "global_batch": global_batch, **dist.max_memory(per_rank), "per_rank": per_rank,
        }
        with open(out / "metrics.jsonl", "a") as f:
            import json

            f.write(json.dumps(final) + "\n")
        run.mark_complete({"finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "config_hash": config_hash(cfg),
                           **{k: final[k] for k in ("epochs_run", "best_val_loss", "train_time_s")}})
        shutil.rmtree(run.checkpoints, ignore_errors=True)  # after the marker: a kill here loses nothing
        log.info("done in %.0fs: best val_loss %.4f after %.1f epochs; run folder %s", train_time,
                 trainer.state.best_metric or float("nan"), epochs_run, out)
    dist.barrier()
    return out


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
            "truncated_prompts": n_truncated, "command": " ".join(sys.argv), **env_info(),
        })
        (out / "metrics.jsonl").write_text("")


def _encode(encoder: PromptEncoder, rows: list[dict]):
    from datasets import Dataset

    return Dataset.from_list([encoder.train_example(row) for row in rows])


def _build_trainer(cfg: TrainConfig, run: RunDir, model, tokenizer, train_ds, val_ds, precision: str):
    from transformers import EarlyStoppingCallback, TrainingArguments

    cpu = not dist.use_cuda()
    t, o = cfg.train, cfg.optim
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
        eval_strategy="epoch",
        save_strategy="epoch",
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
        report_to="none",
        disable_tqdm=not (dist.is_main() and sys.stderr.isatty()),
        torch_compile=t.torch_compile,
        save_only_model=False,
        dataloader_num_workers=0,
    )
    dist.require_trainer_world(args.world_size)
    callbacks = [EpochMetrics(run / "metrics.jsonl"), DivergenceGuard(),
                 CheckpointTriggers(t.save_steps)]
    if t.early_stopping_patience > 0:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=t.early_stopping_patience))
    trainer = SeededTrainer(
        model=model, args=args, train_dataset=train_ds, eval_dataset=val_ds,
        data_collator=LeftPadCollator(tokenizer.pad_token_id, 8 if not cpu else None),
        compute_loss_func=answer_loss, callbacks=callbacks,
        optimizer_cls_and_kwargs=optimizers.resolve(o.optimizer, o.learning_rate, o.weight_decay, o.kwargs),
    )
    strip_default_printing(trainer)
    return trainer


def add_parser(sub, name: str) -> None:
    from qwen_ft.cli import add_config_flags, user_layers

    p = sub.add_parser(name, help="LoRA-train a model to generate labels; writes a run folder.")
    p.add_argument("--config", help="YAML file with sections model/data/lora/optim/train.")
    p.add_argument("--resume", action="store_true", help="Continue the unfinished run in --output-dir.")
    p.add_argument("--overwrite", action="store_true", help="Replace a finished run in --output-dir.")
    add_config_flags(p)
    p.set_defaults(func=lambda a: run_train(user_layers(a), resume=a.resume, overwrite=a.overwrite))
