"""Experiment tracking reads back what metrics.jsonl holds: TensorBoard event files and MLflow's file store
for `train --report-to`, and the study's MLflow runs (study/tracking.py). Skipped without the `tracking`
extra (`pip install -e ".[tracking]"`; scripts/setup.sh installs it)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

from qwen_ft.cli import main
from tests.conftest import tiny_train_args

# 2 epochs of 6 steps, a loss logged at every step, an evaluation after each epoch
EXTRA = ("--epochs", "2", "--logging-steps", "1", "--learning-rate", "5e-3")


def records(run: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["type"] == kind]


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """Training with a tracker must not try the network: every outgoing connection is recorded and refused.
    It runs in an empty working folder, which must stay empty (everything lands in the run folder)."""
    tried = []
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")

    def connect(self, address):
        tried.append(address)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", connect)
    for name in ("TENSORBOARD_LOGGING_DIR", "MLFLOW_TRACKING_URI", "MLFLOW_DISABLE_TELEMETRY",
                 "MLFLOW_ALLOW_FILE_STORE", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID"):
        monkeypatch.delenv(name, raising=False)  # training must leave them unset (and restored after)
    return tried


def test_tensorboard_scalars_are_the_metrics_jsonl_losses(tiny_qwen3, tmp_path, offline):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    assert main(tiny_train_args(tiny_qwen3, run, *EXTRA, "--report-to", "tensorboard")) == 0
    assert "TENSORBOARD_LOGGING_DIR" not in os.environ  # the folder reached the callback, not the environment
    events = list((run / "tensorboard").rglob("events.out.tfevents.*"))
    assert events, "no event file inside RUN/tensorboard"
    acc = EventAccumulator(str(events[0].parent)).Reload()
    train = {e.step: e.value for e in acc.Scalars("train/loss")}
    val = {e.step: e.value for e in acc.Scalars("eval/loss")}
    steps, epochs = records(run, "step"), records(run, "epoch")
    assert len(steps) == 12 and len(epochs) == 2
    assert sorted(train) == [r["step"] for r in steps]
    for r in steps:
        assert train[r["step"]] == pytest.approx(r["loss"], rel=1e-6)  # event files hold float32
    assert sorted(val) == [r["step"] for r in epochs]
    for r in epochs:
        assert val[r["step"]] == pytest.approx(r["val_loss"], rel=1e-6)
    assert not offline and not any(Path.cwd().iterdir())


def test_mlflow_file_store_holds_the_metrics_jsonl_losses(tiny_qwen3, tmp_path, offline):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    run = tmp_path / "run"
    assert main(tiny_train_args(tiny_qwen3, run, *EXTRA, "--report-to", "mlflow")) == 0
    # MLflow's settings were set for the training call alone: the environment is left as it was found
    assert not [name for name in ("MLFLOW_TRACKING_URI", "MLFLOW_DISABLE_TELEMETRY", "MLFLOW_ALLOW_FILE_STORE",
                                  "MLFLOW_RUN_ID") if name in os.environ]
    client = MlflowClient(tracking_uri=(run / "mlruns").as_uri())
    experiments = client.search_experiments()
    found = client.search_runs([e.experiment_id for e in experiments])
    assert len(found) == 1 and found[0].info.status == "FINISHED"
    run_id = found[0].info.run_id
    train = {m.step: m.value for m in client.get_metric_history(run_id, "loss")}
    val = {m.step: m.value for m in client.get_metric_history(run_id, "eval_loss")}
    steps, epochs = records(run, "step"), records(run, "epoch")
    assert len(steps) == 12 and len(epochs) == 2
    assert train == {r["step"]: pytest.approx(r["loss"], rel=1e-12) for r in steps}
    assert val == {r["step"]: pytest.approx(r["val_loss"], rel=1e-12) for r in epochs}
    assert found[0].data.params["learning_rate"] == "0.005"
    assert not offline and not any(Path.cwd().iterdir())


# ----------------------------------------------------------------------------- the study's runs

TRIAL = {"optimizer": "adamw", "k": 2, "score": 0.625, "state": "complete", "hash": "abc",
         "params": {"learning_rate": 0.00657, "weight_decay": 0.01}, "seed": 42, "steps": 4, "best_step": 3,
         "tune_loss": 1.25, "train_seconds": 1.5, "accuracy": 0.625, "n": 8, "adabound_bounds": None}
FINAL = {"optimizer": "adamw", "from_trial": 2, "params": {"learning_rate": 0.00657, "weight_decay": 0.01},
         "seed": 1, "steps": 4, "best_step": 4, "tune_loss": 1.1, "accuracy": 0.75, "n": 12}
METRICS = [
    {"type": "step", "step": 1, "epoch": 0.25, "loss": 2.5, "grad_norm": 3.0, "lr": 1e-3},
    {"type": "step", "step": 2, "epoch": 0.5, "loss": 2.0, "grad_norm": 2.5, "lr": 9e-4},
    {"type": "eval", "epoch": 0.5, "step": 2, "train_loss": 2.25, "val_loss": 2.1, "grad_norm": 2.75, "lr": 9e-4},
    {"type": "curve", "step": 2, "seconds": 0.8, "accuracy": 0.5, "n": 12},
    {"type": "step", "step": 3, "epoch": 0.75, "loss": 1.5, "grad_norm": None, "lr": 8e-4},
    {"type": "step", "step": 4, "epoch": 1.0, "loss": float("nan"), "grad_norm": 2.0, "lr": 7e-4},
    {"type": "epoch", "epoch": 1, "step": 4, "train_loss": 1.75, "val_loss": 1.8, "grad_norm": 2.2, "lr": 7e-4},
    {"type": "curve", "step": 4, "seconds": 1.6, "accuracy": 0.75, "n": 12},
    {"type": "final", "step": 4, "best_val_loss": 1.8},
]


def write_metrics(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in METRICS) + '{"type": "step", "st')  # a torn last line
    return path


def history(client, run_id: str, name: str) -> list[tuple]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, name))


def test_study_trials_and_finals_are_runs_of_one_experiment(tmp_path, monkeypatch, offline):
    pytest.importorskip("mlflow")
    import math

    from mlflow.tracking import MlflowClient

    from qwen_ft.study.tracking import log_run

    study = tmp_path / "my-study"
    metrics = write_metrics(study / "trials" / "adamw" / "trial-2" / "metrics.jsonl")
    trial_id = log_run(study, "trial", "adamw", TRIAL, metrics)
    final_id = log_run(study, "final", "adamw", FINAL, metrics)
    assert log_run(study, "trial", "adamw", TRIAL, metrics) == trial_id  # logged once, however often asked
    assert not offline and not any(Path.cwd().iterdir())

    client = MlflowClient(tracking_uri=(study / "mlruns").as_uri())
    exp = client.get_experiment_by_name("my-study")
    runs = {r.info.run_id: r for r in client.search_runs([exp.experiment_id])}
    assert set(runs) == {trial_id, final_id}
    trial, final = runs[trial_id], runs[final_id]
    assert trial.info.run_name == "trial adamw 2" and final.info.run_name == "final adamw seed-1"
    assert trial.data.tags["kind"] == "trial" and final.data.tags["optimizer"] == "adamw"
    assert final.data.tags["from_trial"] == "2" and trial.info.status == "FINISHED"
    assert trial.data.params == {"learning_rate": "0.00657", "weight_decay": "0.01", "seed": "42", "k": "2"}
    assert trial.data.metrics == {"score": 0.625, "steps": 4, "best_step": 3, "tune_loss": 1.25,
                                  "train_seconds": 1.5, "accuracy": 0.625, "n": 8,
                                  # the last value of each curve
                                  "train/loss": pytest.approx(float("nan"), nan_ok=True), "train/grad_norm": 2.0,
                                  "train/lr": 7e-4, "eval/val_loss": 1.8, "eval/train_loss": 1.75,
                                  "curve/accuracy": 0.75, "curve/seconds": 1.6}
    loss = history(client, trial_id, "train/loss")
    assert loss[:3] == [(1, 2.5), (2, 2.0), (3, 1.5)] and loss[3][0] == 4 and math.isnan(loss[3][1])
    assert history(client, trial_id, "train/grad_norm") == [(1, 3.0), (2, 2.5), (4, 2.0)]  # None: not logged
    assert history(client, trial_id, "eval/val_loss") == [(2, 2.1), (4, 1.8)]  # per --eval-steps and per epoch
    assert history(client, final_id, "curve/accuracy") == [(2, 0.5), (4, 0.75)]
    assert final.data.metrics["accuracy"] == 0.75

    # the trial was run again (another record): its run is replaced, the final's kept
    again = log_run(study, "trial", "adamw", {**TRIAL, "score": 0.5, "accuracy": 0.5}, metrics)
    runs = {r.info.run_id: r for r in client.search_runs([exp.experiment_id])}
    assert set(runs) == {again, final_id} and runs[again].data.metrics["score"] == 0.5


def test_study_tracking_without_mlflow_warns_once_and_writes_nothing(tmp_path, monkeypatch, caplog):
    import qwen_ft.study.tracking as tracking

    monkeypatch.setattr(tracking, "available", lambda: False)
    monkeypatch.setattr(tracking, "_warned", [])
    metrics = write_metrics(tmp_path / "metrics.jsonl")
    with caplog.at_level("WARNING"):
        assert tracking.log_run(tmp_path / "s", "trial", "adamw", TRIAL, metrics) is None
        assert tracking.log_run(tmp_path / "s", "final", "adamw", FINAL, metrics) is None
    assert [r.getMessage() for r in caplog.records if "not installed" in r.getMessage()] == [
        "protocol.tracking is mlflow but mlflow is not installed: trials are not tracked "
        "(pip install 'qwen-ft[tracking]')"]
    assert not (tmp_path / "s").exists()


def test_a_broken_store_warns_and_does_not_stop_the_study(tmp_path, caplog):
    pytest.importorskip("mlflow")
    from qwen_ft.study.tracking import log_run

    study = tmp_path / "s"
    study.mkdir()
    (study / "mlruns").write_text("not a folder")
    with caplog.at_level("WARNING"):
        assert log_run(study, "trial", "adamw", TRIAL, write_metrics(tmp_path / "metrics.jsonl")) is None
    assert any("MLflow tracking of trial/adamw/2 failed" in r.getMessage() for r in caplog.records)
