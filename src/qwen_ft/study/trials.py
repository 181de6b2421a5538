"""Running one trial or final: train a fresh LoRA on a copy of the base model, in this process, then score it.

A trial trains for the trial budget and is scored on the tuning split (trial.json); a final re-runs the best
trial's point with one of the final seeds for the full budget, records a learning curve, and is scored on the
validation split (result.json, eval/). A run whose record matches is not repeated; an interrupted one resumes
from its checkpoint. The untrained baselines are scored here too, on the finals' rows.
"""

from __future__ import annotations

import copy
import gc
import json
import logging
import math
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING

from qwen_ft import distributed as dist
from qwen_ft.errors import ConfigDiffersError, TrainingDiverged, TrainingInterrupted, UserError
from qwen_ft.outputs import write_json, write_jsonl
from qwen_ft.study.config import OptimizerEntry
from qwen_ft.study.load import metrics_records

if TYPE_CHECKING:
    from qwen_ft.study.phases import Study

log = logging.getLogger(__name__)


def run_config(study: Study, entry: OptimizerEntry, params: dict, seed: int, max_steps: int | None, out: Path):
    """The TrainConfig of one run: the study's shared sections + the entry's fixed settings + `params`."""
    cfg = copy.deepcopy(study.cfg.base)
    d = cfg.data  # the study's cached splits, so that `qwen-ft train --config RUN/config.yaml` repeats the run
    d.data, d.validation_data = str(study.folder.split_path("train")), str(study.folder.split_path("tune"))
    d.task, d.hub_split, d.text_column, d.label_column = study.summary()["task"], None, None, None
    d.max_samples = d.max_samples_per_category = d.max_validation_samples = d.max_train_samples_per_category = None
    d.test_fraction = 0.0
    d.split_by = d.augment = None  # applied once, in the data phase, to the cached splits
    cfg.optim = entry.optim(cfg.optim, params)
    cfg.train.seed = seed
    cfg.train.output_dir = str(out)
    cfg.train.eval_steps = study.cfg.protocol.eval_steps
    cfg.model.trust_remote_code = study.trust_remote_code
    if max_steps is not None:
        cfg.train.max_steps = max_steps
    return cfg


def train_and_score(study: Study, opt: str, params: dict, seed: int, max_steps: int | None, out: Path,
                    rows: list[dict], curve: bool) -> dict:
    """Train one run in this process (resuming its folder when it was interrupted), then score `rows`."""
    from qwen_ft.runs import RunDir
    from qwen_ft.training import train

    entry = study.cfg.optimizers[opt]
    cfg = run_config(study, entry, params, seed, max_steps, out)
    resume = (out / "run.json").is_file() and not RunDir(out).complete and any(out.glob("checkpoints/checkpoint-*"))
    callbacks = (curve_callback(study, curve_rows(study)),) if curve else ()
    t0 = time.time()
    try:
        result = train(cfg, resume=resume, overwrite=not resume, base_model=study.base_model(),
                       prepared=study.prepared(), callbacks=callbacks, encode_cache=study.encode_cache())
    except TrainingInterrupted as e:
        raise UserError(e.message.splitlines()[0], "Run the same `qwen-ft study` command again: finished runs are "
                        "skipped and this one resumes from its checkpoint.") from None
    except ConfigDiffersError:
        if not resume:
            raise
        # an older config's run: start it over
        result = train(cfg, overwrite=True, base_model=study.base_model(), prepared=study.prepared(),
                       callbacks=callbacks, encode_cache=study.encode_cache())
    trained = time.time() - t0
    report, predictions = score_model(study, result.model, rows)
    info = {
        "params": params, "seed": seed, "steps": result.steps, "best_step": result.best_step,
        "tune_loss": result.best_val_loss, "train_seconds": round(result.train_seconds, 2),
        "step_time_s": round(result.step_seconds / max(1, result.steps), 4),
        "optimizer_state_bytes": result.optimizer_state_bytes, "accuracy": report["accuracy"], "n": report["n"],
        "eval_seconds": report["seconds"], "samples_per_s": report["samples_per_s"],
        # trainer.train minus its optimizer steps: tuning-loss evaluations, checkpoints, learning-curve points
        "in_loop_eval_s": round(result.train_seconds - result.step_seconds, 2),
        # everything outside trainer.train and scoring: base copy, LoRA, trainer set-up, saving the adapter
        "overhead_s": round(time.time() - t0 - result.train_seconds - report["seconds"], 2),
        "trained_s": round(trained, 2),
    }
    if entry.optimizer == "adabound":
        info["adabound_bounds"] = _adabound_bounds(result.config.optim, result.steps)
    del result
    gc.collect()
    return {"info": info, "report": report, "predictions": predictions}


def score_model(study: Study, model, rows: list[dict]) -> tuple[dict, list[dict]]:
    """Merge the trained adapter into the in-memory copy and score `rows` with the engine."""
    import torch

    from qwen_ft.inference.engine import Classifier
    from qwen_ft.precision import inference_dtype, resolve_precision

    e = study.cfg.eval
    precision = resolve_precision(e.precision)
    merged = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
    merged = merged.to(inference_dtype(precision)).eval().requires_grad_(True)  # see models.load_adapter
    with torch.inference_mode():
        report, predictions = Classifier(merged, study.encoder(), precision).evaluate(
            rows, decode=e.decode, normalize=e.normalize, batch_size=e.batch_size)
    del merged
    return report, predictions


def score_baseline(study: Study, name: str, description: str, folder: Path) -> dict:
    """The untrained model on the finals' rows: with the study's prompt and scoring (`untrained`), or with the
    task's plain prompt, each answer scored by its log-likelihood per token or per character."""
    import torch

    from qwen_ft.encoding import PromptEncoder
    from qwen_ft.inference.engine import Classifier
    from qwen_ft.precision import inference_dtype, resolve_precision

    e = study.cfg.eval
    rows = study.rows(e.split)
    rows = rows[: e.max_samples] if e.max_samples else rows
    precision = resolve_precision(e.precision)
    model = copy.deepcopy(study.base_model()).to(inference_dtype(precision)).eval()
    if name == "untrained":
        encoder, decode, normalize = study.encoder(), e.decode, e.normalize
    else:
        encoder = PromptEncoder(study.encoder().tok, study.task().plain_prompt(), study.cfg.base.model.max_length)
        decode, normalize = "exact", name.rsplit("_", 1)[-1]
    with torch.inference_mode():
        report, predictions = Classifier(model, encoder, precision).evaluate(rows, decode=decode, normalize=normalize,
                                                                             batch_size=e.batch_size)
    report["description"] = description
    write_jsonl(folder / "predictions.jsonl", predictions)
    write_json(folder / "eval.json", report)
    log.info("baseline %s: accuracy %.4f (n=%d)", name, report["accuracy"], report["n"])
    return {"accuracy": report["accuracy"]}


# ----------------------------------------------------------------------------- learning curves

def curve_rows(study: Study) -> list[dict]:
    rows = study.rows(study.cfg.eval.split)
    n = study.cfg.protocol.curve_rows
    if len(rows) <= n:
        return rows
    keep = set(random.Random(study.cfg.seed).sample(range(len(rows)), n))
    return [r for i, r in enumerate(rows) if i in keep]


def curve_every(study: Study) -> int | None:
    p = study.cfg.protocol
    return p.curve_every or p.eval_steps


def curve_callback(study: Study, rows: list[dict]):
    """A TrainerCallback: accuracy on a fixed validation sample every `curve_every` optimizer steps (and at the
    last step), written to metrics.jsonl as {"type": "curve", "step", "seconds" (optimizer-step time so far),
    ...}: the data of time-to-target. A schedule-free optimizer is switched to its evaluation weights for it.
    Defined here so that importing this module does not import transformers."""
    from transformers import TrainerCallback

    class CurveCallback(TrainerCallback):
        def __init__(self, study: Study, rows: list[dict]):
            self.study, self.rows, self.every = study, rows, curve_every(study)
            self.seconds, self._t0 = 0.0, None

        def on_train_begin(self, args, state, control, **kw):
            if state.global_step:  # resumed: the step clock continues from the last curve point
                done = [r for r in metrics_records(Path(args.output_dir).parent / "metrics.jsonl")
                        if r.get("type") == "curve" and r["step"] <= state.global_step]
                self.seconds = done[-1]["seconds"] if done else 0.0

        def on_step_begin(self, args, state, control, **kw):
            self._t0 = time.perf_counter()

        def on_step_end(self, args, state, control, model=None, optimizer=None, **kw):
            if self._t0 is not None:
                self.seconds += time.perf_counter() - self._t0
                self._t0 = None
            step = state.global_step
            if not self.every or not (step % self.every == 0 or step == state.max_steps):
                return
            if not dist.is_main():
                return
            acc = _score_in_training(self.study, model, optimizer, self.rows)
            with open(Path(args.output_dir).parent / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"type": "curve", "step": step, "seconds": round(self.seconds, 3),
                                    "accuracy": acc, "n": len(self.rows)}) + "\n")

    return CurveCallback(study, rows)


def _score_in_training(study: Study, model, optimizer, rows: list[dict]) -> float:
    import torch

    from qwen_ft import optimizers
    from qwen_ft.inference.engine import Classifier

    e = study.cfg.eval
    was_training = model.training
    model.eval()
    try:
        with optimizers.eval_mode(optimizer), torch.inference_mode(), \
                torch.autocast(next(model.parameters()).device.type, dtype=torch.bfloat16,
                               enabled=torch.cuda.is_available() or _cpu_bf16()):
            report, _ = Classifier(model, study.encoder()).evaluate(rows, decode=e.decode, normalize=e.normalize,
                                                                    batch_size=e.batch_size)
    finally:
        model.train(was_training)
    return report["accuracy"]


def _cpu_bf16() -> bool:
    from qwen_ft.precision import cpu_supports_bf16

    return cpu_supports_bf16()


def _adabound_bounds(optim, steps: int) -> dict | None:
    from qwen_ft import optimizers

    fn = getattr(optimizers, "adabound_bounds", None)
    if fn is None:
        return None
    spec = optimizers.get(optim.optimizer)
    kw = {**spec.defaults, **(optim.kwargs or {})}
    lower, upper = fn(kw.get("final_lr", 0.1), kw.get("gamma", 1e-3), optim.learning_rate, optim.learning_rate,
                      steps)
    return {"lower": lower, "upper": upper, "ratio": upper / lower if lower > 0 else math.inf}


# ----------------------------------------------------------------------------- trials and finals

class TrialTakenElsewhere(Exception):
    """The trial popped is being run by another worker, which holds its claim."""


def run_trial(study: Study, opt: str, k: int, params: dict) -> dict:
    """One trial: train on the training rows for the trial budget, score the tuning split (trial.json)."""
    from filelock import FileLock, Timeout

    out = study.folder.trial_dir(opt, k)
    out.parent.mkdir(parents=True, exist_ok=True)
    h = study.run_hash("trial", opt, params, study.cfg.seed, study.cfg.protocol.trial_max_steps)
    lock = FileLock(str(out.parent / f".trial-{k}.claim"))  # not .lock: the run folder's own lock
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise TrialTakenElsewhere(f"trial {k} of {opt} is being run by another worker (lock {lock.lock_file})") \
            from None
    try:
        rec = study.folder.trial(opt, k)
        if rec is not None and rec.get("hash") == h and not study.force:
            return rec
        try:
            res = train_and_score(study, opt, params, study.cfg.seed, study.cfg.protocol.trial_max_steps, out,
                                  study.rows("tune"), curve=False)
        except TrainingDiverged as e:
            # a search space may reach a diverging rate (the demo searches SGD up to 1.0): the trial counts
            # toward the budget with the worst score, is recorded as such, and the study goes on
            rec = {"optimizer": opt, "k": k, "score": 0.0, "state": "diverged", "hash": h, "params": params,
                   "seed": study.cfg.seed, "error": e.message.splitlines()[0]}
            write_json(out / "trial.json", rec)
            log.warning("trial %d of %s diverged (%s): recorded with tuning accuracy 0", k + 1, opt, rec["error"])
            return rec
        info = res["info"]
        rec = {"optimizer": opt, "k": k, "score": info["accuracy"], "state": "complete", "hash": h, **info}
        write_json(out / "trial.json", rec)
        track(study, "trial", opt, rec, out)
        log.info("trial %d of %s: tuning accuracy %.4f (n=%d), best step %s of %d; %.1fs steps + %.1fs tuning-loss "
                 "evaluations and checkpoints, %.1fs scoring, %.1fs fixed overhead", k + 1, opt, rec["score"],
                 info["n"], info["best_step"], info["steps"], info["train_seconds"] - info["in_loop_eval_s"],
                 info["in_loop_eval_s"], info["eval_seconds"], info["overhead_s"])
        return rec
    finally:
        lock.release()


def run_final(study: Study, opt: str, seed: int, best: dict) -> dict:
    out = study.folder.final_dir(opt, seed)
    params = best["params"]

    def work() -> dict:
        rows = study.rows(study.cfg.eval.split)
        rows = rows[: study.cfg.eval.max_samples] if study.cfg.eval.max_samples else rows
        try:
            res = train_and_score(study, opt, params, seed, study.cfg.protocol.final_max_steps, out, rows,
                                  curve=True)
        except TrainingDiverged as e:
            return diverged_final(out, opt, seed, best, params, rows, e)
        info = res["info"]
        write_jsonl(out / "eval" / "predictions.jsonl", res["predictions"])
        write_json(out / "eval" / "eval.json", res["report"])
        write_json(out / "result.json", {"optimizer": opt, "from_trial": best["k"], **info})
        track(study, "final", opt, {"optimizer": opt, "from_trial": best["k"], **info}, out)
        log.info("final %s seed %d: accuracy %.4f (n=%d), best step %s of %d, %.3fs/step, optimizer state %.1f MB; "
                 "%.1fs in-loop evaluations and checkpoints, %.1fs scoring, %.1fs fixed overhead", opt, seed,
                 info["accuracy"], info["n"], info["best_step"], info["steps"], info["step_time_s"],
                 info["optimizer_state_bytes"] / 2**20, info["in_loop_eval_s"], info["eval_seconds"],
                 info["overhead_s"])
        return {"accuracy": info["accuracy"]}

    return study.step("final", f"final[{opt}, seed {seed}]", out, study.final_hash(opt, params, seed), work)


def diverged_final(out: Path, opt: str, seed: int, best: dict, params: dict, rows: list[dict], error) -> dict:
    """A final whose training diverged: every question counted wrong (it has no usable model), so that the
    statistics and verdicts charge the optimizer for it; result.json says so."""
    message = error.message.splitlines()[0]
    write_jsonl(out / "eval" / "predictions.jsonl", [{"id": r.get("id"), "label": r["label"], "pred": None,
                                                      "correct": False, "valid": False} for r in rows])
    info = {"optimizer": opt, "from_trial": best["k"], "state": "diverged", "error": message, "params": params,
            "seed": seed, "accuracy": 0.0, "n": len(rows)}
    write_json(out / "result.json", info)
    log.warning("final %s seed %d diverged (%s): every question counted wrong", opt, seed, message)
    return {"accuracy": 0.0, "state": "diverged"}


def track(study: Study, kind: str, opt: str, record: dict, run: Path) -> None:
    """The optional experiment tracker (protocol.tracking): one MLflow run per trial and final, local."""
    if study.cfg.protocol.tracking == "mlflow" and dist.is_main():
        from qwen_ft.study.tracking import log_run

        log_run(study.cfg.out, kind, opt, record, run / "metrics.jsonl")
