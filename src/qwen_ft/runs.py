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
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from qwen_ft.errors import UserError

MARKER = "COMPLETE"


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows))


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
    return {"versions": versions, "python": platform.python_version(), "git_commit": git_commit(),
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

    def label_mapping(self) -> dict:
        return json.loads((self.path / "label_mapping.json").read_text())

    def info(self) -> dict:
        return json.loads((self.path / "run.json").read_text())

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
        return self

    def last_checkpoint(self) -> Path | None:
        """The newest checkpoint that was written to the end (trainer_state.json is saved last)."""
        return last_good_checkpoint(self.checkpoints)


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


def prepare_output_dir(path: Path, resume: bool, overwrite: bool) -> str:
    """Decide what to do with an existing output folder; returns 'new', 'resume' or 'overwrite'."""
    run = RunDir(path)
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        if resume:
            raise UserError(f"--resume: nothing to resume in {path}", "Drop --resume to start a new run.")
        return "new"
    if not path.is_dir():
        raise UserError(f"--output-dir {path} exists and is a file")
    if overwrite:
        return "overwrite"
    if run.complete:
        raise UserError(f"{path} already holds a finished run",
                        "Pass --overwrite to replace it, or choose another --output-dir.")
    if not (path / "run.json").is_file():
        raise UserError(f"--output-dir {path} is not empty and is not a qwen-ft run",
                        "Choose an empty or new folder, or pass --overwrite to replace its contents.")
    if not resume:
        raise UserError(f"{path} holds an unfinished run",
                        "Pass --resume to continue it, or --overwrite to start over.")
    return "resume"


def clear_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
