"""The Trainer as qwen-ft runs it: TrainingArguments from the run's config (one table), SeededTrainer
(seeded data order, the optimizer registry, whole-or-nothing checkpoints) and the trackers' folders."""

from __future__ import annotations

import contextlib
import operator
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

from transformers import Trainer

from qwen_ft import distributed as dist
from qwen_ft import optimizers
from qwen_ft.checkpoints import checkpoint_write_error
from qwen_ft.config import TrainConfig
from qwen_ft.runs import RunDir
from qwen_ft.training.batches import SeededLengthGroupedSampler

# TrainingArguments <- TrainConfig ("section.field"): the settings passed on as they are
FROM_CONFIG = {
    "per_device_train_batch_size": "train.batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "num_train_epochs": "train.epochs",
    "logging_steps": "train.logging_steps",
    "seed": "train.seed",
    "data_seed": "train.seed",
    "report_to": "train.report_to",
    "learning_rate": "optim.learning_rate",
    "weight_decay": "optim.weight_decay",
    # transformers 5 reads a float in [0, 1) as a fraction of the total steps (its warmup_ratio is deprecated)
    "warmup_steps": "optim.warmup_ratio",
    "max_grad_norm": "optim.max_grad_norm",
    "lr_scheduler_type": "optim.lr_scheduler",
}
# TrainingArguments that every run shares
FIXED = {
    "logging_strategy": "steps",
    "logging_nan_inf_filter": False,  # log a NaN loss as NaN (DivergenceGuard stops on it)
    "restore_callback_states_from_checkpoint": True,  # early-stopping patience survives a resume
    "save_total_limit": 2,
    "load_best_model_at_end": True,
    "metric_for_best_model": "eval_loss",
    "greater_is_better": False,
    "ddp_find_unused_parameters": False,
    "train_sampling_strategy": "group_by_length",  # in SeededTrainer's order, drawn from (seed, epoch)
    "length_column_name": "length",
    "remove_unused_columns": False,
    "prediction_loss_only": True,
    "torch_compile": False,  # --torch-compile compiles the layers' MLP and norms instead (models.compiled_blocks)
    "save_only_model": False,
    "dataloader_num_workers": 0,
}


def training_arguments(cfg: TrainConfig, run: RunDir, precision: str):
    """FROM_CONFIG and FIXED, plus what follows from the config, the precision and the processes."""
    from transformers import TrainingArguments

    t = cfg.train
    cpu = not dist.use_cuda()
    every = {"eval_strategy": "steps", "eval_steps": t.eval_steps, "save_strategy": "steps",
             "save_steps": t.eval_steps} if t.eval_steps else {"eval_strategy": "epoch", "save_strategy": "epoch"}
    copied = {name: operator.attrgetter(path)(cfg) for name, path in FROM_CONFIG.items()}
    return TrainingArguments(
        **copied, **FIXED, **every,
        output_dir=str(run.checkpoints),
        per_device_eval_batch_size=t.eval_batch_size or 2 * t.batch_size,
        max_steps=t.max_steps or -1,  # -1: the epochs decide
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=cpu,
        ddp_backend="gloo" if cpu and dist.world_size() > 1 else None,
        disable_tqdm=not (dist.is_main() and sys.stderr.isatty()),
    )


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


# ----------------------------------------------------------------------------- trackers
# Local by default: TensorBoard event files (RUN/tensorboard) and MLflow's file store (RUN/mlruns) live inside
# the run folder unless MLFLOW_TRACKING_URI points elsewhere; nothing goes online unless the user chose an
# online tracker (trackio, wandb: their own settings).

# what tracker_environment restores: the variables it sets, and the run id that MLflow's start_run consumes
_MLFLOW_ENVIRONMENT = ("MLFLOW_TRACKING_URI", "MLFLOW_DISABLE_TELEMETRY", "MLFLOW_ALLOW_FILE_STORE", "MLFLOW_RUN_ID")


def use_tensorboard_folder(trainer: Trainer, folder: Path) -> None:
    """The Trainer's TensorBoard callback (report_to tensorboard) swapped, in its place, for one writing into
    `folder`: transformers takes the folder from a writer given to the callback, else from the environment."""
    from transformers.integrations import TensorBoardCallback

    if not dist.is_main():  # other ranks write no event files
        return
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # as transformers' callback falls back
        from tensorboardX import SummaryWriter
    callbacks = trainer.callback_handler.callbacks
    for i, callback in enumerate(callbacks):
        if isinstance(callback, TensorBoardCallback):
            callbacks[i] = TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(folder.resolve())))


@contextlib.contextmanager
def tracker_environment(report_to: str, run: RunDir) -> Iterator[None]:
    """For report_to mlflow: MLflow's settings in the environment while the Trainer is built and trains, then
    the environment exactly as it was (the variables restored or removed).

    Why the environment: transformers' MLflowCallback takes the tracking URI only from MLFLOW_TRACKING_URI
    (or a process-wide `mlflow.set_tracking_uri`, which sets that variable too), and MLflow reads telemetry
    and the file-store permission only from os.environ, at import and on every call. So they are set for
    the length of the call alone, and a study's next run does not inherit this run's store. A run the
    callback left open (training stopped by an error) is ended inside the scope, in its own store. Another
    thread of this process that reads the variables meanwhile sees them set."""
    if report_to != "mlflow":
        yield
        return
    saved = {name: os.environ.get(name) for name in _MLFLOW_ENVIRONMENT}
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # MLflow 3 reports usage online otherwise
    if not saved["MLFLOW_TRACKING_URI"]:  # the user's own tracking URI wins
        os.environ["MLFLOW_TRACKING_URI"] = (run.path / "mlruns").resolve().as_uri()
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow >= 3.7 refuses a file store otherwise
    open_before = _mlflow_run_id()
    try:
        yield
    finally:
        if _mlflow_run_id() not in (None, open_before):
            sys.modules["mlflow"].end_run()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _mlflow_run_id() -> str | None:
    """The active MLflow run's id, if MLflow is imported at all (importing it here would change nothing)."""
    mlflow = sys.modules.get("mlflow")
    run = mlflow.active_run() if mlflow is not None else None
    return run.info.run_id if run is not None else None
