"""The study's trials and finals as MLflow runs: one experiment per study, in a local file store.

`<study_dir>/mlruns` holds an experiment named after the study folder; each trial or final is one run
with its hyperparameters as params, its final numbers as metrics and the curves of its metrics.jsonl
as metric histories (`mlflow ui --backend-store-uri <study_dir>/mlruns`). The study's own files stay
the record the report reads: this is a view for a tracking UI, written after them.

Offline: MlflowClient is given the file store explicitly (the process-wide tracking URI is never set)
and MLflow's usage telemetry is off unless the user turned it on; the process's environment is left as
it was found. Logging the same record again (a
study run twice) is a no-op; a changed record (the run was repeated) replaces its run. Several workers
may log at once: a file lock beside the store serialises them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

STORE = "mlruns"
# metrics.jsonl record type -> {field: MLflow metric name}, each logged at the record's optimizer step
CURVES = {
    "step": {"loss": "train/loss", "grad_norm": "train/grad_norm", "lr": "train/lr"},
    "epoch": {"val_loss": "eval/val_loss", "train_loss": "eval/train_loss"},
    "eval": {"val_loss": "eval/val_loss", "train_loss": "eval/train_loss"},
    "curve": {"accuracy": "curve/accuracy", "seconds": "curve/seconds"},
}
BATCH = 1000  # MLflow's limit of metrics per log_batch call
# MLflow settings it reads only from the environment; a value the user set wins
SETTINGS = {
    "MLFLOW_DISABLE_TELEMETRY": "true",  # MLflow 3 reports usage online otherwise
    "MLFLOW_ALLOW_FILE_STORE": "true",  # MLflow >= 3.7 refuses file stores without it
}
_warned: list[bool] = []


def available() -> bool:
    import importlib.util

    return importlib.util.find_spec("mlflow") is not None


def store_uri(study_dir: Path) -> str:
    return (Path(study_dir) / STORE).resolve().as_uri()


def run_key(kind: str, optimizer: str, record: dict) -> str:
    """Names one trial or final of the study: `trial/adamw/3`, `final/adamw/seed-1`."""
    if kind == "trial":
        return f"trial/{optimizer}/{record['k']}"
    if kind == "final":
        return f"final/{optimizer}/seed-{record['seed']}"
    raise ValueError(f"kind must be 'trial' or 'final' (got {kind!r})")


def log_run(study_dir: Path, kind: str, optimizer: str, record: dict, metrics_path: Path) -> str | None:
    """Log one trial or final (its trial.json / result.json `record`, its run's metrics.jsonl) as an MLflow
    run; returns the run id, or None (with a warning) when mlflow is not installed or the store fails."""
    if not available():
        if not _warned:
            _warned.append(True)
            log.warning("protocol.tracking is mlflow but mlflow is not installed: trials are not tracked "
                        "(pip install 'qwen-ft[tracking]')")
        return None
    from filelock import FileLock

    study_dir = Path(study_dir)
    key = run_key(kind, optimizer, record)
    digest = hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()[:16]
    study_dir.mkdir(parents=True, exist_ok=True)
    try:
        with _mlflow_settings(), FileLock(str(study_dir / f"{STORE}.lock")):
            client = _client(study_dir)
            experiment_id = _experiment(client, study_dir)
            for old in client.search_runs([experiment_id], filter_string=f"tags.`qwen_ft.key` = '{key}'"):
                if old.data.tags.get("qwen_ft.digest") == digest:
                    return old.info.run_id
                client.delete_run(old.info.run_id)
            return _write(client, experiment_id, kind, optimizer, key, digest, record, Path(metrics_path))
    except Exception as e:  # a view of the study's files: a broken store must not stop the study
        log.warning("MLflow tracking of %s failed (%s: %s); the study's own files are unaffected",
                    key, type(e).__name__, e)
        return None


@contextlib.contextmanager
def _mlflow_settings() -> Iterator[None]:
    """SETTINGS in the environment for the length of one call, then the environment as it was.

    MLflow takes neither setting from its client's arguments: it reads them from os.environ, at import (the
    telemetry client) and again on every call (each call's telemetry, the file store's check). So they are
    put there only while this module calls MLflow, and the variables it added are removed afterwards: a
    library call leaves the process's environment unchanged. Another thread of this process that reads them
    meanwhile sees them set."""
    added = [name for name in SETTINGS if name not in os.environ]
    os.environ.update({name: SETTINGS[name] for name in added})
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


def _client(study_dir: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=store_uri(study_dir))


def _experiment(client, study_dir: Path) -> str:
    name = study_dir.resolve().name
    found = client.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            client.restore_experiment(found.experiment_id)
        return found.experiment_id
    return client.create_experiment(name, tags={"qwen_ft.study_dir": str(study_dir.resolve())})


def _write(client, experiment_id: str, kind: str, optimizer: str, key: str, digest: str, record: dict,
           metrics_path: Path) -> str:
    from mlflow.entities import Metric, Param

    name = key.replace("/", " ", 1).replace("/", " ")
    tags = {"qwen_ft.key": key, "qwen_ft.digest": digest, "kind": kind, "optimizer": optimizer}
    for field in ("k", "seed", "from_trial", "state"):
        if field in record:
            tags[field] = str(record[field])
    run = client.create_run(experiment_id, run_name=name, tags=tags)
    run_id = run.info.run_id
    now = int(time.time() * 1000)
    params = [Param(k, str(v)) for k, v in sorted((record.get("params") or {}).items())]
    params += [Param(k, str(record[k])) for k in ("seed", "k", "from_trial") if k in record]
    metrics = [Metric(k, float(v), now, int(record.get("steps") or 0)) for k, v in sorted(record.items())
               if _number(v) and k not in ("k", "seed", "from_trial")]
    metrics += _curves(metrics_path, now)
    for i in range(0, len(params), 100):
        client.log_batch(run_id, params=params[i:i + 100])
    for i in range(0, len(metrics), BATCH):
        client.log_batch(run_id, metrics=metrics[i:i + BATCH])
    client.set_terminated(run_id, "FINISHED" if record.get("state", "complete") == "complete" else "FAILED")
    return run_id


def _curves(metrics_path: Path, now: int) -> list:
    from mlflow.entities import Metric

    from qwen_ft.study.load import metrics_records

    out = []
    for rec in metrics_records(metrics_path):
        for field, name in CURVES.get(rec.get("type"), {}).items():
            if _number(rec.get(field)):
                out.append(Metric(name, float(rec[field]), now, int(rec["step"])))
    return out


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)  # NaN kept: a diverged run shows as one
