"""User-facing errors: one clear message, a non-zero exit, no traceback (unless --debug)."""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class UserError(Exception):
    """A problem the user can fix (bad flag, bad data, bad folder). Carries every problem found."""

    def __init__(self, problems: str | list[str], hint: str | None = None):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.hint = hint
        super().__init__(self.message)

    @property
    def message(self) -> str:
        if len(self.problems) == 1:
            text = self.problems[0]
        else:
            text = f"{len(self.problems)} problems found:\n" + "\n".join(f"  - {p}" for p in self.problems)
        return f"{text}\n{self.hint}" if self.hint else text


class TrainingInterrupted(UserError):
    """SIGTERM/SIGINT during training; a checkpoint was saved."""


class TrainingDiverged(UserError):
    """Loss or gradient became NaN/inf during training."""


class ConfigDiffersError(UserError):
    """--resume of an unfinished run whose saved config differs from this one (with any other problems found
    alongside); a study starts such a run over."""


class Problems:
    """Collects problems so that validation can report all of them at once."""

    def __init__(self) -> None:
        self.items: list[str] = []
        self.hints: list[str] = []

    def __bool__(self) -> bool:
        return bool(self.items)

    def add(self, problem: str, hint: str | None = None) -> None:
        if problem not in self.items:  # two checks finding the same problem report it once
            self.items.append(problem)
        if hint and hint not in self.hints:
            self.hints.append(hint)

    def check(self, ok: bool, problem: str) -> None:
        if not ok:
            self.add(problem)

    def attempt(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
        """Run one check; its UserError joins the list (and None is returned) instead of stopping."""
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            for i, problem in enumerate(e.problems):
                self.add(problem, e.hint if i == len(e.problems) - 1 else None)
            return None

    def raise_if_any(self, hint: str | None = None, error: type[UserError] = UserError) -> None:
        """Raise every problem collected as one `error` (a UserError subclass names what callers catch)."""
        if self.items:
            hints = self.hints + ([hint] if hint and hint not in self.hints else [])
            raise error(self.items, "\n".join(hints) or None)


OS_HINTS = {
    errno.ENOSPC: "The disk is full: free some space (or choose a folder on another disk), then run the command "
                  "again; a training run continues with --resume from its last complete checkpoint.",
    errno.EDQUOT: "The disk quota is used up: free some space, then run the command again (--resume for training).",
    errno.EFBIG: "The file grew beyond the size this system allows (ulimit -f); raise the limit or choose "
                 "another folder.",
    errno.EROFS: "The folder is on a read-only file system: choose a writable folder.",
    errno.EACCES: "Permission denied: choose a folder you can write to, or fix its permissions.",
    errno.EPERM: "Operation not permitted: choose a folder you can write to, or fix its permissions.",
    errno.ENOTDIR: "A part of this path is a file, not a folder: check the path.",
    errno.EISDIR: "This path is a folder where a file was expected: check the path.",
    errno.ENOENT: "Check that the path exists.",
    errno.ENAMETOOLONG: "Use a shorter path.",
    errno.EMFILE: "Too many open files: raise the limit (ulimit -n).",
}


def from_os_error(e: OSError) -> UserError:
    """A user-facing error for an OSError (full disk, read-only folder, a file where a folder should be)."""
    what = e.strerror or str(e) or type(e).__name__
    paths = [str(p) for p in (e.filename, e.filename2) if p is not None]
    text = f"{what}: {' -> '.join(paths)}" if paths else what
    return UserError(text, OS_HINTS.get(e.errno or -1))
