"""The study's phases: data -> train (tuning trials, then finals) -> merge -> eval (baselines) -> analysis.

The protocol is the same for every optimizer (MLCommons AlgoPerf's external tuning, Choi et al. 2019):
the same number of trials drawn quasirandomly over each optimizer's declared search space, each trial
scored on a tuning split carved from the training data (never on the validation set that reports the
result), checkpoints selected on that tuning split, then the best trial of each optimizer re-run with
several seeds on the full budget and scored on the validation set.

All runs happen in this process with the base model loaded once: each run trains a fresh LoRA on a copy
of it (the same weights and seed as a fresh process), the tokenized splits are computed once, and a run
whose marker matches is not repeated. Several workers (`qwen-ft study` started N times, on one machine or
many sharing the Optuna storage and the study folder) split the trials: each trial is enqueued once in
Optuna and popped by exactly one worker; a killed worker's trial is taken over when its heartbeat stops.

Study folder layout (`output_dir`):
    study.json                                  the resolved protocol (what the report reads)
    data/{train,tune,validation,test}.jsonl, summary.json
    optuna.db                                   the trials (default storage; `optuna-dashboard sqlite:///...`)
    trials/<optimizer>/trial-<k>/               run folder + trial.json (params, tuning-split score)
    finals/<optimizer>/seed-<s>/                run folder + result.json + eval/ (validation predictions)
    models/<optimizer>/                         the first seed's final, merged and verified (safetensors)
    baselines/<name>/eval.json                  the untrained model: our prompt; log-likelihood per token/char
    results/                                    report.md, *.csv, plots (study/report.py)
    notebooks/analysis.ipynb
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import json
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from qwen_ft import distributed as dist
from qwen_ft.config import without_later_data_fields
from qwen_ft.errors import ConfigDiffersError, TrainingDiverged, TrainingInterrupted, UserError
from qwen_ft.runs import read_jsonl, write_json, write_jsonl
from qwen_ft.study import markers
from qwen_ft.study.config import PHASES, OptimizerEntry, StudyConfig

log = logging.getLogger(__name__)

REPORT_VERSION = 3  # bump when the analysis outputs change shape, so that old reports are redrawn
SPLITS = ("train", "tune", "validation", "test")
HEARTBEAT_S = 10  # a worker's trial is taken over by another worker this long x 3 after its heartbeat stops


@dataclass
class Study:
    cfg: StudyConfig
    force: bool = False
    trust_remote_code: bool = False
    outcomes: list[dict] = field(default_factory=list)
    _cache: dict = field(default_factory=dict)

    # ------------------------------------------------------------------ folders
    @property
    def data_dir(self) -> Path:
        return self.cfg.out / "data"

    def trial_dir(self, opt: str, k: int) -> Path:
        return self.cfg.out / "trials" / opt / f"trial-{k}"

    def final_dir(self, opt: str, seed: int) -> Path:
        return self.cfg.out / "finals" / opt / f"seed-{seed}"

    def run_dir(self, opt: str) -> Path:
        return self.final_dir(opt, self.cfg.protocol.final_seeds[0])

    def model_dir(self, opt: str) -> Path:
        return self.cfg.out / "models" / opt

    def baseline_dir(self, name: str) -> Path:
        return self.cfg.out / "baselines" / name

    @property
    def results_dir(self) -> Path:
        return self.cfg.out / "results"

    # ------------------------------------------------------------------ config hashes
    def data_hash(self) -> str:
        c = self.cfg
        return markers.digest("data", without_later_data_fields(dataclasses.asdict(c.base.data)), c.seed,
                              c.base.model.model, c.protocol.tune_rows)

    def _run_hash(self, kind: str, opt: str, params: dict, seed: int, budget: int | None) -> str:
        base = dataclasses.asdict(self.cfg.base)
        base["train"].pop("output_dir", None)
        base["data"] = without_later_data_fields(base["data"])
        base["model"].pop("head", None)  # always generative in a study: hashes as before the field existed
        base["train"]["torch_compile"] = False  # a speed lever (same results up to rounding): hashes as before
        p = self.cfg.protocol
        return markers.digest(kind, self.data_hash(), base, self.cfg.optimizers[opt].spec(), params, seed, budget,
                              p.eval_steps, p.curve_every, p.curve_rows, dataclasses.asdict(self.cfg.eval))

    def tune_hash(self, opt: str) -> str:
        p = self.cfg.protocol
        return markers.digest("tune", self._run_hash("trial", opt, {}, self.cfg.seed, p.trial_max_steps),
                              p.trials, p.sampler)

    def analysis_hash(self, opts: list[str]) -> str:
        finals = {o: [markers.read(self.final_dir(o, s)) for s in self.cfg.protocol.final_seeds] for o in opts}
        base = [markers.read(self.baseline_dir(n)) for n in BASELINES]
        return markers.digest("analysis", REPORT_VERSION, finals, base, self.cfg.spec())

    # ------------------------------------------------------------------ in-process state, loaded once
    def summary(self) -> dict:
        self.require(self.data_dir, self.data_hash(), "data")
        return json.loads((self.data_dir / "summary.json").read_text())

    def rows(self, split: str) -> list[dict]:
        """A split's rows, read back through the same loader `qwen-ft train` uses on these files."""
        if split not in self._cache.setdefault("rows", {}):
            from qwen_ft.config import DataArgs
            from qwen_ft.data.prepare import load_rows

            path = self.data_dir / f"{split}.jsonl"
            rows = load_rows(str(path), self.summary()["task"], DataArgs(), split)[1] if read_jsonl(path) else []
            self._cache["rows"][split] = rows
        return self._cache["rows"][split]

    def task(self):
        from qwen_ft.tasks import Task

        return Task.from_mapping(self.summary()["mapping"])

    def prepared(self):
        """Training rows + the tuning split as the run's 'validation' split (loss, checkpoint selection)."""
        if "prepared" not in self._cache:
            from qwen_ft.data.prepare import Prepared

            self._cache["prepared"] = Prepared(self.task(), {"train": self.rows("train"),
                                                             "validation": self.rows("tune"), "test": []})
        return self._cache["prepared"]

    def base_model(self):
        if "model" not in self._cache:
            import torch

            from qwen_ft.models import load_model, resolve_model

            m = self.cfg.base.model
            path = resolve_model(m.model)
            self._cache["model"] = load_model(path, torch.float32, "cpu", m.attn_implementation,
                                              self.trust_remote_code).eval()
        return self._cache["model"]

    def encoder(self):
        if "encoder" not in self._cache:
            from qwen_ft.encoding import PromptEncoder
            from qwen_ft.models import load_tokenizer, resolve_model

            tok = load_tokenizer(resolve_model(self.cfg.base.model.model), self.trust_remote_code)
            self._cache["encoder"] = PromptEncoder(tok, self.task(), self.cfg.base.model.max_length)
        return self._cache["encoder"]

    # ------------------------------------------------------------------ bookkeeping
    def require(self, folder: Path, config_hash: str, phase: str, opt: str | None = None) -> None:
        if not markers.matches(folder, config_hash):
            what = f"the {phase} phase" + (f" for {opt}" if opt else "")
            raise UserError(f"{what} has not finished for this config (no matching {folder / markers.MARKER})",
                            f"Run it first: qwen-ft study --config FILE --phases {phase}"
                            + (f" --optimizers {opt}" if opt else ""))

    def step(self, phase: str, name: str, folder: Path, config_hash: str, work: Callable[[], dict]) -> dict:
        """Skip when the marker matches (unless forced); else run `work` and write the marker."""
        if not self.force and markers.matches(folder, config_hash):
            log.info("%-28s skipped: up to date (%s)", name, folder / markers.MARKER)
            outcome = {"phase": phase, "name": name, "status": "skipped", "seconds": 0.0}
        else:
            log.info("%-28s running -> %s", name, folder)
            gc.collect()
            t0 = time.time()
            info = work() or {}
            seconds = time.time() - t0
            if dist.is_main():
                markers.write(folder, phase, config_hash, seconds, name=name, **info)
            log.info("%-28s done in %.1fs", name, seconds)
            outcome = {"phase": phase, "name": name, "status": "done", "seconds": round(seconds, 2), **info}
        self.outcomes.append(outcome)
        return outcome


# ----------------------------------------------------------------------------- data

def data_phase(study: Study) -> dict:
    """Load, sample and split (seeded) once; carve the tuning split out of the training rows."""
    cfg = study.cfg
    folder = study.data_dir
    if folder.exists() and any(folder.iterdir()) and markers.read(folder) is None:
        raise UserError(f"{folder} holds files that this study did not write (no {markers.MARKER})",
                        "Choose another output_dir for the study, or move those files away.")

    def work() -> dict:
        from qwen_ft.data.prepare import prepare

        _fetch_model(cfg.base.model.model)
        augment = cfg.base.data.augment  # after carving: a row and its noisy copy on the same side
        prepared = prepare(dataclasses.replace(cfg.base.data, augment=None), cfg.seed)
        train, tune = carve_tune(prepared.splits["train"], cfg.protocol.tune_rows, cfg.seed,
                                 stratify=prepared.task.name == "category")
        if augment:
            from qwen_ft.data.perturb import augment_rows

            train = augment_rows(train, augment, cfg.seed)
        splits = {"train": train, "tune": tune, "validation": prepared.splits["validation"],
                  "test": prepared.splits["test"]}
        markers.clear(folder)
        for name in SPLITS:
            write_jsonl(folder / f"{name}.jsonl", [_cache_record(r) for r in splits[name]])
        from qwen_ft.engine import chance

        sizes = {k: len(v) for k, v in splits.items()}
        write_json(folder / "summary.json", {
            "task": prepared.task.name, "labels": prepared.task.labels, "mapping": prepared.task.to_mapping(),
            "sizes": sizes, "chance": chance(prepared.task, splits["validation"]), "source": cfg.base.data.data,
            "validation_source": cfg.base.data.validation_data, "seed": cfg.seed, "model": cfg.base.model.model,
        })
        ids = {r["id"] for r in tune} & {r["id"] for r in splits["validation"]}
        assert not ids, "tuning rows overlap the validation rows"
        log.info("data: %s; tuning split: %d rows carved from training", prepared.summary(), len(tune))
        return {"sizes": sizes}

    return study.step("data", "data", folder, study.data_hash(), work)


def carve_tune(rows: list[dict], n: int, seed: int, stratify: bool) -> tuple[list[dict], list[dict]]:
    """(training rows, tuning rows): `n` rows drawn with `seed` (stratified by label for categories)."""
    if n >= len(rows):
        raise UserError(f"protocol.tune_rows {n} leaves no training rows (the training split has {len(rows)})",
                        "Lower protocol.tune_rows or use more training data.")
    from qwen_ft.data.splits import split_rows

    parts = split_rows(rows, n / len(rows), 0.0, seed, stratify=stratify)
    return parts["train"], parts["validation"]


# ----------------------------------------------------------------------------- runs

def run_config(study: Study, entry: OptimizerEntry, params: dict, seed: int, max_steps: int | None, out: Path):
    """The TrainConfig of one run: the study's shared sections + the entry's fixed settings + `params`."""
    cfg = copy.deepcopy(study.cfg.base)
    d = cfg.data  # the study's cached splits, so that `qwen-ft train --config RUN/config.yaml` repeats the run
    d.data, d.validation_data = str(study.data_dir / "train.jsonl"), str(study.data_dir / "tune.jsonl")
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
                       prepared=study.prepared(), callbacks=callbacks, encode_cache=study._cache.setdefault("enc", {}))
    except TrainingInterrupted as e:
        raise UserError(e.message.splitlines()[0], "Run the same `qwen-ft study` command again: finished runs are "
                        "skipped and this one resumes from its checkpoint.") from None
    except ConfigDiffersError:
        if not resume:
            raise
        # an older config's run: start it over
        result = train(cfg, overwrite=True, base_model=study.base_model(), prepared=study.prepared(),
                       callbacks=callbacks, encode_cache=study._cache["enc"])
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

    from qwen_ft.engine import Classifier
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


def curve_rows(study: Study) -> list[dict]:
    rows = study.rows(study.cfg.eval.split)
    n = study.cfg.protocol.curve_rows
    if len(rows) <= n:
        return rows
    keep = set(random.Random(study.cfg.seed).sample(range(len(rows)), n))
    return [r for i, r in enumerate(rows) if i in keep]


def _curve_every(study: Study) -> int | None:
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
            self.study, self.rows, self.every = study, rows, _curve_every(study)
            self.seconds, self._t0 = 0.0, None

        def on_train_begin(self, args, state, control, **kw):
            if state.global_step:  # resumed: the step clock continues from the last curve point
                from qwen_ft.runs import read_jsonl_tolerant

                done = [r for r in read_jsonl_tolerant(Path(args.output_dir).parent / "metrics.jsonl")
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
    from qwen_ft.engine import Classifier

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


# ----------------------------------------------------------------------------- tuning (Optuna)

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


def _storage(study: Study):
    import warnings

    import optuna

    # heartbeats and fail_stale_trials are marked experimental (since Optuna 2.9); they are what makes a
    # killed worker's trial recoverable, so use them without a warning on every call
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

    url = study.cfg.protocol.storage or f"sqlite:///{(study.cfg.out / 'optuna.db').resolve()}"
    # SQLite: workers that open or write the file at once wait for its lock (sqlite3's default 5 s ran out
    # for a second worker on a loaded machine: "database is locked")
    engine_kwargs = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else None
    opening = contextlib.nullcontext()
    if url.startswith("sqlite:///"):
        from filelock import FileLock

        db = Path(url[len("sqlite:///"):])
        db.parent.mkdir(parents=True, exist_ok=True)
        # workers that start together would each create the schema, and one of them fail on the other's
        # tables ("table alembic_version already exists", or "database is locked"): one opens it at a time
        opening = FileLock(str(db.parent / f".{db.name}.open.lock"), timeout=300)
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
    storage = _storage(study)
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
    from optuna.trial import TrialState
    from sqlalchemy.exc import OperationalError  # optuna's storage layer: already imported with it

    p, entry = study.cfg.protocol, study.cfg.optimizers[opt]
    points = qmc_points(entry, p.trials, study.cfg.seed, p.sampler)
    ost = _optuna_study(study, opt, points)
    started = time.time()

    def objective(trial):
        k = trial.user_attrs.get("k", trial.number if p.sampler == "tpe" else None)
        if k is None:  # the queue emptied between this worker's look and its ask: nothing to run
            trial.set_user_attr("spare", True)
            raise optuna.TrialPruned("no enqueued trial left")
        trial.set_user_attr("k", k)
        params = {n: trial.suggest_float(n, r.low, r.high, log=r.log) for n, r in sorted(entry.search.items())}
        done = len(_finished_trials(study, opt))
        elapsed = time.time() - started
        eta = f", ~{elapsed / done * (p.trials - done) / 60:.0f} min left for {opt}" if done else ""
        log.info("trial %d/%d of %s: %s%s", k + 1, p.trials, opt, _fmt_params(params), eta)
        try:
            rec = run_trial(study, opt, k, params)
        except _TrialTakenElsewhere as e:  # a copy queued again while its first worker still runs it
            # keep it queued until that worker lets go of the claim (finished: its trial.json is read back,
            # not trained again; killed: the claim is freed with the process and the trial runs here), so
            # that no worker leaves the loop, and picks its finals, with this trial unfinished
            log.info("%s; waiting for it", e)
            trial.set_user_attr("spare", True)
            ost.enqueue_trial(params, user_attrs={"k": k})
            time.sleep(HEARTBEAT_S / 2)  # not a busy loop on the storage
            raise optuna.TrialPruned(str(e)) from None
        return rec["score"]

    while True:
        optuna.storages.fail_stale_trials(ost)  # a killed worker's trial: FAIL, then enqueued again below
        _requeue_failed(ost)
        if p.sampler == "tpe":
            if len([t for t in ost.trials if t.state == TrialState.COMPLETE]) >= p.trials:
                break
        elif not ost.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            if not ost.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                break
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
    return _finished_trials(study, opt)


class _TrialTakenElsewhere(Exception):
    """The trial popped is being run by another worker, which holds its claim."""


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


def run_trial(study: Study, opt: str, k: int, params: dict) -> dict:
    """One trial: train on the training rows for the trial budget, score the tuning split (trial.json)."""
    from filelock import FileLock, Timeout

    out = study.trial_dir(opt, k)
    out.parent.mkdir(parents=True, exist_ok=True)
    h = study._run_hash("trial", opt, params, study.cfg.seed, study.cfg.protocol.trial_max_steps)
    lock = FileLock(str(out.parent / f".trial-{k}.claim"))  # not .lock: the run folder's own lock
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise _TrialTakenElsewhere(f"trial {k} of {opt} is being run by another worker (lock {lock.lock_file})") \
            from None
    try:
        rec = _read_json(out / "trial.json")
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
        _track(study, "trial", opt, rec, out)
        log.info("trial %d of %s: tuning accuracy %.4f (n=%d), best step %s of %d; %.1fs steps + %.1fs tuning-loss "
                 "evaluations and checkpoints, %.1fs scoring, %.1fs fixed overhead", k + 1, opt, rec["score"],
                 info["n"], info["best_step"], info["steps"], info["train_seconds"] - info["in_loop_eval_s"],
                 info["in_loop_eval_s"], info["eval_seconds"], info["overhead_s"])
        return rec
    finally:
        lock.release()


def _finished_trials(study: Study, opt: str) -> dict[int, dict]:
    out = {}
    for k in range(study.cfg.protocol.trials):
        rec = _read_json(study.trial_dir(opt, k) / "trial.json")
        if rec is not None and rec.get("state") in ("complete", "diverged"):
            out[k] = rec
    return out


def best_trial(study: Study, opt: str) -> dict:
    trials = _finished_trials(study, opt)
    if len(trials) < study.cfg.protocol.trials:
        missing = sorted(set(range(study.cfg.protocol.trials)) - set(trials))
        raise UserError(f"{opt}: trials {missing} have not finished", "Run the train phase again: it resumes them.")
    complete = [r for r in trials.values() if r["state"] == "complete"]
    if not complete:
        raise UserError(f"{opt}: every one of its {len(trials)} trials diverged",
                        f"Lower the learning-rate range of {opt} in the study config (optimizers.{opt}.search).")
    return max(complete, key=lambda r: (r["score"], -(r["tune_loss"] or 0), -r["k"]))


# ----------------------------------------------------------------------------- finals

def final_hash(study: Study, opt: str, params: dict, seed: int) -> str:
    return study._run_hash("final", opt, params, seed, study.cfg.protocol.final_max_steps)


def run_final(study: Study, opt: str, seed: int, best: dict) -> dict:
    out = study.final_dir(opt, seed)
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
        _track(study, "final", opt, {"optimizer": opt, "from_trial": best["k"], **info}, out)
        log.info("final %s seed %d: accuracy %.4f (n=%d), best step %s of %d, %.3fs/step, optimizer state %.1f MB; "
                 "%.1fs in-loop evaluations and checkpoints, %.1fs scoring, %.1fs fixed overhead", opt, seed,
                 info["accuracy"], info["n"], info["best_step"], info["steps"], info["step_time_s"],
                 info["optimizer_state_bytes"] / 2**20, info["in_loop_eval_s"], info["eval_seconds"],
                 info["overhead_s"])
        return {"accuracy": info["accuracy"]}

    return study.step("final", f"final[{opt}, seed {seed}]", out, final_hash(study, opt, params, seed), work)


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


def train_phase(study: Study, opt: str) -> list:
    """Tuning trials, then the finals of the best trial. With several workers, each final is claimed by one
    (a lock beside its folder); a worker skips finals another one holds and returns them, to wait for them
    once it has nothing else to do (`finish_held`)."""
    from filelock import FileLock, Timeout

    p = study.cfg.protocol
    study.summary()  # the data phase must have finished for this config
    h = study.tune_hash(opt)
    tune_dir = study.cfg.out / "trials" / opt
    study.step("tune", f"tune[{opt}]", tune_dir, h, lambda: {"trials": len(tune(study, opt))})
    best = best_trial(study, opt)
    log.info("%s: best trial %d (%s), tuning accuracy %.4f", opt, best["k"] + 1, _fmt_params(best["params"]),
             best["score"])
    (study.cfg.out / "finals" / opt).mkdir(parents=True, exist_ok=True)
    held = []
    for seed in p.final_seeds:
        claim = FileLock(str(study.cfg.out / "finals" / opt / f".seed-{seed}.claim"))
        try:
            claim.acquire(timeout=0)
        except Timeout:
            log.info("final[%s, seed %d]: being run by another worker", opt, seed)
            held.append((seed, claim))
            continue
        try:
            run_final(study, opt, seed, best)
        finally:
            claim.release()
    return [(opt, seed, claim, best) for seed, claim in held]


def finish_held(study: Study, held: list) -> None:
    """Another worker's finals: wait for each, then take over any it left unfinished (a killed worker)."""
    for opt, seed, claim, best in held:
        with claim:
            run_final(study, opt, seed, best)


# ----------------------------------------------------------------------------- merge, baselines, analysis

def merge_phase(study: Study, opt: str) -> dict:
    from qwen_ft.study.merge import merge_run

    best = best_trial(study, opt)
    usable = [s for s in study.cfg.protocol.final_seeds
              if (_read_json(study.final_dir(opt, s) / "result.json") or {}).get("state") != "diverged"]
    if not usable:
        log.warning("merge[%s]: every final diverged; nothing to merge", opt)
        return {"merged": None}
    seed = usable[0]  # the first seed's final, or the first that did not diverge
    run = study.final_dir(opt, seed)
    h = final_hash(study, opt, best["params"], seed)
    study.require(run, h, "train", opt)
    m = study.cfg.merge

    def work() -> dict:
        report = merge_run(run, study.model_dir(opt), m.dtype, m.verify_samples, m.tolerance, overwrite=True)
        return {"merged_vs_adapter_max_abs_diff": report["merged_vs_adapter_max_abs_diff"]}

    return study.step("merge", f"merge[{opt}]", study.model_dir(opt), markers.digest("merge", h, dataclasses.asdict(m)),
                      work)


BASELINES = {
    "untrained": "the untrained model with the study's prompt and scoring",
    "untrained_loglik_token": "the untrained model, 'Question: ...\\nAnswer: <answer>' (choices not listed), "
                              "each answer's log-likelihood per token",
    "untrained_loglik_char": "the same, per character (lm-evaluation-harness acc_norm)",
}


def eval_phase(study: Study) -> None:
    """Baselines on the same rows as the finals: the untrained model with our prompt, and scored by
    normalized log-likelihood the standard way (lm-evaluation-harness)."""
    for name, description in BASELINES.items():
        folder = study.baseline_dir(name)
        e = study.cfg.eval
        h = markers.digest("baseline", name, study.data_hash(), dataclasses.asdict(e), study.cfg.base.model.model,
                           study.cfg.base.model.max_length)
        study.step("eval", f"baseline[{name}]", folder, h, lambda n=name, d=description, f=folder: _baseline(
            study, n, d, f))


def _baseline(study: Study, name: str, description: str, folder: Path) -> dict:
    import torch

    from qwen_ft.encoding import PromptEncoder
    from qwen_ft.engine import Classifier
    from qwen_ft.precision import inference_dtype, resolve_precision

    e = study.cfg.eval
    rows = study.rows(e.split)
    rows = rows[: e.max_samples] if e.max_samples else rows
    precision = resolve_precision(e.precision)
    model = copy.deepcopy(study.base_model()).to(inference_dtype(precision)).eval()
    if name == "untrained":
        encoder, decode, normalize = study.encoder(), e.decode, e.normalize
    else:
        task = copy.deepcopy(study.task())
        task.extra = {**task.extra, "prompt_style": "plain", "answer_format": "text"}
        if task.name == "multiple_choice":
            task.instruction, task.question_template = "", "Question: {question}"
        else:
            task.question_template = "Question: {question}"
        encoder = PromptEncoder(study.encoder().tok, task, study.cfg.base.model.max_length)
        decode, normalize = "exact", name.rsplit("_", 1)[-1]
    with torch.inference_mode():
        report, predictions = Classifier(model, encoder, precision).evaluate(rows, decode=decode, normalize=normalize,
                                                                             batch_size=e.batch_size)
    report["description"] = description
    write_jsonl(folder / "predictions.jsonl", predictions)
    write_json(folder / "eval.json", report)
    log.info("baseline %s: accuracy %.4f (n=%d)", name, report["accuracy"], report["n"])
    return {"accuracy": report["accuracy"]}


def analysis_phase(study: Study, opts: list[str]) -> dict:
    from qwen_ft.study.report import write_report

    def work() -> dict:
        summary = study.summary()
        info = {"model": study.cfg.base.model.model, "task": summary["task"], "source": summary["source"],
                "labels": summary["labels"], **study.cfg.spec()}
        info["protocol"].update({"tune_rows": summary["sizes"]["tune"],
                                 "trial_budget": _budget(study, study.cfg.protocol.trial_max_steps),
                                 "final_budget": _budget(study, study.cfg.protocol.final_max_steps),
                                 "curve_every": _curve_every(study)})
        info["optimizers"] = {o: info["optimizers"][o] for o in opts}
        write_json(study.cfg.out / "study.json", info)
        return write_report(study.cfg.out) or {}

    return study.step("analysis", "analysis", study.results_dir, study.analysis_hash(opts), work)


def _budget(study: Study, steps: int | None) -> str:
    t = study.cfg.base.train
    return f"{steps} optimizer steps" if steps else f"{t.epochs} epochs"


def run_study(cfg: StudyConfig, phases: list[str] | None = None, only: list[str] | None = None,
              force: bool = False, trust_remote_code: bool = False) -> Study:
    phases = list(phases or PHASES)
    unknown = [p for p in phases if p not in PHASES]
    opts = list(only or cfg.optimizers)
    missing = [o for o in opts if o not in cfg.optimizers]
    if unknown or missing:
        raise UserError(([f"unknown phase(s): {', '.join(unknown)}"] if unknown else [])
                        + ([f"optimizer(s) not in the config: {', '.join(missing)}"] if missing else []),
                        f"Phases: {', '.join(PHASES)}; optimizers in the config: {', '.join(cfg.optimizers)}")
    study = Study(cfg, force, trust_remote_code)
    t0 = time.time()
    p = cfg.protocol
    log.info("study in %s: phases %s; optimizers %s; %d trials each (%s), finals with seeds %s", cfg.out,
             ", ".join(phases), ", ".join(opts), p.trials, p.sampler, p.final_seeds)
    for phase in PHASES:
        if phase not in phases:
            continue
        if phase == "data":
            data_phase(study)
        elif phase == "train":
            held = [h for opt in opts for h in train_phase(study, opt)]
            finish_held(study, held)
        elif phase == "merge":
            for opt in opts:
                merge_phase(study, opt)
        elif phase == "eval":
            eval_phase(study)
        else:
            analysis_phase(study, opts)
    ran = [o for o in study.outcomes if o["status"] == "done"]
    log.info("study finished in %.1fs (%d step(s) run, %d skipped); report: %s", time.time() - t0, len(ran),
             len(study.outcomes) - len(ran), cfg.out / "results" / "report.md")
    return study


# ----------------------------------------------------------------------------- small helpers

def _track(study: Study, kind: str, opt: str, record: dict, run: Path) -> None:
    """The optional experiment tracker (protocol.tracking): one MLflow run per trial and final, local."""
    if study.cfg.protocol.tracking == "mlflow" and dist.is_main():
        from qwen_ft.study.tracking import log_run

        log_run(study.cfg.out, kind, opt, record, run / "metrics.jsonl")


def _cache_record(row: dict) -> dict:
    """A split row in a format the loaders read back unchanged (MMLU-style for multiple choice)."""
    if "choices" in row:
        return {"id": row["id"], "question": row["question"], "options": row["choices"], "answer": row["label"]}
    return {"id": row["id"], "question": row["question"], "label": row["label"]}


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _fmt_params(params: dict) -> str:
    return ", ".join(f"{k}={v:.3g}" for k, v in sorted(params.items())) or "no search parameters"


def _fetch_model(name: str) -> str:
    """The seed's "data & model acquisition": the embedded model is converted, a hub model downloaded."""
    from qwen_ft.models import resolve_model

    path = resolve_model(name)
    if path == name and not Path(name).exists():
        try:
            from huggingface_hub import snapshot_download

            path = snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model",
                                                           "*.tiktoken", "*.jinja"])
        except Exception as e:  # the training phase will report it again, with its own hint
            raise UserError(f"could not download {name}: {type(e).__name__}: {e}",
                            "Offline? Use a local model folder or 'smollm2-135m'; a mirror: export HF_ENDPOINT=...")\
                from None
    return str(path)
