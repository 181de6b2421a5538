"""Rank and world helpers: one code path for 1..N processes (torchrun sets the environment).

Only rank 0 logs progress and writes files. On CPU the process group uses gloo; on GPU NCCL with one
device per LOCAL_RANK. Single-process runs are simply world size 1.
"""

from __future__ import annotations

import logging
import os
import sys

from qwen_ft.errors import UserError


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def setup_logging(debug: bool = False) -> None:
    """INFO on rank 0, warnings only on the others; transformers' own chatter kept down."""
    level = logging.DEBUG if debug else logging.INFO
    logging.basicConfig(level=level if is_main() else logging.WARNING, stream=sys.stdout,
                        format="%(message)s" if not debug else "%(asctime)s %(name)s: %(message)s", force=True)
    import transformers

    transformers.logging.set_verbosity_error()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def use_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def select_gpu(gpu_id: int | None) -> None:
    """--gpu-id K for single-process runs; under torchrun LOCAL_RANK decides."""
    if gpu_id is None:
        return
    if world_size() > 1:
        raise UserError("--gpu-id cannot be used under torchrun: each process uses the GPU of its LOCAL_RANK",
                        "Drop --gpu-id, or choose GPUs with CUDA_VISIBLE_DEVICES before torchrun.")
    import torch

    n = torch.cuda.device_count()
    if n == 0:
        raise UserError(f"--gpu-id {gpu_id}: no CUDA GPU is available on this machine", "Drop --gpu-id to run on CPU.")
    if gpu_id >= n:
        raise UserError(f"--gpu-id {gpu_id} is invalid: this machine has {n} GPU(s) (ids 0..{n - 1})")
    torch.cuda.set_device(gpu_id)


def device():
    import torch

    if use_cuda():
        return torch.device("cuda", torch.cuda.current_device() if world_size() == 1 else local_rank())
    return torch.device("cpu")


def init() -> None:
    """Start the process group when launched by torchrun (gloo on CPU, NCCL on GPU)."""
    if world_size() == 1:
        return
    from accelerate import PartialState

    cpu = not use_cuda()
    state = PartialState(cpu=cpu, backend="gloo" if cpu else "nccl")
    if state.num_processes != world_size():
        raise RuntimeError(f"process group has {state.num_processes} processes, WORLD_SIZE is {world_size()}")


def barrier() -> None:
    if world_size() > 1:
        import torch.distributed as dist

        dist.barrier()


def gather_objects(obj) -> list:
    """Every rank's object, on every rank, in rank order."""
    if world_size() == 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def shard(items: list) -> list[int]:
    """Indices of `items` this rank handles (strided, so that shards are balanced)."""
    return list(range(rank(), len(items), world_size()))


def peak_memory() -> dict:
    """Peak memory of this process: CUDA allocated/reserved when on GPU, RSS always."""
    import resource

    out = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if use_cuda():
        import torch

        out["cuda_max_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        out["cuda_max_reserved_mb"] = round(torch.cuda.max_memory_reserved() / 2**20, 1)
    return out
