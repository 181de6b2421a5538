"""What a qwen-ft command sets for its whole process, once, where it starts; no library call sets any of it.

The CPU thread count, glibc's allocator thresholds and the tokenizers' parallelism belong to the process, not to
one call: a notebook or a long-lived server that only loads a classifier (`Classifier.load`), trains (`train`)
or loads a model (`load_model`) keeps its own. The entries that stand for the command call `setup` before they
compute anything: `cli.main` (the `qwen-ft` command, `python -m qwen_ft`, the seed script), the phase scripts
(`commands.study.phase_script`) and the benchmarks that time the command's pipeline. The huge-page restart
comes even earlier, before anything is imported or read (`malloc.relaunch_with_huge_pages` in `cli.run`).
"""

from __future__ import annotations

import os

from qwen_ft import malloc

_threads: int | None = None


def gpu_machine() -> bool:
    """Whether this process sees a CUDA GPU, asked without starting CUDA: before CUDA starts,
    `torch.cuda.device_count` counts through NVML, so a later --gpu-id (`distributed.select_gpu`, which sets
    CUDA_VISIBLE_DEVICES) still applies; `torch.cuda.is_available` would start the driver and fix the GPUs seen."""
    import torch

    return torch.cuda.device_count() > 0


def configure_threads() -> int:
    """CPU: the cores of this machine divided among the local processes (at least 1); once per process.

    The count is fixed by the machine, not by its momentary load, because the thread count changes the
    summation order of matmuls and so the last bits of results: same seed, same results needs the same
    count. On a machine shared with other jobs, fewer threads are much faster (every parallel op waits
    for all its threads at a barrier): set QWEN_FT_THREADS=N (or OMP_NUM_THREADS) there. A GPU machine keeps
    torch's own count.
    """
    global _threads
    if _threads is not None:
        return _threads
    import torch

    if gpu_machine():
        _threads = torch.get_num_threads()
        return _threads
    explicit = os.environ.get("QWEN_FT_THREADS") or os.environ.get("OMP_NUM_THREADS")
    if explicit:
        n = max(1, int(explicit))
    else:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        n = max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    torch.set_num_threads(n)
    malloc.tune_allocator()  # CPU only: on a GPU machine the tensors that come and go live on the device
    _threads = n
    return n


def setup(compute: bool = True) -> None:
    """The command's process settings. `compute`: the command runs a model in this process (`cli.COMPUTES`),
    so it also fixes the thread count and keeps freed memory (`configure_threads`, `malloc.tune_allocator`);
    the others (merge, study-compare) keep torch's defaults.

    TOKENIZERS_PARALLELISM=false unless the user set it: the Rust tokenizers otherwise warn, and turn their
    threads off, in every process forked after a tokenizer ran (data loader workers)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if compute:
        configure_threads()
