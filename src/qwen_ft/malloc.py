"""glibc's allocator: keep freed pages (in the process, on CPU machines), and ask for huge pages (when a command
starts, on any Linux machine with glibc).

Both exist because of what a first touch of memory costs: on the VMs this project runs on, a 4 KB page faulted
in for the first time cost ~16-30 us (the host backs the guest's memory lazily), so a training step whose
activations reach a new high-water mark paid seconds for it (a first 2,379-token packed step: 755k faults,
15.9 s against ~3.3 s for the same step warm). QWEN_FT_MALLOC=system turns both off.
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
    """CPU, glibc: keep freed memory in the process instead of handing it back to the system at once.

    A forward pass allocates and frees tensors of several MB per layer; glibc serves each one above its mmap
    threshold with a fresh mapping, or trims the heap top after a free, so the next pass faults every page in
    again, zero-filled (a third of the step was system time; an elementwise op on a fresh 5 MB tensor ran at
    1-2 GB/s). A fixed mmap threshold (32 MB, the largest glibc takes) and no trimming keep the pages:
    constrained validation of 112 MMLU-Pro questions 12.0 -> 14.1 samples/s (sdpa) and 14.5 -> 17.2 (the matmul
    attention), system time halved, in alternating processes on an AVX512-BF16 EPYC; tcmalloc preloaded
    (`LD_PRELOAD=libtcmalloc_minimal.so.4`) did about as well. Trimming was first allowed above 1 GB of free
    heap, which a long packed training step's activations (2-3 GB) exceed: each long step after short ones then
    faulted its memory in again (the same 3 warm steps, `benchmarks/where_time_goes.py`: 140,594 minor faults,
    3.6 s system time, 5.9 s in all; never trimming: 55,786, 1.4 s, 4.6 s). Peak memory is unchanged (the same
    tensors are live at the peak); the process keeps its high-water mark until it exits. Returns whether it
    applied."""
    import torch

    if torch.cuda.is_available() or not _glibc_linux(os.environ):
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

    With it, the memory of a new high-water mark faults in 2 MB at a time instead of 4 KB: a whole training run
    (`vs_reference.py`'s MMLU-Pro setting, 63 steps) spent 100.0-107.2 s in training steps (4 runs) against
    108.3-114.9 (5 runs) without it, the first step 10.6-15.2 s against 14.8-18.0 (2-core AMD EPYC VM, alternating
    processes; a huge page can stall on the kernel's compaction, so single steps vary more). It changes where
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
