"""Output safety: every file qwen-ft writes, and every folder a command writes into.

What a command may do with its output folder is decided before anything is written (`plan_output`), and
the folder is then claimed (`claim_output`): an exclusive lock beside it, the decision re-checked under the
lock, and for --overwrite the new output built in a hidden staging sibling that replaces the old folder only
when the command has finished. Only folders that carry our marker are ever replaced or deleted.

    NAME/              the output the user named
    .NAME.lock         the lock file, holding the holder's pid, host and command (removed on release)
    .NAME.staging/     the new output of --overwrite, until it is swapped in
    .NAME.replaced/    the old output during the swap (two renames); removed right after
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import shutil
import socket
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

WRITER = "qwen-ft"
MARKER = "COMPLETE"  # a run folder's completion marker, written last
RUN_MARKER = "run.json"  # training runs
MERGE_MARKER = "merge.json"  # merged model folders


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


class OutputLock:
    """One writer per output folder: an exclusive flock on a hidden sibling file (so it works before the folder
    exists and across the staging swap), holding the holder's pid; a second writer gets a UserError naming it.

    fcntl rather than the filelock package: the lock file can then be removed on release without a race (a
    writer that locked a file already unlinked sees that its inode is not the path's and tries again), so no
    lock files are left beside finished runs. The kernel releases the lock when its process dies.
    """

    def __init__(self, target: str | os.PathLike, flag: str = "--output-dir"):
        self.target = Path(target).expanduser()
        self.path = _sibling(self.target, "lock")
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

