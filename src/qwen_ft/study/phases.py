"""The study's phases: data -> train (tuning trials, then finals) -> merge -> eval (baselines) -> analysis.

The protocol is the same for every optimizer (MLCommons AlgoPerf's external tuning, Choi et al. 2019):
the same number of trials drawn quasirandomly over each optimizer's declared search space, each trial
scored on a tuning split carved from the training data (never on the validation set that reports the
result), checkpoints selected on that tuning split, then the best trial of each optimizer re-run with
several seeds on the full budget and scored on the validation set.

All runs happen in this process with the base model loaded once: each run trains a fresh LoRA on a copy
of it (the same weights and seed as a fresh process), the tokenized splits are computed once, and a run
whose marker matches is not repeated. Several workers (`qwen-ft study` started N times, on one machine or
many sharing the Optuna storage and the study folder) split the trials (study/protocol.py). Runs are
trained and scored by study/trials.py; the study folder's layout and its reader are study/load.py.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from qwen_ft import distributed as dist
from qwen_ft.config import without_later_data_fields
from qwen_ft.errors import UserError
from qwen_ft.outputs import write_json, write_jsonl
from qwen_ft.study import markers
from qwen_ft.study.config import PHASES, StudyConfig
from qwen_ft.study.load import MARKER, SPLITS, StudyFolder, read_marker
from qwen_ft.study.protocol import chosen_trial, fmt_params, tune
from qwen_ft.study.trials import curve_every, run_final, score_baseline

log = logging.getLogger(__name__)

REPORT_VERSION = 3  # bump when the analysis outputs change shape, so that old reports are redrawn


@dataclass
class Study:
    cfg: StudyConfig
    force: bool = False
    trust_remote_code: bool = False
    outcomes: list[dict] = field(default_factory=list)
    _cache: dict = field(default_factory=dict)

    @property
    def folder(self) -> StudyFolder:
        return StudyFolder(self.cfg.out)

    # ------------------------------------------------------------------ config hashes
    def data_hash(self) -> str:
        c = self.cfg
        return markers.digest("data", without_later_data_fields(dataclasses.asdict(c.base.data)), c.seed,
                              c.base.model.model, c.protocol.tune_rows)

    def run_hash(self, kind: str, opt: str, params: dict, seed: int, budget: int | None) -> str:
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
        return markers.digest("tune", self.run_hash("trial", opt, {}, self.cfg.seed, p.trial_max_steps),
                              p.trials, p.sampler)

    def final_hash(self, opt: str, params: dict, seed: int) -> str:
        return self.run_hash("final", opt, params, seed, self.cfg.protocol.final_max_steps)

    def analysis_hash(self, opts: list[str]) -> str:
        f = self.folder
        finals = {o: [read_marker(f.final_dir(o, s)) for s in self.cfg.protocol.final_seeds] for o in opts}
        base = [read_marker(f.baseline_dir(n)) for n in BASELINES]
        return markers.digest("analysis", REPORT_VERSION, finals, base, self.cfg.spec())

    # ------------------------------------------------------------------ in-process state, loaded once
    def summary(self) -> dict:
        self.require(self.folder.data_dir, self.data_hash(), "data")
        return self.folder.summary()

    def rows(self, split: str) -> list[dict]:
        """A split's rows, read back through the same loader `qwen-ft train` uses on these files."""
        if split not in self._cache.setdefault("rows", {}):
            self._cache["rows"][split] = self.folder.split_rows(split, self.summary()["task"])
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

    def encode_cache(self) -> dict:
        """Tokenized rows shared by every run of this process (the splits are the same for all)."""
        return self._cache.setdefault("enc", {})

    # ------------------------------------------------------------------ bookkeeping
    def require(self, folder: Path, config_hash: str, phase: str, opt: str | None = None) -> None:
        if not markers.matches(folder, config_hash):
            what = f"the {phase} phase" + (f" for {opt}" if opt else "")
            raise UserError(f"{what} has not finished for this config (no matching {folder / MARKER})",
                            f"Run it first: qwen-ft study --config FILE --phases {phase}"
                            + (f" --optimizers {opt}" if opt else ""))

    def step(self, phase: str, name: str, folder: Path, config_hash: str, work: Callable[[], dict]) -> dict:
        """Skip when the marker matches (unless forced); else run `work` and write the marker."""
        if not self.force and markers.matches(folder, config_hash):
            log.info("%-28s skipped: up to date (%s)", name, folder / MARKER)
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
    folder = study.folder.data_dir
    if study.folder.foreign_data():
        raise UserError(f"{folder} holds files that this study did not write (no {MARKER})",
                        "Choose another output_dir for the study, or move those files away.")

    def work() -> dict:
        from qwen_ft.data.prepare import prepare

        _fetch_model(cfg.base.model.model)
        augment = cfg.base.data.augment  # after carving: a row and its noisy copy on the same side
        prepared = prepare(dataclasses.replace(cfg.base.data, augment=None), cfg.seed)
        train, tune_rows = carve_tune(prepared.splits["train"], cfg.protocol.tune_rows, cfg.seed,
                                      stratify=prepared.task.name == "category")
        if augment:
            from qwen_ft.perturb import augment_rows

            train = augment_rows(train, augment, cfg.seed)
        splits = {"train": train, "tune": tune_rows, "validation": prepared.splits["validation"],
                  "test": prepared.splits["test"]}
        markers.clear(folder)
        for name in SPLITS:
            write_jsonl(study.folder.split_path(name), [_cache_record(r) for r in splits[name]])
        from qwen_ft.inference.engine import chance

        sizes = {k: len(v) for k, v in splits.items()}
        write_json(folder / "summary.json", {
            "task": prepared.task.name, "labels": prepared.task.labels, "mapping": prepared.task.to_mapping(),
            "sizes": sizes, "chance": chance(prepared.task, splits["validation"]), "source": cfg.base.data.data,
            "validation_source": cfg.base.data.validation_data, "seed": cfg.seed, "model": cfg.base.model.model,
        })
        ids = {r["id"] for r in tune_rows} & {r["id"] for r in splits["validation"]}
        assert not ids, "tuning rows overlap the validation rows"
        log.info("data: %s; tuning split: %d rows carved from training", prepared.summary(), len(tune_rows))
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


def _cache_record(row: dict) -> dict:
    """A split row in a format the loaders read back unchanged (MMLU-style for multiple choice)."""
    if "choices" in row:
        return {"id": row["id"], "question": row["question"], "options": row["choices"], "answer": row["label"]}
    return {"id": row["id"], "question": row["question"], "label": row["label"]}


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


# ----------------------------------------------------------------------------- train

def train_phase(study: Study, opt: str) -> list:
    """Tuning trials, then the finals of the best trial. With several workers, each final is claimed by one
    (a lock beside its folder); a worker skips finals another one holds and returns them, to wait for them
    once it has nothing else to do (`finish_held`)."""
    from filelock import FileLock, Timeout

    p = study.cfg.protocol
    study.summary()  # the data phase must have finished for this config
    h = study.tune_hash(opt)
    study.step("tune", f"tune[{opt}]", study.folder.trials_dir(opt), h, lambda: {"trials": len(tune(study, opt))})
    best = chosen_trial(study, opt)
    log.info("%s: best trial %d (%s), tuning accuracy %.4f", opt, best["k"] + 1, fmt_params(best["params"]),
             best["score"])
    finals = study.folder.finals_dir(opt)
    finals.mkdir(parents=True, exist_ok=True)
    held = []
    for seed in p.final_seeds:
        claim = FileLock(str(finals / f".seed-{seed}.claim"))
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
    from qwen_ft.merge import merge_run

    best = chosen_trial(study, opt)
    usable = [s for s in study.cfg.protocol.final_seeds
              if (study.folder.result(opt, s) or {}).get("state") != "diverged"]
    if not usable:
        log.warning("merge[%s]: every final diverged; nothing to merge", opt)
        return {"merged": None}
    seed = usable[0]  # the first seed's final, or the first that did not diverge
    run = study.folder.final_dir(opt, seed)
    h = study.final_hash(opt, best["params"], seed)
    study.require(run, h, "train", opt)
    m = study.cfg.merge
    model_dir = study.folder.model_dir(opt)

    def work() -> dict:
        report = merge_run(run, model_dir, m.dtype, m.verify_samples, m.tolerance, overwrite=True)
        return {"merged_vs_adapter_max_abs_diff": report["merged_vs_adapter_max_abs_diff"]}

    return study.step("merge", f"merge[{opt}]", model_dir, markers.digest("merge", h, dataclasses.asdict(m)), work)


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
        folder = study.folder.baseline_dir(name)
        e = study.cfg.eval
        h = markers.digest("baseline", name, study.data_hash(), dataclasses.asdict(e), study.cfg.base.model.model,
                           study.cfg.base.model.max_length)
        study.step("eval", f"baseline[{name}]", folder, h, lambda n=name, d=description, f=folder: score_baseline(
            study, n, d, f))


def analysis_phase(study: Study, opts: list[str]) -> dict:
    from qwen_ft.study.report import write_report

    def work() -> dict:
        summary = study.summary()
        info = {"model": study.cfg.base.model.model, "task": summary["task"], "source": summary["source"],
                "labels": summary["labels"], **study.cfg.spec()}
        info["protocol"].update({"tune_rows": summary["sizes"]["tune"],
                                 "trial_budget": _budget(study, study.cfg.protocol.trial_max_steps),
                                 "final_budget": _budget(study, study.cfg.protocol.final_max_steps),
                                 "curve_every": curve_every(study)})
        info["optimizers"] = {o: info["optimizers"][o] for o in opts}
        write_json(study.folder.spec_path, info)
        return write_report(study.cfg.out) or {}

    return study.step("analysis", "analysis", study.folder.results_dir, study.analysis_hash(opts), work)


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
             len(study.outcomes) - len(ran), study.folder.results_dir / "report.md")
    return study
