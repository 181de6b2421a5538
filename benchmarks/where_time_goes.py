#!/usr/bin/env python
"""Where the time goes: torch.profiler over LoRA training steps (default) or constrained validation (--eval).

    python benchmarks/where_time_goes.py --model smollm2-135m --data ../shared/data/mmlu_pro/test.parquet
    python benchmarks/where_time_goes.py --eval ...     # the fast constrained decode, bf16 weights

Prints the top operators by self time, the time share of each operator group (matmuls, attention,
elementwise/norms, optimizer, the rest), the FLOP/s the matmul kernels reach on their own (the profiler
counts their FLOPs) against a matmul peak measured here on the same threads and dtype, and the step's
overall FLOP/s. The gap between the two is time outside matmuls; the gap between the matmul FLOP/s and
the peak is the cost of this model's small shapes (hidden 576: thin matrices run far below a square
matmul's peak). Both run the package's own code paths with its defaults.

The profiler records input shapes and the matmul FLOPs are computed from them: its own FLOP counting
(`with_flops=True`) slowed the profiled steps, elementwise ops most. The profiled pass repeats a warm-up pass
over the same batches: a first pass over a new, larger shape faults in fresh memory pages, ~30 us each on a VM,
and the first op to touch them (mostly an elementwise one) carries the cost; profiled cold, elementwise work
looked like half of a training step. That cost is real, once per process and high-water mark, and shows in
`vs_reference.py`'s whole-run figures; this script shows the steady state. Even warm, the profiler itself
disturbs memory reuse on such a VM: a packed 2,714-token step ran 4.65 s unprofiled and 12.3 s profiled
(short steps 0.81 vs 0.94 s), so read its shares for short batches, and its absolute times not at all.

So the split that decides the targets is taken without the profiler (`unprofiled` in the output): the same
steps run unrecorded and timed (with their page faults and system time), then once under a dispatch mode that
records every aten call with its arguments' shapes, strides, dtypes and `requires_grad`, and each recorded call
is replayed alone, warm, on these threads. Per group that is what the operators cost by themselves; the pass's
time beyond their sum is spent outside them (Python, autograd, dispatch, and memory the replay finds in cache).
The matmuls' replayed time (linear layers, LoRA, the attention's products, the head) is what they cost even with
everything else free: the counted FLOPs over it bound the MFU (or the validation ceiling fraction) that these
kernels allow.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from levers import TrainVariant, train_batches  # noqa: E402
from vs_reference import FlopCounter, matmul_peak  # noqa: E402

from qwen_ft import process  # noqa: E402
from qwen_ft.config import DataArgs  # noqa: E402
from qwen_ft.data.prepare import prepare  # noqa: E402
from qwen_ft.encoding import PromptEncoder  # noqa: E402
from qwen_ft.inference.engine import Classifier  # noqa: E402
from qwen_ft.models import load_model, load_tokenizer, resolve_model  # noqa: E402
from qwen_ft.precision import inference_dtype, resolve_precision  # noqa: E402
from qwen_ft.training.batches import PACK_ABOVE_PADDING  # noqa: E402

GROUPS = {
    "matmul (mm/addmm/bmm/linear)": ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear",
                                     "aten::_mkldnn", "mkldnn", "aten::baddbmm"),
    "attention kernel": ("scaled_dot_product", "flash_attention"),
    "optimizer": ("Optimizer.", "aten::_foreach", "adam"),
    "copies / dtype casts": ("aten::copy_", "aten::to", "aten::_to_copy", "aten::clone", "aten::contiguous"),
    "softmax / loss": ("softmax", "cross_entropy", "nll_loss"),
}


def matmul_flops(name: str, shapes: list) -> float:
    """FLOPs of one call of aten::mm / addmm / bmm from its input shapes (0 for anything else: the composite
    ops matmul/linear call these, and would count twice)."""
    try:
        if name == "aten::mm":
            (m, k), (_, n) = shapes[0], shapes[1]
            return 2.0 * m * k * n
        if name == "aten::addmm":
            (m, k), (_, n) = shapes[1], shapes[2]
            return 2.0 * m * k * n
        if name == "aten::bmm":
            (b, m, k), (_, _, n) = shapes[0], shapes[1]
            return 2.0 * b * m * k * n
        if name == "aten::baddbmm":
            (b, m, k), (_, _, n) = shapes[1], shapes[2]
            return 2.0 * b * m * k * n
    except (ValueError, IndexError, TypeError):
        pass
    return 0.0


MATMULS = {torch.ops.aten.mm.default: "aten::mm", torch.ops.aten.addmm.default: "aten::addmm",
           torch.ops.aten.bmm.default: "aten::bmm", torch.ops.aten.baddbmm.default: "aten::baddbmm",
           # under inference_mode these reach a dispatch mode whole, not as the mm/bmm they call
           torch.ops.aten.linear.default: "aten::linear", torch.ops.aten.matmul.default: "aten::matmul"}


def recorded_flops(name: str, shapes: list) -> float:
    """matmul_flops, plus the whole linear / matmul calls a dispatch mode sees under inference_mode."""
    if name == "aten::linear":  # x [..., K] times W [N, K]
        (n, k), rows = shapes[1], torch.Size(shapes[0][:-1]).numel()
        return 2.0 * rows * k * n
    if name == "aten::matmul" and len(shapes[0]) >= 2 and len(shapes[1]) >= 2:  # [..., M, K] x [..., K, N]
        (m, k), n = shapes[0][-2:], shapes[1][-1]
        return 2.0 * torch.broadcast_shapes(shapes[0][:-2], shapes[1][:-2]).numel() * m * k * n
    return matmul_flops(name, shapes)


class TensorSig(NamedTuple):
    shape: tuple
    stride: tuple
    dtype: torch.dtype
    requires_grad: bool  # it decides kernels: torch.matmul folds a 3-D input into one mm only for some
    values: bytes | None = None  # integers and booleans (indices, masks): their contents, as they decide the work


def _sig(x):
    if isinstance(x, torch.Tensor):
        exact = not x.dtype.is_floating_point and not x.dtype.is_complex
        values = x.detach().contiguous().cpu().numpy().tobytes() if exact else None
        return TensorSig(tuple(x.shape), tuple(x.stride()), x.dtype, x.requires_grad, values)
    if isinstance(x, (list, tuple)):
        return tuple(_sig(e) for e in x)
    return x


def _build(sig):
    """Inputs in exactly the recorded layout (transposed, sliced or expanded views included): random floats,
    the recorded integers and booleans (which rows an index op touches, which a mask fills)."""
    if isinstance(sig, TensorSig):
        storage = 1 + sum((n - 1) * st for n, st in zip(sig.shape, sig.stride)) if all(sig.shape) else 0
        if sig.values is None:
            base = torch.randn(storage, dtype=sig.dtype, requires_grad=sig.requires_grad)
            return base.as_strided(sig.shape, sig.stride)  # a view of a base that requires a gradient does too
        recorded = torch.frombuffer(bytearray(sig.values), dtype=sig.dtype) if sig.values else \
            torch.empty(0, dtype=sig.dtype)
        laid_out = torch.empty(storage, dtype=sig.dtype).as_strided(sig.shape, sig.stride)
        if laid_out.numel() and torch._debug_has_internal_overlap(laid_out) == 1:  # an expanded view: the
            return recorded.view(sig.shape).clone()  # values, not the layout (copy_ cannot write overlapping)
        return laid_out.copy_(recorded.view(sig.shape))
    if isinstance(sig, tuple):
        return tuple(_build(e) for e in sig)
    return sig


class OpRecorder(TorchDispatchMode):
    """Counts every aten call by signature: the op, each argument's shape, strides, dtype and requires_grad (and
    its contents for integer and boolean tensors; the value itself for non-tensors), and whether inference mode
    was on."""

    def __init__(self):
        super().__init__()
        self.calls: dict[tuple, int] = defaultdict(int)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        key = (func, _sig(args), tuple(sorted((k, _sig(v)) for k, v in kwargs.items())),
               torch.is_inference_mode_enabled())
        self.calls[key] += 1
        return func(*args, **kwargs)


def replay(calls: dict[tuple, int], min_seconds: float = 0.01) -> dict:
    """Times each recorded call alone (warm, on these threads) and sums count x time per operator group; the
    matmuls' FLOPs too. Calls that cannot run on made-up inputs are counted under `not_replayed`."""
    seconds: dict[str, float] = defaultdict(float)
    by_op: dict[str, float] = defaultdict(float)
    not_replayed: dict[str, int] = defaultdict(int)
    flops = 0.0
    for (func, sig, kwargs, inference), count in calls.items():
        name = "aten::" + func.__name__.split(".")[0]
        try:
            args, kw = _build(sig), {k: _build(v) for k, v in kwargs}
            with torch.inference_mode() if inference else torch.no_grad():  # as recorded; no graph either way
                for _ in range(2):
                    func(*args, **kw)
                reps, t0 = 0, time.perf_counter()
                while time.perf_counter() - t0 < min_seconds or reps < 3:
                    func(*args, **kw)
                    reps += 1
        except Exception:  # e.g. an op whose made-up inputs are invalid (shapes that depend on the values)
            not_replayed[name] += count
            continue
        took = count * (time.perf_counter() - t0) / reps
        seconds[replay_group(name)] += took
        by_op[name] += took
        if func in MATMULS:
            flops += count * recorded_flops(MATMULS[func], [x.shape for x in sig if isinstance(x, TensorSig)])
    top = dict(sorted(by_op.items(), key=lambda kv: -kv[1])[:12])
    return {"seconds": dict(seconds), "matmul_flops": flops, "not_replayed": dict(not_replayed), "top": top}


VIEWS = ("aten::view", "aten::_unsafe_view", "aten::t", "aten::transpose", "aten::permute", "aten::expand",
         "aten::as_strided", "aten::slice", "aten::select", "aten::unsqueeze", "aten::squeeze", "aten::alias",
         "aten::detach", "aten::split", "aten::unbind", "aten::narrow", "aten::_reshape_alias")


def replay_group(name: str) -> str:
    if name in MATMULS.values():
        return "matmuls"
    if name in VIEWS:
        return "views (no data moved)"
    return group_of(name)


def group_of(name: str) -> str:
    for group, keys in GROUPS.items():
        if any(k.lower() in name.lower() for k in keys):
            return group
    return "elementwise / norms / other"


def usage() -> tuple[int, float]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_minflt, r.ru_stime


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/mmlu_pro/test.parquet"))
    p.add_argument("--max-samples-per-category", type=int, default=20)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--eval", action="store_true", help="Profile constrained validation instead of training.")
    p.add_argument("--eval-rows", type=int, default=64)
    p.add_argument("--eval-batch-size", type=int, default=32)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    process.setup()  # the qwen-ft command's threads and allocator: these figures are the command's
    precision = resolve_precision("auto")
    prepared = prepare(DataArgs(data=a.data, max_samples_per_category=a.max_samples_per_category), 42)
    path = resolve_model(a.model)
    encoder = PromptEncoder(load_tokenizer(path), prepared.task, 512)
    if a.eval:
        model = load_model(path, inference_dtype(precision)).eval()
        config = model.config
        rows = prepared.splits["validation"][: a.eval_rows]
        # built (instruction KV cache included) and warmed up outside the profile
        engine = Classifier(model, encoder, precision, {"model_path": str(path)})
        engine.classify(rows, decode="constrained", batch_size=a.eval_batch_size)  # warm-up: every shape once
        t0, before = time.perf_counter(), usage()
        _, stats = engine.classify(rows, decode="constrained", batch_size=a.eval_batch_size)
        plain_s, after = time.perf_counter() - t0, usage()
        counted = stats["computed_tokens"] * FlopCounter(config, 0, []).forward_per_token  # vs_reference's ceiling
        with OpRecorder() as recorder:
            engine.classify(rows, decode="constrained", batch_size=a.eval_batch_size)
        t0 = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            _, stats = engine.classify(rows, decode="constrained", batch_size=a.eval_batch_size)
        seconds, tokens, what = time.perf_counter() - t0, stats["computed_tokens"], {"eval_rows": len(rows)}
    else:
        # the package's defaults: frozen linears held in bf16 (on CPU), the default attention
        cpu = not torch.cuda.is_available()  # the training path's rules: frozen bf16 and packed batches on CPU
        variant = TrainVariant("defaults", path, torch.float32, precision == "bf16", 0.0,
                               frozen_bf16=precision == "bf16" and cpu, attn=None, packed=cpu)
        config = variant.model.config
        batches = train_batches(encoder, prepared.splits["train"], a.batch_size, a.steps,
                                pack_above=PACK_ABOVE_PADDING if cpu else None)
        for b in batches:  # warm-up: every batch shape once (first-call costs and fresh pages, see above)
            variant.step(b)
        lora = next(iter(variant.model.peft_config.values()))
        counter = FlopCounter(config, lora.r, sorted(lora.target_modules))  # vs_reference's MFU numerator
        hook = variant.model.register_forward_pre_hook(counter.hook, with_kwargs=True)
        variant.times, before = [], usage()
        for b in batches:
            variant.step(b)
        hook.remove()
        after = usage()
        plain_s, counted = sum(variant.times), counter.flops
        what = {"train_steps": a.steps, "steps_s": [round(t, 3) for t in variant.times]}
        with OpRecorder() as recorder:
            for b in batches:
                variant.step(b)
        variant.times, variant.tokens = [], []
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for b in batches:
                variant.step(b)
        seconds, tokens = sum(variant.times), sum(variant.tokens)
    by_group: dict[str, float] = defaultdict(float)
    mm_flops = mm_time = 0.0
    for e in prof.key_averages(group_by_input_shape=True):
        group = group_of(e.key)
        by_group[group] += e.self_cpu_time_total / 1e6
        flops = matmul_flops(e.key, e.input_shapes) * e.count
        if flops:
            mm_flops += flops
            mm_time += e.self_cpu_time_total / 1e6
    events = prof.key_averages()
    total = sum(by_group.values())
    peak = matmul_peak(precision, config.hidden_size, config.intermediate_size)
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:15]
    result = {
        "precision": precision, "threads": torch.get_num_threads(), **what,
        "seconds_under_profiler": round(seconds, 3), "tokens_per_s_under_profiler": round(tokens / seconds, 1),
        "time_share": {g: round(t / total, 3) for g, t in sorted(by_group.items(), key=lambda kv: -kv[1])},
        "matmul_kernel_gflops": round(mm_flops / mm_time / 1e9, 1) if mm_time else None,
        "overall_matmul_gflops": round(mm_flops / seconds / 1e9, 1),
        "matmul_peak": peak,
        "top_ops_self_s": {e.key: round(e.self_cpu_time_total / 1e6, 3) for e in top},
    }
    alone = replay(recorder.calls)
    mm_s = alone["seconds"].get("matmuls", 0.0)
    # unprofiled: the pass's own time, and what each group of its operators costs replayed alone
    result["unprofiled"] = {
        "pass_s": round(plain_s, 3),
        # first touches of memory (a fault each, ~16-30 us on a VM) show as system time
        "pass_minor_faults": after[0] - before[0], "pass_system_s": round(after[1] - before[1], 3),
        "ops_alone_s": {g: round(t, 3) for g, t in sorted(alone["seconds"].items(), key=lambda kv: -kv[1])},
        "outside_the_ops_s": round(plain_s - sum(alone["seconds"].values()), 3),  # Python, autograd, memory
        "not_replayed_calls": alone["not_replayed"],
        "top_ops_alone_s": {op: round(t, 3) for op, t in alone["top"].items()},
        "matmuls_share_of_pass": round(mm_s / plain_s, 3),
        "matmuls_alone_of_peak": round(alone["matmul_flops"] / mm_s / 1e9 / peak["gflops"], 3) if mm_s else None,
        # MFU (training) or validation ceiling fraction (--eval), counted as vs_reference.py counts them
        "counted_of_peak": round(counted / plain_s / 1e9 / peak["gflops"], 3),
        "counted_of_peak_if_only_matmuls_took_time": round(counted / mm_s / 1e9 / peak["gflops"], 3) if mm_s else None,
    }
    if result["matmul_kernel_gflops"]:
        result["matmul_kernels_of_peak"] = round(result["matmul_kernel_gflops"] / peak["gflops"], 3)
        result["overall_of_peak"] = round(result["overall_matmul_gflops"] / peak["gflops"], 3)
    print(json.dumps(result, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
