"""glibc's allocator: keep freed pages in the process (`tune_allocator`), and ask for huge pages when a command
starts (`relaunch_with_huge_pages`). Only the command-line entries call these (`qwen_ft.process`, `cli.run`):
both change the whole process for as long as it lives, which a library call must not do to its caller.

Both exist because of what a first touch of memory costs on the virtual machines this project runs on: the host
backs the guest's memory lazily, so each page faulted in for the first time is slow, and a training step whose
activations reach a new high-water mark pays for every page of it. The figures are in docs/performance.md
("glibc allocator thresholds", "Huge pages for glibc's heap"). QWEN_FT_MALLOC=system turns both off.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

HUGE_PAGES = "glibc.malloc.hugetlb=1"  # glibc >= 2.35, THP in 'madvise' mode: madvise(MADV_HUGEPAGE) on malloc's memory
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"
RELAUNCHED = "QWEN_FT_MALLOC_RELAUNCHED"  # set in the restarted process: never a second restart

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def _glibc_linux(environ, at_least: tuple[int, int] = (0, 0)) -> bool:
    if environ.get("QWEN_FT_MALLOC") == "system" or platform.system() != "Linux":
        return False
    name, version = platform.libc_ver()
    try:
        return name == "glibc" and tuple(int(v) for v in version.split(".")[:2]) >= at_least
    except ValueError:
        return False


def tune_allocator() -> bool:
    """glibc: keep freed memory in the process instead of handing it back to the system at once.

    A forward pass allocates and frees tensors of several MB per layer; with glibc's defaults each one above the
    (adaptive) mmap threshold gets a fresh mapping, and the heap top is trimmed after frees, so the next pass
    faults every page in again, zero-filled. A fixed mmap threshold (32 MB, the largest glibc takes) and no
    trimming at all keep the pages: a long packed training step after short ones reuses them too, which a trim
    threshold, however high, would not. Peak memory is unchanged (the same tensors are live at the peak), but the
    process keeps its high-water mark until it exits - hence a setting of the command, never of a library call.
    mallopt cannot be undone. `qwen_ft.process.setup` calls it on CPU machines. Returns whether it applied."""
    if not _glibc_linux(os.environ):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return all(libc.mallopt(param, value) == 1 for param, value in
               ((_M_MMAP_THRESHOLD, 32 << 20), (_M_TRIM_THRESHOLD, -1), (_M_TOP_PAD, 64 << 20)))  # -1: never trim


def environ_with_huge_pages(environ: dict[str, str]) -> dict[str, str] | None:
    """`environ` plus glibc's huge-page tunable, or None where it would do nothing or is not wanted: not Linux
    with glibc >= 2.35, transparent huge pages not in 'madvise' mode (under 'always' glibc leaves them to the
    kernel, under 'never' there are none), QWEN_FT_MALLOC=system, the tunable already set, or this process the
    restarted one.

    With it, the memory of a new high-water mark faults in 2 MB at a time instead of 4 KB. It changes where
    memory comes from, not what is computed. glibc reads its tunables only when a process starts, hence an
    environment variable and `relaunch_with_huge_pages`, not a call like mallopt. It applies on GPU machines
    too (whether there is one is not known before torch is imported); there it only concerns host memory."""
    if RELAUNCHED in environ or "glibc.malloc.hugetlb" in environ.get("GLIBC_TUNABLES", "") \
            or not _glibc_linux(environ, (2, 35)):
        return None
    try:
        with open(THP_SETTING) as f:
            if "[madvise]" not in f.read():
                return None
    except OSError:
        return None
    tunables = ":".join(t for t in (environ.get("GLIBC_TUNABLES"), HUGE_PAGES) if t)
    # the marker, not the tunable, stops a second restart: glibc drops GLIBC_TUNABLES for privileged processes
    return {**environ, "GLIBC_TUNABLES": tunables, RELAUNCHED: "1"}


def relaunch_with_huge_pages() -> None:
    """The first step of the `qwen-ft` command (`cli.run`) and of the scripts that stand for it: replace this
    process by the same command line (same process id and open files) with glibc's huge-page tunable set. Does
    nothing where it does not apply (environ_with_huge_pages), so at most once; called before anything is read,
    computed or written. A restart that fails (a sandbox refusing exec) leaves the process as it was: it only
    costs speed."""
    env = environ_with_huge_pages(dict(os.environ))
    if env is None or not sys.executable or not getattr(sys, "orig_argv", None):
        return
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    except OSError:
        return
