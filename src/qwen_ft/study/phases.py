"""The study's phases: data -> train (x optimizers) -> merge -> eval -> analysis.

Each phase is a function of the study, writes its outputs and then a `phase.json` marker holding the
hash of the config that produced them (see markers.py). A re-run skips phases whose marker matches,
`force` redoes them, and an interrupted training resumes from its last checkpoint.

Study folder layout (`output_dir`):
    data/{train,validation,test}.jsonl, summary.json      the seeded splits every optimizer trains on
    experiments/<optimizer>/                              `qwen-ft train` run folders
    models/<optimizer>/                                   merged standalone models (safetensors)
    results/eval/<optimizer>/eval.json, predictions.jsonl accuracy, CI, speed, memory
    results/results.csv, report.md, *.png                 the comparison
    notebooks/analysis.ipynb                              re-draws the plots from the files above
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
from qwen_ft.config import DataArgs
from qwen_ft.errors import UserError
from qwen_ft.runs import RunDir, read_jsonl, write_json, write_jsonl
from qwen_ft.study import markers
from qwen_ft.study.config import PHASES, StudyConfig
from qwen_ft.study.resources import PeakMemory

log = logging.getLogger(__name__)

REPORT_VERSION = 2  # bump when the analysis outputs change shape, so that old reports are redrawn
SPLITS = ("train", "validation", "test")


@dataclass
class Study:
    cfg: StudyConfig
    force: bool = False
    outcomes: list[dict] = field(default_factory=list)

    # ------------------------------------------------------------------ folders
    @property
    def data_dir(self) -> Path:
        return self.cfg.out / "data"

    def run_dir(self, opt: str) -> Path:
        return self.cfg.out / "experiments" / opt

    def model_dir(self, opt: str) -> Path:
        return self.cfg.out / "models" / opt

    def eval_dir(self, opt: str) -> Path:
        return self.cfg.out / "results" / "eval" / opt

    @property
    def results_dir(self) -> Path:
        return self.cfg.out / "results"

    # ------------------------------------------------------------------ config hashes
    def data_hash(self) -> str:
        c = self.cfg
        return markers.digest("data", dataclasses.asdict(c.data), c.seed, c.model.model)

    def train_user(self, opt: str) -> dict:
        """`run_train` keys for one optimizer: shared config + overrides, reading the cached splits."""
        user = {k: v for k, v in self.cfg.optimizer_user(opt).items() if not k.startswith("data.")}
        summary = self.data_summary()
        user.update({
            "data.data": str(self.data_dir / "train.jsonl"),
            "data.validation_data": str(self.data_dir / "validation.jsonl"),
            "data.task": summary["task"], "data.test_fraction": 0.0, "data.answer_format": self.cfg.data.answer_format,
            "train.output_dir": str(self.run_dir(opt)),
        })
        for key in ("instruction", "question_template"):
            if getattr(self.cfg.data, key) is not None:
                user[f"data.{key}"] = getattr(self.cfg.data, key)
        if self.cfg.val_loss_samples is not None:
            user["data.max_validation_samples"] = self.cfg.val_loss_samples
        return user

    def train_hash(self, opt: str) -> str:
        user = {k: v for k, v in self.cfg.optimizer_user(opt).items() if not k.startswith("data.")}
        entry = self.cfg.optimizers[opt] or {}
        return markers.digest("train", self.data_hash(), user, entry, self.cfg.val_loss_samples)

    def merge_hash(self, opt: str) -> str:
        return markers.digest("merge", self.train_hash(opt), dataclasses.asdict(self.cfg.merge))

    def eval_hash(self, opt: str) -> str:
        return markers.digest("eval", self.merge_hash(opt), dataclasses.asdict(self.cfg.eval))

    def analysis_hash(self, opts: list[str]) -> str:
        return markers.digest("analysis", REPORT_VERSION, {o: self.eval_hash(o) for o in opts})

    # ------------------------------------------------------------------ helpers
    def data_summary(self) -> dict:
        self.require(self.data_dir, self.data_hash(), "data")
        import json

        return json.loads((self.data_dir / "summary.json").read_text())

    def split_rows(self, name: str) -> list[dict]:
        from qwen_ft.data.prepare import load_rows

        summary = self.data_summary()
        path = self.data_dir / f"{name}.jsonl"
        if not read_jsonl(path):
            return []
        return load_rows(str(path), summary["task"], DataArgs(), name)[1]

    def require(self, folder: Path, config_hash: str, phase: str, opt: str | None = None) -> None:
        if not markers.matches(folder, config_hash):
            what = f"the {phase} phase" + (f" for {opt}" if opt else "")
            raise UserError(f"{what} has not finished for this config (no matching {folder / markers.MARKER})",
                            f"Run it first: qwen-ft study --config FILE --phases {phase}"
                            + (f" --optimizers {opt}" if opt else ""))

    def step(self, phase: str, opt: str | None, folder: Path, config_hash: str, work: Callable[[], dict]) -> dict:
        """Skip when the marker matches (unless forced); else run `work` and write the marker."""
        name = phase + (f"[{opt}]" if opt else "")
        if not self.force and markers.matches(folder, config_hash):
            log.info("%-20s skipped: up to date (%s)", name, folder / markers.MARKER)
            outcome = {"phase": phase, "optimizer": opt, "status": "skipped", "seconds": 0.0}
        else:
            log.info("%-20s running -> %s", name, folder)
            gc.collect()
            t0 = time.time()
            info = work() or {}
            seconds = time.time() - t0
            if dist.is_main():
                markers.write(folder, phase, config_hash, seconds, optimizer=opt, **info)
            log.info("%-20s done in %.1fs", name, seconds)
            outcome = {"phase": phase, "optimizer": opt, "status": "done", "seconds": round(seconds, 2)}
        self.outcomes.append(outcome)
        return outcome


# ----------------------------------------------------------------------------- phases

def data_phase(study: Study) -> dict:
    """Load, sample and split (seeded) once; cache the splits every optimizer trains and is scored on."""
    cfg = study.cfg

    def work() -> dict:
        from qwen_ft.data.prepare import prepare

        model_path = _fetch_model(cfg.model.model)
        prepared = prepare(cfg.data, cfg.seed)
        markers.clear(study.data_dir)
        for name in SPLITS:
            write_jsonl(study.data_dir / f"{name}.jsonl", [_cache_record(r) for r in prepared.splits[name]])
        sizes = {k: len(v) for k, v in prepared.splits.items()}
        write_json(study.data_dir / "summary.json", {
            "task": prepared.task.name, "labels": prepared.task.labels, "sizes": sizes,
            "source": cfg.data.data, "validation_source": cfg.data.validation_data, "seed": cfg.seed,
            "model": cfg.model.model, "model_path": model_path,
        })
        log.info("data: %s", prepared.summary())
        return {"sizes": sizes}

    return study.step("data", None, study.data_dir, study.data_hash(), work)


def train_phase(study: Study, opt: str) -> dict:
    """One `qwen-ft train` run: same data, seed, order and budget for every optimizer."""
    out = study.run_dir(opt)

    def work() -> dict:
        from qwen_ft.commands.train import resolve_config, run_train  # Trainer imports: only when training
        from qwen_ft.config import config_hash

        user = study.train_user(opt)
        resume = False
        if out.exists() and not study.force and (out / "run.json").is_file() and not RunDir(out).complete:
            saved = (out / "config.hash").read_text().strip() if (out / "config.hash").is_file() else None
            has_ckpt = any((out / "checkpoints").glob("checkpoint-*"))
            resume = has_ckpt and saved == config_hash(resolve_config(user).config)
            log.info("train[%s]: %s", opt, "resuming the unfinished run from its last checkpoint" if resume
                     else "the unfinished run cannot be resumed (no checkpoint or another config): starting over")
        with PeakMemory() as mem:
            try:
                run_train(user, resume=resume, overwrite=not resume)
            except UserError as e:
                if "interrupted" not in e.message:
                    raise
                raise UserError(e.problems, "Run the same study command again: it resumes from that checkpoint.")\
                    from None
        final = _final_record(out)
        return {"resumed": resume, **mem.result(), "train_time_s": final.get("train_time_s")}

    return study.step("train", opt, out, study.train_hash(opt), work)


def merge_phase(study: Study, opt: str) -> dict:
    from qwen_ft.study.merge import merge_run

    study.require(study.run_dir(opt), study.train_hash(opt), "train", opt)
    m = study.cfg.merge

    def work() -> dict:
        report = merge_run(study.run_dir(opt), study.model_dir(opt), m.dtype, m.verify_samples, m.tolerance,
                           overwrite=True)
        return {"merged_vs_adapter_max_abs_diff": report["merged_vs_adapter_max_abs_diff"]}

    return study.step("merge", opt, study.model_dir(opt), study.merge_hash(opt), work)


def eval_phase(study: Study, opt: str) -> dict:
    from qwen_ft.metrics import write_confusion
    from qwen_ft.precision import resolve_precision
    from qwen_ft.study.evaluate import evaluate
    from qwen_ft.study.merge import load_merged

    study.require(study.model_dir(opt), study.merge_hash(opt), "merge", opt)
    e = study.cfg.eval
    out = study.eval_dir(opt)

    def work() -> dict:
        rows = study.split_rows(e.split)
        if not rows:
            raise UserError(f"the {e.split} split of the study is empty", "Set eval.split to validation.")
        rows = rows[: e.max_samples] if e.max_samples else rows
        precision = resolve_precision(e.precision)
        with PeakMemory() as mem:
            model, encoder = load_merged(study.model_dir(opt), precision)
            report, predictions = evaluate(model, encoder, rows, e.batch_size, e.free_decode, e.decode)
        report.update({"optimizer": opt, "split": e.split, "precision": precision, "model_dir":
                       str(study.model_dir(opt)), **mem.result()})
        out.mkdir(parents=True, exist_ok=True)
        write_jsonl(out / "predictions.jsonl", predictions)
        write_confusion([r["label"] for r in rows], [p["pred"] for p in predictions], encoder.task.labels, out)
        write_json(out / "eval.json", report)
        return {"accuracy": report["accuracy"]}

    return study.step("eval", opt, out, study.eval_hash(opt), work)


def analysis_phase(study: Study, opts: list[str]) -> dict:
    """results.csv, plots, report.md and the notebook, over every optimizer whose eval is up to date."""
    from qwen_ft.study.report import write_report

    done = [o for o in study.cfg.optimizers if markers.matches(study.eval_dir(o), study.eval_hash(o))]
    missing = [o for o in opts if o not in done]
    if missing:
        raise UserError(f"the eval phase has not finished for: {', '.join(missing)}",
                        f"Run it first: qwen-ft study --config FILE --phases eval --optimizers {' '.join(missing)}")
    return study.step("analysis", None, study.results_dir, study.analysis_hash(done),
                      lambda: write_report(study, done))


def run_study(cfg: StudyConfig, phases: list[str] | None = None, only: list[str] | None = None,
              force: bool = False) -> Study:
    phases = list(phases or PHASES)
    unknown = [p for p in phases if p not in PHASES]
    opts = list(only or cfg.optimizers)
    missing = [o for o in opts if o not in cfg.optimizers]
    if unknown or missing:
        raise UserError(([f"unknown phase(s): {', '.join(unknown)}"] if unknown else [])
                        + ([f"optimizer(s) not in the config: {', '.join(missing)}"] if missing else []),
                        f"Phases: {', '.join(PHASES)}; optimizers in the config: {', '.join(cfg.optimizers)}")
    study = Study(cfg, force)
    t0 = time.time()
    log.info("study in %s: phases %s, optimizers %s (seed %d)", cfg.out, ", ".join(phases), ", ".join(opts),
             cfg.seed)
    for phase in PHASES:
        if phase not in phases:
            continue
        if phase == "data":
            data_phase(study)
        elif phase == "analysis":
            analysis_phase(study, opts)
        else:
            fn = {"train": train_phase, "merge": merge_phase, "eval": eval_phase}[phase]
            for opt in opts:
                fn(study, opt)
    ran = sum(o["status"] == "done" for o in study.outcomes)
    log.info("study finished in %.1fs (%d step(s) run, %d skipped); report: %s", time.time() - t0, ran,
             len(study.outcomes) - ran, cfg.out / "results" / "report.md")
    return study


# ----------------------------------------------------------------------------- small helpers

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


def _final_record(run: Path) -> dict:
    import json

    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return next((r for r in reversed(lines) if r.get("type") == "final"), {})
