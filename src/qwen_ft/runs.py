"""The run folder: the only interface between train, validate, test, merge and the study. `RunDir` is the one
reader and writer of its files; how they are written safely (atomically, never through a link, into a locked,
staged folder) is outputs.py's; the checks of what is read are run_checks.py's.

Layout (see README):
    config.yaml            fully resolved training config (config.hash: its digest, for --resume)
    run.json               base model, parameter count, preset, batch sizes, versions, git commit, the SHA-256
                           of the input files and base weights (input_files, base_model_files)
    label_mapping.json     task, labels, prompt template
    split/{train,validation,test}.jsonl   the exact rows of each split
    metrics.jsonl          one line per logging step ("step") and per epoch ("epoch")
    adapter_config.json, adapter_model.safetensors, tokenizer files   (PEFT format)
    checkpoints/           Trainer checkpoints while training (removed when the run completes)
    COMPLETE               written last, atomically; readers refuse a folder without it
    eval/                  outputs of `qwen-ft validate` (eval.json, written last, and predictions.jsonl)
    calibration.json       the temperature fitted by `qwen-ft validate --calibrate` (optional)
    threshold.json         the confidence threshold fitted by `qwen-ft validate --fit-threshold` (optional)
A merged model folder (`qwen-ft merge`) holds the same label_mapping.json, config.yaml and run.json, and merge.json.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from qwen_ft.checkpoints import last_good_checkpoint
from qwen_ft.errors import UserError
from qwen_ft.outputs import (
    MARKER,
    MERGE_MARKER,
    RUN_MARKER,
    WRITER,
    atomic_write_text,
    write_json,
    write_jsonl,
    written_by_us,
)
from qwen_ft.run_checks import (
    ADAPTER_HINT,
    THRESHOLD_HINT,
    check_adapter_files,
    check_mapping_against_splits,
    labels_digest,
    mapping_problems,
    read_json,
)

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
LABELS = "label_mapping.json"
EVAL = "eval.json"  # an eval folder's report, written last: it marks a whole evaluation
PREDICTIONS = "predictions.jsonl"
CALIBRATION = "calibration.json"  # the temperature of `qwen-ft validate --calibrate`
THRESHOLD = "threshold.json"  # the abstention threshold of `qwen-ft validate --fit-threshold`

log = logging.getLogger(__name__)


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_jsonl_tolerant(path: Path) -> list[dict]:
    """Lines of an append-only log; a line torn by a killed writer (the last one) is skipped."""
    if not Path(path).is_file():
        return []
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def read_eval(folder: str | os.PathLike) -> dict | None:
    """An eval folder's eval.json, or None when the folder holds no finished evaluation."""
    path = Path(folder) / EVAL
    return read_json(path, "eval.json is written by `qwen-ft validate`: run it again.") if path.is_file() else None


def write_eval(folder: str | os.PathLike, report: dict, predictions: list[dict] | None = None) -> Path:
    """An eval folder's predictions.jsonl (when given), then its eval.json, each atomically."""
    folder = Path(folder)
    if predictions is not None:
        write_jsonl(folder / PREDICTIONS, predictions)
    write_json(folder / EVAL, report)
    return folder / EVAL


def read_predictions(folder: str | os.PathLike) -> list[dict] | None:
    """An eval folder's predictions.jsonl (a torn last line skipped), or None when it has none."""
    path = Path(folder) / PREDICTIONS
    return read_jsonl_tolerant(path) if path.is_file() else None


class RunDir:
    """A run folder, or a merged model folder: each of its files is read (and checked) and written here."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @property
    def complete(self) -> bool:
        return (self.path / MARKER).is_file()

    @property
    def started(self) -> bool:
        """Training wrote this folder's run.json (finished or not)."""
        return (self.path / RUN_MARKER).is_file()

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def mark_complete(self, info: dict) -> None:
        write_json(self.path / MARKER, info)

    def split_path(self, name: str) -> Path:
        return self.path / "split" / f"{name}.jsonl"

    def has_split(self, name: str) -> bool:
        return self.split_path(name).is_file()

    def split(self, name: str) -> list[dict]:
        path = self.split_path(name)
        if not path.is_file():
            raise UserError(f"run folder {self.path} has no {name} split (split/{name}.jsonl)")
        return read_jsonl(path)

    def label_mapping(self, check_splits: bool = True) -> dict:
        """label_mapping.json, checked: its shape, and its labels against the rows of the run's split files
        (an edited mapping would otherwise score every row as wrong)."""
        path = self.path / LABELS
        hint = "label_mapping.json is written by `qwen-ft train`; restore the original or retrain the run."
        data = self._json(path, hint)
        problems = mapping_problems(data)
        if problems:
            raise UserError([f"{path}: {p}" for p in problems], hint)
        self._check_labels_digest(data, path, hint)
        if check_splits:
            self._check_mapping_against_splits(data, path, hint)
        return data

    def write_split(self, name: str, rows: list[dict]) -> None:
        write_jsonl(self.split_path(name), rows)

    def write_label_mapping(self, mapping: dict) -> None:
        write_json(self.path / LABELS, mapping)

    def _check_labels_digest(self, mapping: dict, path: Path, hint: str) -> None:
        """The label set recorded at training (run.json) or merge (merge.json): a renamed or reordered label
        would otherwise answer labels the model never learned, in folders without split files."""
        for marker in (RUN_MARKER, MERGE_MARKER):
            try:
                recorded = json.loads((self.path / marker).read_text(encoding="utf-8")).get("labels_sha256")
            except (OSError, UnicodeDecodeError, ValueError, AttributeError):
                continue
            if recorded is not None and recorded != labels_digest(mapping["labels"]):
                raise UserError(f"{path}: its labels are not the ones the model was trained on ({marker} records "
                                "another label set)", hint)

    def _check_mapping_against_splits(self, mapping: dict, path: Path, hint: str) -> None:
        seen: dict[str, set[str]] = {}
        most_choices = 0
        for name in ("train", "validation", "test"):
            split = self.split_path(name)
            if split.is_file():
                rows = self._jsonl(split, hint)
                seen[name] = {str(row.get("label")) for row in rows}
                most_choices = max([most_choices, *(len(row.get("choices") or ()) for row in rows)])
        check_mapping_against_splits(mapping, seen, most_choices, path, hint)

    def config(self):
        """config.yaml as a TrainConfig (checked: unknown keys and bad values are one UserError)."""
        import yaml

        from qwen_ft.config import TrainConfig

        path = self.path / CONFIG
        if not path.is_file():
            raise UserError(f"{self.path} has no config.yaml", "Pass a run folder or a folder written by qwen-ft merge.")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, yaml.YAMLError) as e:
            raise UserError(f"{path} is not valid YAML: {str(e)[:200]}", "Restore it from the run, or retrain.") from None
        if not isinstance(data, dict):
            raise UserError(f"{path} is not a YAML mapping", "Restore it from the run, or retrain.")
        return TrainConfig.from_dict(data, "config.yaml")

    def write_config(self, cfg) -> None:
        """config.yaml, and config.hash (its digest: --resume refuses other settings)."""
        from qwen_ft.config import config_hash, save_yaml

        save_yaml(cfg, self.path / CONFIG)
        (self.path / "config.hash").write_text(config_hash(cfg) + "\n")

    def config_digest(self) -> str | None:
        """config.hash as written with config.yaml, or None when there is none."""
        path = self.path / "config.hash"
        return path.read_text().strip() if path.is_file() else None

    def metrics(self) -> list[dict]:
        """metrics.jsonl's records (a line torn by a killed writer is skipped)."""
        return read_jsonl_tolerant(self.path / METRICS)

    def final_metrics(self) -> dict | None:
        """metrics.jsonl's "final" record (time, tokens/s, memory), or None for an unfinished run."""
        finals = [m for m in self.metrics() if m.get("type") == "final"]
        return finals[-1] if finals else None

    def append_metrics(self, record: dict) -> None:
        """One record at the end of metrics.jsonl (an append-only log: a kill tears at most its last line)."""
        with open(self.path / METRICS, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def write_metrics(self, records: list[dict]) -> None:
        """metrics.jsonl replaced by `records` (a new run: none; a resumed one: those up to its checkpoint)."""
        atomic_write_text(self.path / METRICS, "".join(json.dumps(r) + "\n" for r in records))

    def info(self) -> dict:
        return self._json(self.path / RUN_MARKER, "run.json is written by `qwen-ft train`; retrain the run.")

    def recorded(self, key: str):
        """A key of run.json; None without run.json (merged folders copy it) or without the key (older runs)."""
        return self.info().get(key) if self.started else None

    def warn_if_data_changed(self, what: str) -> None:
        """A warning for each data file whose content differs from the one the run was trained on."""
        from qwen_ft.provenance import data_changes

        for level, line in data_changes(self.recorded("input_files")):
            log.log(level, "%s: %s", what, line)

    def write_info(self, info: dict) -> None:
        """run.json (its "written_by" is outputs.written_by_us's proof that the folder is ours)."""
        write_json(self.path / RUN_MARKER, info)

    def write_merge_info(self, report: dict) -> None:
        """merge.json, written last: it marks a whole merged folder."""
        write_json(self.path / MERGE_MARKER, {"written_by": WRITER, **report})

    def eval_dir(self, where: str | os.PathLike = "eval") -> Path:
        """An eval folder: a name inside the run (text, e.g. "eval-test"), or any folder (a Path)."""
        return Path(where) if isinstance(where, os.PathLike) else self.path / where

    def eval(self, where: str | os.PathLike = "eval") -> dict | None:
        """The eval.json of an eval folder (see `eval_dir`), or None when it holds no finished evaluation."""
        return read_eval(self.eval_dir(where))

    def write_eval(self, where: str | os.PathLike, report: dict, predictions: list[dict] | None = None) -> Path:
        """An eval folder's predictions.jsonl (when given) and eval.json (last); returns eval.json's path."""
        return write_eval(self.eval_dir(where), report, predictions)

    def start_eval(self, where: str | os.PathLike) -> Path:
        """The eval folder, made, without its eval.json: a failed evaluation leaves no report behind."""
        folder = self.eval_dir(where)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / EVAL).unlink(missing_ok=True)
        return folder

    def predictions(self, where: str | os.PathLike = "eval") -> list[dict] | None:
        """An eval folder's predictions.jsonl (a torn last line skipped), or None when it has none."""
        return read_predictions(self.eval_dir(where))

    def write_predictions(self, where: str | os.PathLike, rows: list[dict]) -> Path:
        """predictions.jsonl alone (an evaluation with no report, such as a diverged study final)."""
        write_jsonl(self.eval_dir(where) / PREDICTIONS, rows)
        return self.eval_dir(where) / PREDICTIONS

    def write_model_card(self, refresh: bool = False) -> Path | None:
        """README.md, a Hugging Face model card from the run's own files (`model_card.render`). `refresh`
        (validate): only a card qwen-ft wrote is replaced, never a README the user put there."""
        from qwen_ft import model_card

        path = self.path / "README.md"
        if refresh and path.is_file() and model_card.MARKER not in path.read_text(encoding="utf-8", errors="replace"):
            return None
        evals = {}
        for found in sorted(self.path.glob("eval*/" + EVAL)):
            try:
                evals[found.parent.name] = read_eval(found.parent)
            except UserError as e:  # a broken eval folder leaves the card, not the command
                log.warning("model card: %s left out (%s)", found, e.message)
        cfg = self.config()
        text = model_card.render(self.info(), self.label_mapping(check_splits=False), cfg.data.data,
                                 cfg.data.split_by, evals, self.threshold())
        atomic_write_text(path, text)
        return path

    def calibration(self) -> dict | None:
        """calibration.json (the fitted temperature), checked; None when the folder has none."""
        from qwen_ft.run_checks import check_calibration as check

        path = self.path / CALIBRATION
        if not path.is_file():
            return None
        return check(self._json(path, "calibration.json is written by `qwen-ft validate --calibrate`: run it "
                                      "again, or remove the file."), path)

    def check_calibration_writable(self) -> None:
        """calibration.json may be written: absent, or one that qwen-ft wrote (never another file of that name)."""
        path = self.path / CALIBRATION
        if path.exists() and not written_by_us(self.path, CALIBRATION):
            raise UserError(f"{path} exists and was not written by `qwen-ft validate --calibrate`; it is left as is",
                            "Move it away, then run --calibrate again.")

    def write_calibration(self, data: dict) -> Path:
        """Write calibration.json atomically (temp file + os.replace)."""
        self.check_calibration_writable()
        path = self.path / CALIBRATION
        write_json(path, {"written_by": WRITER, **data})
        return path

    def threshold(self) -> dict | None:
        """threshold.json (the confidence below which predict and serve abstain), checked; None when absent."""
        from qwen_ft.run_checks import check_threshold

        path = self.path / THRESHOLD
        if not path.is_file():
            return None
        return check_threshold(self._json(path, THRESHOLD_HINT), path)

    def check_threshold_writable(self) -> None:
        path = self.path / THRESHOLD
        if path.exists() and not written_by_us(self.path, THRESHOLD):
            raise UserError(f"{path} exists and was not written by `qwen-ft validate --fit-threshold`; it is left "
                            "as is", "Move it away, then run --fit-threshold again.")

    def write_threshold(self, data: dict) -> Path:
        """Write threshold.json atomically (temp file + os.replace)."""
        self.check_threshold_writable()
        path = self.path / THRESHOLD
        write_json(path, {"written_by": WRITER, **data})
        return path

    _json = staticmethod(read_json)

    @staticmethod
    def _jsonl(path: Path, hint: str) -> list[dict]:
        try:
            rows = read_jsonl(path)
        except (UnicodeDecodeError, ValueError) as e:
            raise UserError(f"{path} is not valid JSON lines: {e}", hint) from None
        return [r for r in rows if isinstance(r, dict)]

    def require_complete(self) -> RunDir:
        """For readers: a finished run with an adapter, or one clear error."""
        p = self.path
        if not p.exists():
            raise UserError(f"run folder not found: {p}", "Pass the --output-dir of a finished `qwen-ft train`.")
        if not p.is_dir():
            raise UserError(f"{p} is not a folder", "Pass the --output-dir of a finished `qwen-ft train`.")
        if not (p / "adapter_config.json").is_file():
            if (p / "config.json").is_file():
                raise UserError(f"{p} holds a model but no LoRA adapter (adapter_config.json)",
                                "Pass a run folder written by `qwen-ft train`.")
            if self.started and not self.complete:
                raise UserError(f"run folder {p} is incomplete: its training did not finish",
                                f"Resume it with: qwen-ft train --resume --output-dir {p} (same flags)")
            raise UserError(f"{p} has no LoRA adapter (adapter_config.json)",
                            "Pass a run folder written by `qwen-ft train`.")
        if not self.complete:
            raise UserError(f"run folder {p} is incomplete (no {MARKER} marker): its training did not finish",
                            f"Resume it with: qwen-ft train --resume --output-dir {p} (same flags)")
        if not (p / "adapter_model.safetensors").is_file():  # never fall back to a pickled adapter_model.bin
            raise UserError(f"{p} has no adapter_model.safetensors; only safetensors weights are loaded",
                            "Re-save the adapter with safe_serialization=True, or retrain.")
        check_adapter_files(p)
        self.check_adapter_settings()
        return self

    def check_adapter_settings(self) -> None:
        """adapter_config.json as recorded at training (config.yaml's lora section): an edited rank or alpha, or
        a switched-on variant (DoRA, rsLoRA), would load and silently change every output."""
        lora = self.config().lora
        adapter = self._json(self.path / "adapter_config.json", ADAPTER_HINT)
        want = {"r": lora.rank, "lora_alpha": lora.alpha, "use_dora": False, "use_rslora": False}
        bad = [f"{k} is {adapter.get(k)!r}, trained with {v!r}" for k, v in want.items()
               if v is not None and (adapter.get(k) or False) != v]
        if bad:
            raise UserError(f"{self.path}/adapter_config.json differs from the run's config.yaml: {'; '.join(bad)}",
                            ADAPTER_HINT)

    def last_checkpoint(self) -> Path | None:
        """The newest checkpoint that was written to the end (trainer_state.json is saved last)."""
        return last_good_checkpoint(self.checkpoints)


