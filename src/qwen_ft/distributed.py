"""Rank and world helpers: one code path for 1..N processes (torchrun / accelerate set the environment).

Only rank 0 logs progress and writes files. On CPU the process group uses gloo; on GPU NCCL with one
device per LOCAL_RANK. Single-process runs are simply world size 1. The checks here turn the quiet
failure modes of multi-process training (N processes each training alone, a rank without a GPU, ranks
whose weights drifted apart) into clear errors.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys

from qwen_ft.errors import UserError

log = logging.getLogger(__name__)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def rank_tag() -> str:
    """' [rank R/N]' in multi-process runs (every rank may report its own error), else ''."""
    return f" [rank {rank()}/{world_size()}]" if world_size() > 1 else ""


def setup_logging(debug: bool = False) -> None:
    """INFO on rank 0, warnings only on the others; transformers' own chatter kept down."""
    level = logging.DEBUG if debug else logging.INFO
    logging.basicConfig(level=level if is_main() else logging.WARNING, stream=sys.stdout,
                        format="%(message)s" if not debug else "%(asctime)s %(name)s: %(message)s", force=True)
    import transformers

    transformers.logging.set_verbosity_error()


def use_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def select_gpu(gpu_id: int | None) -> None:
    """--gpu-id K for single-process runs; under torchrun LOCAL_RANK decides.

    A single process sees exactly one GPU afterwards (CUDA_VISIBLE_DEVICES), because the Trainer
    would otherwise use cuda:0, or wrap the model in DataParallel over every visible GPU; it is the one
    setting the Trainer honours. It stays set: CUDA reads it once, when it starts, and the processes a run
    starts (inductor's compile workers) must see the same GPU.
    Only on a GPU machine and only when asked (--gpu-id) or when several GPUs are visible: a CPU process
    is left as it was. Call it before anything touches CUDA (the commands call it first).
    """
    if world_size() > 1:
        if gpu_id is not None:
            raise UserError(f"--gpu-id {gpu_id} cannot be used under torchrun: each process uses the GPU of its "
                            "LOCAL_RANK", "Drop --gpu-id, or choose GPUs with CUDA_VISIBLE_DEVICES=... before torchrun.")
        return
    if gpu_id is not None and gpu_id < 0:
        raise UserError(f"--gpu-id must be >= 0 (got {gpu_id})")
    import torch

    n = torch.cuda.device_count()  # NVML-based before CUDA starts: honours CUDA_VISIBLE_DEVICES, starts nothing
    if gpu_id is None:
        if n <= 1:
            return
        gpu_id = 0
        log.info("%d GPUs visible: this single process uses GPU 0 (--gpu-id K picks another; "
                 "torchrun --nproc_per_node=%d uses all of them)", n, n)
    if n == 0:
        raise UserError(f"--gpu-id {gpu_id}: no CUDA GPU is available on this machine",
                        "Drop --gpu-id to run on CPU.")
    if gpu_id >= n:
        raise UserError(f"--gpu-id {gpu_id} is invalid: {n} GPU(s) are visible (ids 0..{n - 1})",
                        "Pick an id from `nvidia-smi -L` (counted within CUDA_VISIBLE_DEVICES when it is set).")
    if torch.cuda.is_initialized():  # too late to hide the others (e.g. a notebook that already used CUDA)
        torch.cuda.set_device(gpu_id)
        log.warning("CUDA was already started: --gpu-id %d set the current device only", gpu_id)
        return
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [s.strip() for s in visible.split(",")] if visible else [str(i) for i in range(n)]
    os.environ["CUDA_VISIBLE_DEVICES"] = ids[gpu_id]


def device():
    import torch

    if use_cuda():
        return torch.device("cuda", torch.cuda.current_device() if world_size() == 1 else local_rank())
    return torch.device("cpu")


def backend() -> str:
    return "nccl" if use_cuda() else "gloo"


def init() -> None:
    """Join the process group when launched by torchrun / accelerate (gloo on CPU, NCCL on GPU)."""
    if world_size() == 1:
        return
    missing = [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise UserError(f"WORLD_SIZE={world_size()} but {', '.join(missing)} not set: these processes cannot form "
                        "one training job", "Launch with torchrun --nproc_per_node=N (or accelerate launch), "
                        "or unset WORLD_SIZE for a single process.")
    cuda = use_cuda()
    if cuda:
        import torch

        n = torch.cuda.device_count()
        if local_rank() >= n:
            raise UserError(f"LOCAL_RANK {local_rank()} has no GPU: only {n} GPU(s) are visible on this node",
                            f"Use --nproc_per_node={n} or fewer (or widen CUDA_VISIBLE_DEVICES).")
    from accelerate import PartialState

    state = PartialState(cpu=not cuda, backend=backend())
    if state.num_processes != world_size():
        raise RuntimeError(f"process group has {state.num_processes} processes, WORLD_SIZE is {world_size()}")


def require_trainer_world(trainer_world: int) -> None:
    """Refuse N processes that would each train alone (e.g. a CPU Trainer without use_cpu=True)."""
    if trainer_world != world_size():
        raise UserError(f"the Trainer sees world size {trainer_world} but WORLD_SIZE={world_size()}: the "
                        f"{world_size()} processes would train {world_size()} separate copies, not one DDP job",
                        "This is a bug in the launch setup; run a single process, or report it with the command.")


def barrier() -> None:
    if world_size() > 1:
        import torch.distributed as dist

        dist.barrier()


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on at least one (a collective: every rank must call it)."""
    if world_size() == 1:
        return flag
    import torch
    import torch.distributed as dist

    t = torch.tensor([int(flag)], device=device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


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


def batch_plan(lengths: list[int], batch_size: int, max_tokens: int | None = None,
               packed: bool = False) -> list[list[int]]:
    """Row indices sorted by length and cut into batches of at most `batch_size` rows and `max_tokens`
    padded tokens (so long rows come in smaller batches and pad less), or with `packed` at most
    `max_tokens` tokens in all (rows that may run packed, without padding); the same plan on every rank."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    used = 0
    for i in order:  # ascending: the new row is the batch's longest
        cost = used + lengths[i] if packed else (len(batches[-1]) + 1) * lengths[i] if batches else 0
        if batches and len(batches[-1]) < batch_size and (max_tokens is None or cost <= max_tokens):
            batches[-1].append(i)
            used += lengths[i]
        else:
            batches.append([i])
            used = lengths[i]
    return batches


def tensors_digest(tensors: dict) -> str:
    """sha256 over names, dtypes, shapes and values (fp32 bytes): equal digests = equal weights."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.float().numpy().tobytes())
    return h.hexdigest()


def check_replicas(per_rank: list[dict]) -> None:
    """After DDP training every rank holds the same adapter; different ones mean separate jobs."""
    digests = {p["adapter_sha256"] for p in per_rank if p.get("adapter_sha256")}
    if len(digests) > 1:
        raise RuntimeError("the ranks ended training with different adapters: they did not train as one DDP job "
                           f"({', '.join(str(p.get('adapter_sha256'))[:12] for p in per_rank)})")


def peak_memory() -> dict:
    """Peak memory of this process: CUDA allocated/reserved when on GPU, RSS always."""
    import resource

    out = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if use_cuda():
        import torch

        out["cuda_max_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        out["cuda_max_reserved_mb"] = round(torch.cuda.max_memory_reserved() / 2**20, 1)
    return out


def max_memory(per_rank: list[dict]) -> dict:
    """The worst rank, key by key (what must fit on every device)."""
    keys = [k for k in per_rank[0] if k.endswith("_mb")]
    return {k: max(p[k] for p in per_rank) for k in keys}
