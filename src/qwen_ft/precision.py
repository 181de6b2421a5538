"""Choosing the compute dtype and the CPU thread count for the machine at hand."""

from __future__ import annotations

import os

import torch

from qwen_ft.errors import UserError
from qwen_ft.malloc import tune_allocator


def cpu_supports_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


_threads_set: int | None = None


def configure_threads() -> int:
    """CPU: the cores of this machine divided among the local processes (at least 1); once per process.

    The count is fixed by the machine, not by its momentary load, because the thread count changes the
    summation order of matmuls and so the last bits of results: same seed, same results needs the same
    count. On a machine shared with other jobs, fewer threads are much faster (every parallel op waits
    for all its threads at a barrier; at load ~5 on 2 cores, 1 thread validated 1.85x faster than 2):
    set QWEN_FT_THREADS=N (or OMP_NUM_THREADS) there.
    """
    global _threads_set
    if _threads_set is not None:
        return _threads_set
    if torch.cuda.is_available():
        _threads_set = torch.get_num_threads()
        return _threads_set
    explicit = os.environ.get("QWEN_FT_THREADS") or os.environ.get("OMP_NUM_THREADS")
    if explicit:
        n = max(1, int(explicit))
    else:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        n = max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    torch.set_num_threads(n)
    tune_allocator()
    _threads_set = n
    return n


def resolve_precision(precision: str) -> str:
    """'auto' -> bf16 where the device computes it natively (CUDA Ampere+, AVX512-BF16/AMX CPUs), else fp32.

    Training keeps fp32 master weights and LoRA parameters and runs matmuls under bf16 autocast.
    Also settles the CPU thread count (`configure_threads`), as every command resolves its precision
    before it computes anything.
    """
    configure_threads()
    cuda = torch.cuda.is_available()
    if precision == "auto":
        if cuda:
            return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        return "bf16" if cpu_supports_bf16() else "fp32"
    if precision == "fp16" and not cuda:
        raise UserError("--fp16 needs a CUDA GPU", "On CPU use --bf16 (if supported) or --precision fp32.")
    return precision


def inference_dtype(precision: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
