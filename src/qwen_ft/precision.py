"""Choosing the compute dtype for the machine at hand (the CPU thread count is the command's: qwen_ft.process)."""

from __future__ import annotations

import torch

from qwen_ft.errors import UserError


def cpu_supports_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str) -> str:
    """'auto' -> bf16 where the device computes it natively (CUDA Ampere+, AVX512-BF16/AMX CPUs), else fp32.

    Training keeps fp32 master weights and LoRA parameters and runs matmuls under bf16 autocast.
    """
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
