"""The tuning protocol: quasirandom points, the Optuna storage and its worker queue, the one best-trial rule.

Every optimizer gets the same number of trials, drawn over its declared search space (the same unit-cube
points for every optimizer with the same number of dimensions). Each trial is enqueued once in Optuna and
popped by exactly one worker (`qwen-ft study` started N times, on one machine or many sharing the storage
and the study folder); a killed worker's trial is taken over when its heartbeat stops.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING

from qwen_ft.errors import UserError
from qwen_ft.study.config import OptimizerEntry

if TYPE_CHECKING:
    from qwen_ft.study.phases import Study

log = logging.getLogger(__name__)

HEARTBEAT_S = 10  # a worker's trial is taken over by another worker this long x 3 after its heartbeat stops


def qmc_points(entry: OptimizerEntry, n: int, seed: int, sampler: str) -> list[dict]:
    """`n` points of the entry's search space: scrambled Sobol (the sequence Optuna's QMCSampler draws),
    or uniform random; the same unit-cube points for every optimizer with the same number of dimensions."""
    import warnings

    import numpy as np
    from scipy.stats import qmc

    names = sorted(entry.search)
    if not names:
        return [{} for _ in range(n)]
    if sampler == "qmc":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "balance properties ... n is not a power of 2"
            unit = qmc.Sobol(len(names), scramble=True, seed=seed).random(n)
    else:
        unit = np.random.default_rng(seed).random((n, len(names)))
    points = []
    for u in unit:
        point = {}
        for name, x in zip(names, u):
            r = entry.search[name]
            value = math.exp(math.log(r.low) + x * (math.log(r.high) - math.log(r.low))) if r.log \
                else r.low + x * (r.high - r.low)
            point[name] = float(f"{value:.6g}")
        points.append(point)
    return points


# ----------------------------------------------------------------------------- the best trial

def best_trial(trials: list[dict]) -> dict | None:
    """The best tuning accuracy among the complete trials, ties to the lower tuning loss, then to the earlier
    trial; None when none is complete. The finals re-run it; the report and its plots mark it."""
    done = [t for t in trials if t.get("state", "complete") == "complete" and t.get("score") is not None]
    return max(done, key=lambda t: (t["score"], -(t.get("tune_loss") or 0), -t["k"])) if done else None


def finished_trials(study: Study, opt: str) -> dict[int, dict]:
    out = {}
    for k in range(study.cfg.protocol.trials):
        rec = study.folder.trial(opt, k)
        if rec is not None and rec.get("state") in ("complete", "diverged"):
            out[k] = rec
    return out


def chosen_trial(study: Study, opt: str) -> dict:
    """The best trial of `opt` once all its trials have finished (else one clear error)."""
    trials = finished_trials(study, opt)
    if len(trials) < study.cfg.protocol.trials:
        missing = sorted(set(range(study.cfg.protocol.trials)) - set(trials))
        raise UserError(f"{opt}: trials {missing} have not finished", "Run the train phase again: it resumes them.")
    best = best_trial(list(trials.values()))
    if best is None:
        raise UserError(f"{opt}: every one of its {len(trials)} trials diverged",
                        f"Lower the learning-rate range of {opt} in the study config (optimizers.{opt}.search).")
    return best


def fmt_params(params: dict) -> str:
    return ", ".join(f"{k}={v:.3g}" for k, v in sorted(params.items())) or "no search parameters"


# ----------------------------------------------------------------------------- Optuna: storage and queue

def storage_url(url: str) -> str:
    """`postgresql://...` through psycopg (v3, the `postgres` extra) when psycopg2, SQLAlchemy's default driver for
    that scheme, is not installed."""
    import importlib.util

    if url.startswith("postgresql://") and importlib.util.find_spec("psycopg2") is None:
        if importlib.util.find_spec("psycopg") is None:
            raise UserError(f"protocol.storage {url.split('@')[-1]!r} needs a PostgreSQL driver, and none is installed",
                            "pip install 'qwen-ft[postgres]' (psycopg), or use a sqlite:/// storage.")
        return "postgresql+psycopg://" + url[len("postgresql://"):]
    return url


def open_storage(study: Study):
    import warnings

    import optuna

    # heartbeats and fail_stale_trials are marked experimental (since Optuna 2.9); they are what makes a
    # killed worker's trial recoverable, so use them without a warning on every call
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

    from filelock import FileLock

    url = storage_url(study.cfg.protocol.storage or f"sqlite:///{study.folder.optuna_db.resolve()}")
    # SQLite: workers that open or write the file at once wait for its lock (sqlite3's default 5 s ran out
    # for a second worker on a loaded machine: "database is locked")
    engine_kwargs = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else None
    # workers that start together would each create the schema, and one of them fail on the other's tables
    # ("table alembic_version already exists", "database is locked", a duplicate key on a server): one opens it
    # at a time, through a lock in the folder they share (the SQLite file's, or the study folder)
    if url.startswith("sqlite:///"):
        db = Path(url[len("sqlite:///"):])
        db.parent.mkdir(parents=True, exist_ok=True)
        opening = FileLock(str(db.parent / f".{db.name}.open.lock"), timeout=300)
    else:
        study.folder.optuna_db.parent.mkdir(parents=True, exist_ok=True)
        opening = FileLock(str(study.folder.optuna_db.parent / ".storage.open.lock"), timeout=300)
    try:
        with opening:
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_S,
                                              grace_period=3 * HEARTBEAT_S)
    except Exception as e:  # a bad URL, a missing driver, an unreachable server, a lock that never came free
        raise UserError(f"cannot open the Optuna storage {url}: {type(e).__name__}: {e}",
                        "Check protocol.storage (e.g. sqlite:///study.db or postgresql://user@host/db).") from None


def _optuna_study(study: Study, opt: str, points: list[dict]):
    """The optimizer's Optuna study, its trials enqueued exactly once (by whichever worker creates it)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(study)
    name = f"{opt}-{study.tune_hash(opt)}"
    sampler = optuna.samplers.TPESampler(seed=study.cfg.seed) if study.cfg.protocol.sampler == "tpe" \
        else optuna.samplers.RandomSampler(seed=study.cfg.seed)
    try:
        ost = optuna.create_study(storage=storage, study_name=name, direction="maximize", sampler=sampler)
    except optuna.exceptions.DuplicatedStudyError:
        ost = optuna.load_study(study_name=name, storage=storage, sampler=sampler)
        for _ in range(60):  # the creating worker is enqueueing
            if study.cfg.protocol.sampler == "tpe" or "enqueued" in ost.user_attrs:
                return ost
            time.sleep(1)
        return ost
    if study.cfg.protocol.sampler != "tpe":
        for k, point in enumerate(points):
            ost.enqueue_trial(point, user_attrs={"k": k})
        ost.set_user_attr("enqueued", len(points))
    return ost


def tune(study: Study, opt: str) -> dict:
    """Every trial of `opt`, through Optuna; returns {k: trial.json record} of the finished trials."""
    import optuna
    from sqlalchemy.exc import OperationalError  # optuna's storage layer: already imported with it

    p = study.cfg.protocol
    ost = _optuna_study(study, opt, qmc_points(study.cfg.optimizers[opt], p.trials, study.cfg.seed, p.sampler))
    objective = _objective(study, opt, ost, time.time())
    while (state := _queue_state(ost, p)) != "done":
        if state == "wait":
            log.info("%s: waiting for trials running in another worker (a killed one is taken over once its "
                     "heartbeat is %ds old)", opt, 3 * HEARTBEAT_S)
            time.sleep(HEARTBEAT_S)
            continue
        try:
            ost.optimize(objective, n_trials=1, catch=())
        except (optuna.exceptions.UpdateFinishedTrialError, OperationalError) as e:
            if isinstance(e, OperationalError) and "locked" not in str(e):
                raise
            # SQLite under several workers: a lock upgrade refused at once ("database is locked"), or this
            # worker's trial failed as stale by another while it ran. The trial's own record is its
            # trial.json; an Optuna trial left behind is failed as stale, queued again and, on its next pop,
            # read back from that record without training again.
            log.info("%s: the Optuna storage refused an update (%s: %s); retrying", opt, type(e).__name__,
                     str(e).splitlines()[0][:120])
            time.sleep(1)
    return finished_trials(study, opt)


def _queue_state(ost, p) -> str:
    """"run" (a trial to pop), "wait" (only trials running in another worker) or "done"."""
    import optuna
    from optuna.trial import TrialState

    optuna.storages.fail_stale_trials(ost)  # a killed worker's trial: FAIL, then enqueued again below
    _requeue_failed(ost)
    if p.sampler == "tpe":
        return "done" if len([t for t in ost.trials if t.state == TrialState.COMPLETE]) >= p.trials else "run"
    if ost.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        return "run"
    return "wait" if ost.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) else "done"


def _objective(study: Study, opt: str, ost, started: float):
    """Optuna's objective: run the popped trial (trials.run_trial), return its tuning accuracy."""
    import optuna

    from qwen_ft.study.trials import TrialTakenElsewhere, run_trial

    p, entry = study.cfg.protocol, study.cfg.optimizers[opt]

    def objective(trial):
        k = trial.user_attrs.get("k", trial.number if p.sampler == "tpe" else None)
        if k is None:  # the queue emptied between this worker's look and its ask: nothing to run
            trial.set_user_attr("spare", True)
            raise optuna.TrialPruned("no enqueued trial left")
        trial.set_user_attr("k", k)
        params = {n: trial.suggest_float(n, r.low, r.high, log=r.log) for n, r in sorted(entry.search.items())}
        done = len(finished_trials(study, opt))
        elapsed = time.time() - started
        eta = f", ~{elapsed / done * (p.trials - done) / 60:.0f} min left for {opt}" if done else ""
        log.info("trial %d/%d of %s: %s%s", k + 1, p.trials, opt, fmt_params(params), eta)
        try:
            rec = run_trial(study, opt, k, params)
        except TrialTakenElsewhere as e:  # a copy queued again while its first worker still runs it
            # keep it queued until that worker lets go of the claim (finished: its trial.json is read back,
            # not trained again; killed: the claim is freed with the process and the trial runs here), so
            # that no worker leaves the loop, and picks its finals, with this trial unfinished
            log.info("%s; waiting for it", e)
            trial.set_user_attr("spare", True)
            ost.enqueue_trial(params, user_attrs={"k": k})
            time.sleep(HEARTBEAT_S / 2)  # not a busy loop on the storage
            raise optuna.TrialPruned(str(e)) from None
        return rec["score"]

    return objective


def _requeue_failed(ost) -> None:
    """Trials that failed (interrupted, killed) go back in the queue with the same point and index."""
    from optuna.trial import TrialState

    trials = ost.get_trials(deepcopy=False)
    live = {t.user_attrs.get("k") for t in trials
            if t.state in (TrialState.COMPLETE, TrialState.WAITING, TrialState.RUNNING)}
    for t in trials:
        k = t.user_attrs.get("k")
        if t.state == TrialState.FAIL and k is not None and k not in live and not t.user_attrs.get("spare"):
            ost.enqueue_trial(t.params, user_attrs={"k": k})
            live.add(k)
