"""A run's checkpoints/ folder: the newest checkpoint written to the end, removing the ones a kill cut short,
and the error for a checkpoint that could not be written."""

from __future__ import annotations

import shutil
from pathlib import Path

from qwen_ft.errors import UserError


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
