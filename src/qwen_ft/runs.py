"""The run folder: the only interface between train, validate, test, merge and the study.

Layout (see README):
    config.yaml            fully resolved training config
    run.json               base model, parameter count, preset, batch sizes, versions, git commit
    label_mapping.json     task, labels, prompt template
    split/{train,validation,test}.jsonl   the exact rows of each split
    metrics.jsonl          one line per logging step ("step") and per epoch ("epoch")
    adapter_config.json, adapter_model.safetensors, tokenizer files   (PEFT format)
    checkpoints/           Trainer checkpoints while training (removed when the run completes)
    COMPLETE               written last, atomically; readers refuse a folder without it
    eval/                  outputs of `qwen-ft validate`
    calibration.json       the temperature fitted by `qwen-ft validate --calibrate` (optional)
    threshold.json         the confidence threshold fitted by `qwen-ft validate --fit-threshold` (optional)
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwen_ft.errors import UserError

log = logging.getLogger(__name__)

MARKER = "COMPLETE"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Every file qwen-ft writes goes through here: a fresh temp file in the same folder (O_EXCL, so never
    through a link), then os.replace, which replaces a symlink at `path` itself and never the file it points
    to. Readers see the old file or the new one, never a half-written one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def save_figure(fig, path: Path, dpi: int = 110) -> None:
    """A matplotlib figure as PNG, written like every other file (savefig would follow a symlink)."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    atomic_write_bytes(path, buf.getvalue())


def output_folder(path: Path, named_by_user: bool) -> Path:
    """A folder the command writes into: refused when it is a symlink that the user did not name (a run folder
    received from someone else could point its eval/ anywhere)."""
    path = Path(path)
    if path.is_symlink() and not named_by_user:
        raise UserError(f"{path} is a symbolic link (to {os.readlink(path)}); qwen-ft does not write through links "
                        "it did not make", "Remove the link, or name the folder you want with --output-dir.")
    return path


def finite(value: Any) -> Any:
    """JSON-safe: NaN and infinities become null (JSON has no such numbers; NaN would make the file invalid)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


@contextmanager
def staged_dir(path: Path) -> Iterator[Path]:
    """Yield a fresh hidden folder beside `path`; on success it replaces `path` whole, else it is removed.

    Readers therefore see either the previous folder or the complete new one, never a half-written one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(finite(data), indent=2, default=str, allow_nan=False) + "\n")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(finite(r), ensure_ascii=False, default=str, allow_nan=False) + "\n"
                                    for r in rows))


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


def env_info() -> dict:
    import importlib.metadata as md

    versions = {}
    for pkg in ("qwen-ft", "torch", "transformers", "peft", "accelerate", "datasets", "pytorch_optimizer"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    return {"written_by": WRITER, "versions": versions, "python": platform.python_version(), "git_commit": git_commit(),
            "platform": platform.platform()}


def git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


class RunDir:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @property
    def complete(self) -> bool:
        return (self.path / MARKER).is_file()

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def mark_complete(self, info: dict) -> None:
        write_json(self.path / MARKER, info)

    def split(self, name: str) -> list[dict]:
        path = self.path / "split" / f"{name}.jsonl"
        if not path.is_file():
            raise UserError(f"run folder {self.path} has no {name} split (split/{name}.jsonl)")
        return read_jsonl(path)

    def label_mapping(self, check_splits: bool = True) -> dict:
        """label_mapping.json, checked: its shape, and its labels against the rows of the run's split files
        (an edited mapping would otherwise score every row as wrong)."""
        path = self.path / "label_mapping.json"
        hint = "label_mapping.json is written by `qwen-ft train`; restore the original or retrain the run."
        data = self._json(path, hint)
        problems = _mapping_problems(data)
        if problems:
            raise UserError([f"{path}: {p}" for p in problems], hint)
        self._check_labels_digest(data, path, hint)
        if check_splits:
            self._check_mapping_against_splits(data, path, hint)
        return data

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
        labels = set(mapping["labels"])
        seen: dict[str, set[str]] = {}
        most_choices = 0
        for name in ("train", "validation", "test"):
            split = self.path / "split" / f"{name}.jsonl"
            if split.is_file():
                rows = self._jsonl(split, hint)
                seen[name] = {str(row.get("label")) for row in rows}
                most_choices = max([most_choices, *(len(row.get("choices") or ()) for row in rows)])
        if not seen:
            return
        every = set().union(*seen.values())
        if mapping["task"] == "multiple_choice":
            want = {chr(ord("A") + i) for i in range(most_choices)}
            if labels != want or not every <= labels:
                raise UserError(f"{path} lists the answers {''.join(sorted(labels))}, but the run's split files "
                                f"have {most_choices} choices ({''.join(sorted(want))})", hint)
            return
        missing = sorted(every - labels)  # prepare() builds the labels from the training rows: they must agree
        extra = sorted(labels - seen["train"]) if "train" in seen else []
        if missing or extra:
            parts = ([f"labels of the split rows missing from it: {', '.join(missing)}"] if missing else []) + \
                    ([f"labels no training row has: {', '.join(extra)}"] if extra else [])
            raise UserError(f"{path} disagrees with the run's split files ({'; '.join(parts)})", hint)

    def config(self):
        """config.yaml as a TrainConfig (checked: unknown keys and bad values are one UserError)."""
        import yaml

        from qwen_ft.config import TrainConfig

        path = self.path / "config.yaml"
        if not path.is_file():
            raise UserError(f"{self.path} has no config.yaml", "Pass a run folder or a folder written by qwen-ft merge.")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, yaml.YAMLError) as e:
            raise UserError(f"{path} is not valid YAML: {str(e)[:200]}", "Restore it from the run, or retrain.") from None
        if not isinstance(data, dict):
            raise UserError(f"{path} is not a YAML mapping", "Restore it from the run, or retrain.")
        return TrainConfig.from_dict(data, "config.yaml")

    def metrics(self) -> list[dict]:
        """metrics.jsonl's records (a line torn by a killed writer is skipped)."""
        return read_jsonl_tolerant(self.path / "metrics.jsonl")

    def final_metrics(self) -> dict | None:
        """metrics.jsonl's "final" record (time, tokens/s, memory), or None for an unfinished run."""
        finals = [m for m in self.metrics() if m.get("type") == "final"]
        return finals[-1] if finals else None

    def info(self) -> dict:
        return self._json(self.path / "run.json", "run.json is written by `qwen-ft train`; retrain the run.")

    def calibration(self) -> dict | None:
        """calibration.json (the fitted temperature), checked; None when the folder has none."""
        from qwen_ft.calibration import check

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
        from qwen_ft.selective import check_threshold

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

    @staticmethod
    def _json(path: Path, hint: str):
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UserError(f"{path} is missing", hint) from None
        except (UnicodeDecodeError, ValueError) as e:
            raise UserError(f"{path} is not valid JSON: {e}", hint) from None

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
            if (p / "run.json").is_file() and not self.complete:
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


def safetensors_header(path: Path) -> dict:
    """The header of a .safetensors file, checked against the file's size (a truncated or damaged file is a
    UserError here, before any loader sees it)."""
    path = Path(path)
    hint = "The file is damaged or was cut short (an interrupted copy or download?): copy it again, or retrain."
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            n = int.from_bytes(raw, "little") if len(raw) == 8 else -1
            if n <= 0 or 8 + n > size:
                raise UserError(f"{path} is not a complete safetensors file ({size} bytes)", hint)
            header = json.loads(f.read(n).decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise UserError(f"{path} is not a valid safetensors file (its header is not JSON)", hint) from None
    if not isinstance(header, dict):
        raise UserError(f"{path} is not a valid safetensors file", hint)
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__" and isinstance(t, dict)
               and isinstance(t.get("data_offsets"), list) and len(t["data_offsets"]) == 2), default=0)
    if 8 + n + end > size:
        raise UserError(f"{path} is truncated: its header describes {8 + n + end} bytes, the file has {size}", hint)
    return header


ADAPTER_HINT = ("adapter_config.json and adapter_model.safetensors are written together by `qwen-ft train`; "
                "restore both from the same run, or retrain.")


def check_adapter_files(folder: Path) -> None:
    """adapter_config.json readable, and its rank the one the weights were saved with."""
    hint = ADAPTER_HINT
    config = RunDir._json(Path(folder) / "adapter_config.json", hint)
    header = safetensors_header(Path(folder) / "adapter_model.safetensors")
    r = config.get("r") if isinstance(config, dict) else None
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise UserError(f"{folder}/adapter_config.json has no valid LoRA rank 'r' (got {r!r})", hint)
    if config.get("rank_pattern"):  # per-module ranks: the loader checks each
        return
    for name, t in header.items():
        shape = t.get("shape") if isinstance(t, dict) else None
        if not shape or len(shape) != 2:
            continue
        saved = shape[0] if ".lora_A." in name else shape[1] if ".lora_B." in name else None
        if saved is not None and saved != r:
            raise UserError(f"{folder}: adapter_config.json says LoRA rank {r}, but the saved weights have rank "
                            f"{saved} ({name})", hint)


def labels_digest(labels: list[str]) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(list(labels), ensure_ascii=False).encode("utf-8")).hexdigest()


def _mapping_problems(data) -> list[str]:
    """What is wrong with the shape of a label mapping (empty when it is usable)."""
    from qwen_ft.tasks import TASKS

    if not isinstance(data, dict):
        return [f"expected a JSON object, got {type(data).__name__}"]
    out = []
    if data.get("task") not in TASKS:
        out.append(f"'task' must be one of {', '.join(TASKS)} (got {data.get('task')!r})")
    labels = data.get("labels")
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) and x.strip() for x in labels):
        out.append("'labels' must be a non-empty list of label texts")
    elif len(set(labels)) != len(labels):
        out.append("'labels' lists a label twice")
    elif "label_to_id" in data and data["label_to_id"] != {lab: i for i, lab in enumerate(labels)}:
        out.append("'label_to_id' does not match 'labels'")
    for key in ("instruction", "question_template"):
        if not isinstance(data.get(key), str):
            out.append(f"'{key}' must be text")
    if not out:
        n = len(labels)
        if "label2id" in data and data["label2id"] != {lab: i for i, lab in enumerate(labels)}:
            out.append("'label2id' does not match 'labels'")
        if "id2label" in data and data["id2label"] != {str(i): lab for i, lab in enumerate(labels)}:
            out.append(f"'id2label' does not match 'labels' (it must map \"0\"..\"{n - 1}\" to them in order)")
        from qwen_ft.tasks.base import template_problem

        fields = {"instruction": ("labels",), "question_template": ("question", "choices")
                  if data["task"] == "multiple_choice" else ("question",)}
        out += [p for key, allowed in fields.items() if (p := template_problem(data[key], key, allowed))]
    return out


def last_good_checkpoint(folder: Path) -> Path | None:
    """Newest `checkpoint-N` in `folder` holding trainer_state.json and safetensors weights.

    A checkpoint cut short by SIGKILL lacks trainer_state.json (the Trainer writes it last) and is skipped.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return None
    found = []
    for d in folder.glob("checkpoint-*"):
        step = d.name.rsplit("-", 1)[-1]
        if d.is_dir() and step.isdigit() and (d / "trainer_state.json").is_file() \
                and any(d.glob("*.safetensors")):
            found.append((int(step), d))
    return max(found)[1] if found else None


def remove_torn_checkpoints(folder: Path, keep: Path | None) -> list[Path]:
    """Delete checkpoints newer than `keep` (half-written by a killed run); returns what was removed."""
    removed = []
    limit = int(keep.name.rsplit("-", 1)[-1]) if keep else -1
    for d in Path(folder).glob("checkpoint-*"):
        step = d.name.rsplit("-", 1)[-1]
        if d.is_dir() and step.isdigit() and int(step) > limit:
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


# ----------------------------------------------------------------------------- output folders
#
# What a command may do with its output folder is decided before anything is written (`plan_output`), and
# the folder is then claimed (`claim_output`): an exclusive lock beside it, the decision re-checked under the
# lock, and for --overwrite the new output built in a hidden staging sibling that replaces the old folder only
# when the command has finished. Only folders that carry our marker are ever replaced or deleted.
#
#   NAME/              the output the user named
#   .NAME.lock         the lock file, holding the holder's pid, host and command (removed on release)
#   .NAME.staging/     the new output of --overwrite, until it is swapped in
#   .NAME.replaced/    the old output during the swap (two renames); removed right after

WRITER = "qwen-ft"
RUN_MARKER = "run.json"  # training runs
MERGE_MARKER = "merge.json"  # merged model folders
CALIBRATION = "calibration.json"  # the temperature of `qwen-ft validate --calibrate`
THRESHOLD = "threshold.json"  # the abstention threshold of `qwen-ft validate --fit-threshold`
THRESHOLD_HINT = "threshold.json is written by `qwen-ft validate --fit-threshold`: run it again, or remove the file."


def written_by_us(folder: Path, marker: str = RUN_MARKER) -> bool:
    """True when `folder/marker` is a marker that qwen-ft wrote (a file of that name alone is not enough)."""
    try:
        data = json.loads((Path(folder) / marker).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    if not isinstance(data, dict):
        return False
    if data.get("written_by") == WRITER:
        return True
    if marker == RUN_MARKER:  # runs written before the marker key: env_info() records qwen-ft's version
        return isinstance(data.get("versions"), dict) and "qwen-ft" in data["versions"] and "base_model" in data
    return marker == MERGE_MARKER and {"source_run", "merged_vs_adapter_max_abs_diff"} <= set(data)


def _sibling(target: Path, suffix: str) -> Path:
    return target.parent / f".{target.name}.{suffix}"


def staging_path(target: Path) -> Path:
    return _sibling(Path(target), "staging")


def lock_path(target: Path) -> Path:
    return _sibling(Path(target), "lock")


def _is_complete(folder: Path, marker: str) -> bool:
    return (folder / MARKER).is_file() if marker == RUN_MARKER else written_by_us(folder, marker)


@dataclass(frozen=True)
class OutputPlan:
    """What to do with an output folder: `mode` new / resume / overwrite; files go to `work` (the target
    itself, or its staging sibling, swapped in by `claim_output` at the end)."""

    target: Path
    mode: str
    work: Path
    resume: bool = False
    overwrite: bool = False
    inputs: tuple = ()
    marker: str = RUN_MARKER
    flag: str = "--output-dir"
    stage_new: bool = False

    @property
    def staged(self) -> bool:
        return self.work != self.target

    def recheck(self) -> OutputPlan:
        return plan_output(self.target, resume=self.resume, overwrite=self.overwrite, inputs=self.inputs,
                           marker=self.marker, flag=self.flag, stage_new=self.stage_new)


def _forms(path: Path) -> set[Path]:
    """The absolute path as written and with symlinks resolved (containment is checked for both)."""
    return {Path(os.path.abspath(path)), path.resolve()}


def _inside(child: set[Path], parent: set[Path]) -> bool:
    return any(p == c or p in c.parents for c in child for p in parent)


def check_output_path(target: Path, inputs: dict[str, str | os.PathLike | None], flag: str = "--output-dir"):
    """Refuse output folders whose replacement would delete or change something that is not ours."""
    target = Path(target).expanduser()
    t = _forms(target)
    hint = f"Choose a new folder for {flag}."
    if any(p == Path(p.anchor) for p in t):
        raise UserError(f"{flag} {target} is the filesystem root", hint)
    for name, where in (("your home folder", Path.home()), ("the current folder", Path.cwd())):
        if _inside(_forms(where), t):
            what = "is" if any(p in _forms(where) for p in t) else "contains"
            raise UserError(f"{flag} {target} {what} {name} ({where})", hint)
    for name, value in inputs.items():
        if not value:
            continue
        path = Path(value).expanduser()
        if not path.exists():  # a hub id or the name of a bundled set: nothing local to protect
            continue
        i = _forms(path)
        if _inside(i, t):
            what = "is" if i & t else "contains"
            raise UserError(f"{flag} {target} {what} the input {name} {value}: writing there would replace it",
                            hint)
        if path.is_dir() and _inside(t, i):
            raise UserError(f"{flag} {target} is inside the input {name} {value}: writing there would change it",
                            hint)


def plan_output(target: str | os.PathLike, *, resume: bool = False, overwrite: bool = False,
                inputs: dict | tuple = (), marker: str = RUN_MARKER, flag: str = "--output-dir",
                stage_new: bool = False) -> OutputPlan:
    """Decide, writing nothing, what to do with an output folder; a UserError names what is refused.

    new: absent or empty. resume: our unfinished run (--resume), or an unfinished --overwrite in staging.
    overwrite: our marker is there (--overwrite): the new output is staged and replaces it at the end.
    `stage_new` stages a new output as well (for outputs that are only ever written whole).
    """
    target = Path(target).expanduser()
    inputs_t = tuple(inputs.items()) if isinstance(inputs, dict) else tuple(inputs)
    plan = functools.partial(OutputPlan, target, resume=resume, overwrite=overwrite, inputs=inputs_t,
                             marker=marker, flag=flag, stage_new=stage_new)
    check_output_path(target, dict(inputs_t), flag)
    if target.exists() and not target.is_dir():
        raise UserError(f"{flag} {target} exists and is a file", f"Choose a folder for {flag}.")
    above = next((p for p in Path(os.path.abspath(target)).parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise UserError(f"{flag} {target}: {above} is a file, not a folder", f"Choose a folder for {flag}.")
    staging = staging_path(target)
    resumable = marker == RUN_MARKER
    if resume and resumable and written_by_us(staging, marker) and not _is_complete(staging, marker):
        return plan("resume", staging)  # an --overwrite that was interrupted: continue it where it is staged
    if not target.exists() or not any(target.iterdir()):
        if resume:
            raise UserError(f"--resume: nothing to resume in {target}", "Drop --resume to start a new run.")
        return plan("new", staging if stage_new else target)
    what = "qwen-ft run" if marker == RUN_MARKER else "merged model folder written by qwen-ft merge"
    if not written_by_us(target, marker):
        raise UserError(f"{flag} {target} is not empty and is not a {what} (no {marker} of ours)",
                        f"Choose an empty or new folder. --overwrite replaces only a {what}, never other files.")
    complete = _is_complete(target, marker)
    if resume and resumable and not complete:
        return plan("resume", target)
    if overwrite:
        return plan("overwrite", staging)
    if complete:
        what_done = "a finished run" if marker == RUN_MARKER else "a merged model"
        raise UserError(f"{target} already holds {what_done}",
                        f"Pass --overwrite to replace it, or choose another {flag}.")
    raise UserError(f"{target} holds an unfinished run", "Pass --resume to continue it, or --overwrite to start over.")


def prepare_output_dir(path: Path, resume: bool, overwrite: bool, inputs: dict | None = None) -> str:
    """The mode of `plan_output` alone ('new', 'resume' or 'overwrite')."""
    return plan_output(path, resume=resume, overwrite=overwrite, inputs=inputs or {}).mode


class OutputLock:
    """One writer per output folder: an exclusive flock on a hidden sibling file (so it works before the folder
    exists and across the staging swap), holding the holder's pid; a second writer gets a UserError naming it.

    fcntl rather than the filelock package: the lock file can then be removed on release without a race (a
    writer that locked a file already unlinked sees that its inode is not the path's and tries again), so no
    lock files are left beside finished runs. The kernel releases the lock when its process dies.
    """

    def __init__(self, target: str | os.PathLike, flag: str = "--output-dir"):
        self.target = Path(target).expanduser()
        self.path = lock_path(self.target)
        self.flag = flag
        self._fd: int | None = None

    def acquire(self) -> OutputLock:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(20):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._holder(fd)
                os.close(fd)
                raise self._busy(holder) from None
            except BaseException:
                os.close(fd)
                raise
            try:
                current = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
            if current:
                break
            os.close(fd)  # the holder removed this file as we opened it: lock the one at the path now
        else:
            raise UserError(f"could not lock {self.path}: other processes keep replacing it", "Run it again.")
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "command": " ".join(sys.argv)}
        try:
            os.ftruncate(fd, 0)
            os.write(fd, (json.dumps(info) + "\n").encode())
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    @staticmethod
    def _holder(fd: int) -> dict:
        try:
            data = json.loads(os.pread(fd, 65536, 0).decode("utf-8") or "{}")
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _busy(self, h: dict) -> UserError:
        who = f"pid {h['pid']}" if h.get("pid") else "pid unknown"
        if h.get("host") and h["host"] != socket.gethostname():
            who += f" on {h['host']}"
        since = f", since {h['started']}" if h.get("started") else ""
        cmd = f": {h['command']}" if h.get("command") else ""
        return UserError(f"{self.target} is being written by another qwen-ft process ({who}{since}){cmd}",
                         f"Wait for it to finish, or choose another {self.flag}. (Its lock is {self.path}, "
                         "released when that process ends.)")

    def release(self) -> None:
        if self._fd is not None:
            try:
                os.unlink(self.path)  # still locked here: a later writer creates and locks a fresh file
            except FileNotFoundError:
                pass
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _remove_ours(folder: Path, marker: str, what: str) -> None:
    """Delete a leftover staging / replaced folder of ours; anything else there is refused, not deleted."""
    if not folder.exists() and not folder.is_symlink():
        return
    if folder.is_symlink() or not folder.is_dir():
        raise UserError(f"{folder} ({what}) is in the way and is not a folder qwen-ft made",
                        "Move or remove it yourself, then run the command again.")
    if any(folder.iterdir()) and not written_by_us(folder, marker):
        raise UserError(f"{folder} ({what}) is in the way and does not carry a {marker} of ours",
                        "Move or remove it yourself, then run the command again.")
    shutil.rmtree(folder)


def _finish_interrupted_swap(target: Path, marker: str) -> bool:
    """A kill between the two renames of a swap leaves the target missing: put the right folder back."""
    replaced, staging = _sibling(target, "replaced"), staging_path(target)
    if target.exists() or not replaced.is_dir() or not written_by_us(replaced, marker):
        return False
    if staging.is_dir() and _is_complete(staging, marker):
        os.replace(staging, target)  # the new output was complete: the swap had been decided
    else:
        os.replace(replaced, target)
    return True


def swap_in(staging: Path, target: Path, marker: str = RUN_MARKER) -> None:
    """Replace `target` by the finished `staging` folder: two renames, the old folder removed last."""
    replaced = _sibling(target, "replaced")
    _remove_ours(replaced, marker, "the folder replaced by an earlier run")
    if target.exists():
        os.replace(target, replaced)
    os.replace(staging, target)
    shutil.rmtree(replaced, ignore_errors=True)


@contextmanager
def claim_output(plan: OutputPlan, keep_failed: bool = True) -> Iterator[OutputPlan]:
    """Lock the output, re-check the plan under the lock, prepare `plan.work`; on success swap it in.

    On failure a staged output is kept for --resume (`keep_failed`) or removed; the target is untouched.
    """
    with OutputLock(plan.target, plan.flag):
        if _finish_interrupted_swap(plan.target, plan.marker):
            log.warning("%s was restored after an interrupted replacement", plan.target)
        fresh = plan.recheck()  # another process may have written it between the plan and the lock
        if (fresh.mode, fresh.work) != (plan.mode, plan.work):
            raise UserError(f"{plan.target} changed while this command was checking its inputs "
                            f"(now: {fresh.mode}, planned: {plan.mode})", "Run the command again.")
        if plan.staged and plan.mode != "resume":
            _remove_ours(plan.work, plan.marker, "a staging folder left by an earlier interrupted command")
        try:
            yield plan
        except BaseException:
            if plan.staged and not keep_failed:
                shutil.rmtree(plan.work, ignore_errors=True)
            raise
        if plan.staged:
            swap_in(plan.work, plan.target, plan.marker)


def clear_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def checkpoint_write_error(folder: Path, error: BaseException) -> UserError | None:
    """The UserError for a checkpoint that could not be written (full disk, read-only or vanished folder), or
    None when `error` is not about writing. torch.save reports a full disk as a bare RuntimeError, so the text
    of the error and the free space decide as well as the exception type."""
    folder = Path(folder)
    text = " ".join(str(e) for e in (error, error.__cause__, error.__context__) if e is not None)
    io_words = ("No space", "os error", "Errno", "iostream", "file write failed", "unexpected pos", "Read-only",
                "Disk quota")
    try:
        free = shutil.disk_usage(next(p for p in (folder, *folder.parents) if p.exists())).free
    except (OSError, StopIteration):
        free = None
    low = free is not None and free < 64 * 2**20
    if not (isinstance(error, OSError) or low or any(w in text for w in io_words)):
        return None
    keep = last_good_checkpoint(folder.parent)
    why = f"the disk is full ({free / 2**20:.1f} MiB free)" if low else f"{type(error).__name__}: {str(error)[:300]}"
    return UserError(f"could not write the checkpoint {folder}: {why}",
                     (f"The last complete checkpoint, {keep.name}, is kept. " if keep else
                      "No complete checkpoint had been written yet. ")
                     + "Free some disk space (or make the folder writable), then run the same command plus --resume.")
