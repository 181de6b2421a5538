"""Trainer callbacks: metrics.jsonl and the per-evaluation line, divergence guard, checkpoint triggers
(--save-steps, SIGTERM/SIGINT), pure step timing, and quiet progress printing."""

from __future__ import annotations

import logging
import math
import signal
import time
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from qwen_ft import distributed as dist
from qwen_ft.checkpoints import last_good_checkpoint
from qwen_ft.errors import TrainingDiverged
from qwen_ft.runs import RunDir

log = logging.getLogger(__name__)


class QuietProgress(ProgressCallback):
    """The step progress bar without a dict printed on every log."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        pass


class EpochMetrics(TrainerCallback):
    """metrics.jsonl (a line per step and per epoch), one readable line per epoch, overfit warning."""

    def __init__(self, run: RunDir):
        self.run = run
        self.epoch_steps: list[dict] = []
        self.history: list[dict] = []
        self.t0 = time.time()

    def on_train_begin(self, args, state, control, **kwargs):
        # On resume, keep what was logged up to the checkpoint and rebuild the current epoch's steps.
        kept = []
        if state.global_step > 0:  # a line torn by SIGKILL, and lines logged after the checkpoint, go
            kept = [r for r in self.run.metrics()
                    if r.get("step", 0) <= state.global_step and r.get("type") in ("step", "epoch", "eval", "curve")]
        self.history = [r for r in kept if r["type"] in ("epoch", "eval")]
        done = self.history[-1]["step"] if self.history else 0
        self.epoch_steps = [r for r in kept if r["type"] == "step" and r["step"] > done]
        if dist.is_main():
            self.run.write_metrics(kept)
        self.t0 = time.time()

    def _write(self, record: dict) -> None:
        if dist.is_main():
            self.run.append_metrics(record)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs:
            return
        record = {"type": "step", "step": state.global_step, "epoch": round(state.epoch or 0, 4),
                  "loss": logs["loss"], "grad_norm": logs.get("grad_norm"), "lr": logs.get("learning_rate")}
        self.epoch_steps.append(record)
        self._write(record)
        every = max(1, state.max_steps // 20)
        if args.disable_tqdm and dist.is_main() and (state.global_step % every == 0 or state.global_step == 1):
            elapsed = time.time() - self.t0
            log.info("  step %d/%d  loss %.4f  (%.1fs elapsed)", state.global_step, state.max_steps, logs["loss"],
                     elapsed)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if not metrics or "eval_loss" not in metrics or not self.epoch_steps:
            return
        steps = self.epoch_steps
        grads = [s["grad_norm"] for s in steps if s["grad_norm"] is not None]
        per_epoch = args.eval_strategy == "epoch"  # else every --eval-steps optimizer steps
        record = {
            "type": "epoch" if per_epoch else "eval", "epoch": round(state.epoch or 0) if per_epoch
            else round(state.epoch or 0, 4), "step": state.global_step,
            "train_loss": sum(s["loss"] for s in steps) / len(steps),
            "val_loss": metrics["eval_loss"],
            "grad_norm": sum(grads) / len(grads) if grads else None,
            "lr": steps[-1]["lr"],
        }
        self.history.append(record)
        self.epoch_steps = []
        self._write(record)
        if dist.is_main():
            gn = f", grad_norm={record['grad_norm']:.3f}" if record["grad_norm"] is not None else ""
            where = f"Epoch {record['epoch']}" if per_epoch else f"Step {record['step']}"
            log.info("%s: train_loss=%.4f, val_loss=%.4f%s, lr=%.2e", where, record["train_loss"],
                     record["val_loss"], gn, record["lr"] or 0.0)
            if len(self.history) >= 2:
                prev, cur = self.history[-2], self.history[-1]
                if cur["val_loss"] > prev["val_loss"] and cur["train_loss"] < prev["train_loss"]:
                    log.warning("WARNING: validation loss rose (%.4f -> %.4f) while training loss fell: overfitting. "
                                "Early stopping will restore the best evaluation; consider fewer --epochs, a higher "
                                "--lora-dropout or --weight-decay.", prev["val_loss"], cur["val_loss"])


class StepTimer(TrainerCallback):
    """Seconds spent in optimizer steps alone (forward, backward, update), without evaluation or saving:
    the clock of time-to-target comparisons and of the per-step time in the study."""

    def __init__(self):
        self.seconds = 0.0
        self._t0: float | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._t0 is not None:
            self.seconds += time.perf_counter() - self._t0
            self._t0 = None


class DivergenceGuard(TrainerCallback):
    """Stop at the first NaN/inf gradient (checked before the optimizer step, so the weights and every
    checkpoint stay finite) or NaN/inf logged loss, naming the step and keeping the last good checkpoint."""

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if args.fp16:  # the loss scaler expects inf gradients now and then: it skips that step and rescales
            return
        grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None] if model else []
        if grads and not torch.isfinite(torch.stack(torch._foreach_norm(grads)).sum()):
            self._stop(args, state, "the gradient", state.global_step + 1, before_update=True)

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in ("loss",) if args.fp16 else ("loss", "grad_norm"):
            value = (logs or {}).get(key)
            if value is not None and not math.isfinite(value):
                self._stop(args, state, f"{key} ({value})", state.global_step, before_update=False)

    @staticmethod
    def _stop(args, state, what: str, step: int, before_update: bool):
        ckpt = last_good_checkpoint(Path(args.output_dir))
        kept = f"The last good checkpoint is kept: {ckpt}" if ckpt else "No checkpoint had been saved yet."
        raise TrainingDiverged(
            f"training diverged: {what} became NaN/inf at step {step} (epoch {state.epoch or 0:.2f})"
            + ("; stopped before the optimizer applied it" if before_update else ""),
            f"{kept}\nTry a lower --learning-rate, full precision (--precision fp32 instead of bf16/fp16), "
            "or gradient clipping (--max-grad-norm 1.0).")


class CheckpointTriggers(TrainerCallback):
    """Checkpoint every --save-steps, and once more (then stop) on SIGTERM / SIGINT."""

    def __init__(self, save_steps: int | None):
        self.save_steps = save_steps
        self.signal: int | None = None
        self._previous = {}

    def on_train_begin(self, args, state, control, **kwargs):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass

    def _handle(self, signum, frame):
        if self.signal is not None:  # second signal: give up at once
            raise KeyboardInterrupt
        self.signal = signum
        log.warning("%s received: saving a checkpoint after this step, then stopping.", signal.Signals(signum).name)

    def on_step_end(self, args, state, control, **kwargs):
        if self.save_steps and state.global_step % self.save_steps == 0:
            control.should_save = True
        if dist.any_rank(self.signal is not None) and self.signal is None:  # all ranks stop at the same step
            self.signal = signal.SIGTERM
        if self.signal is not None and not self._at_epoch_end(state):
            control.should_save = True
            control.should_training_stop = True

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.signal is None:
            return
        if self._at_epoch_end(state):  # a whole epoch: evaluate and checkpoint as usual, then stop
            control.should_training_stop = True
        else:  # stopped mid-epoch: the step's checkpoint is saved; no evaluation of a partial epoch
            control.should_evaluate = False
            control.should_save = False

    @staticmethod
    def _at_epoch_end(state) -> bool:
        return state.epoch is not None and abs(state.epoch - round(state.epoch)) < 1e-6

    def on_train_end(self, args, state, control, **kwargs):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def strip_default_printing(trainer) -> None:
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    if dist.is_main() and not trainer.args.disable_tqdm:
        trainer.add_callback(QuietProgress)
