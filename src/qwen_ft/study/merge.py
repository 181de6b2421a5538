"""Adapter + base -> a standalone model folder, verified: merged logits must equal base+adapter logits.

The check runs in fp32 on a few of the run's own prompts (with their answers): the PEFT model computes
`W x + B A x * scale`, the merged one `(W + B A * scale) x`; they differ only by fp32 rounding. The saved
folder is reloaded and checked again when it is saved in fp32; saving in bf16/fp16 rounds the weights, so
that difference is reported, not enforced.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
import yaml

from qwen_ft import distributed as dist
from qwen_ft.config import TrainConfig
from qwen_ft.encoding import PromptEncoder
from qwen_ft.errors import UserError
from qwen_ft.models import (
    DTYPES,
    check_adapter_matches,
    load_config,
    load_model,
    load_tokenizer,
    resolve_model,
)
from qwen_ft.runs import RunDir, write_json
from qwen_ft.scoring import left_pad
from qwen_ft.tasks import Task

log = logging.getLogger(__name__)

COPIED = ("label_mapping.json", "config.yaml", "run.json")


class MergeMismatch(UserError):
    """Merged logits differ from base+adapter logits."""


def _logits(model, batch: dict) -> torch.Tensor:
    with torch.inference_mode():
        return model(**batch).logits.float()


def _max_diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    keep = mask.bool()  # padded positions carry no meaning
    return float((a - b).abs()[keep].max())


def merge_run(run_path: str | os.PathLike, output_dir: str | os.PathLike, dtype: str = "auto",
              verify_samples: int = 4, tolerance: float = 1e-3, overwrite: bool = False) -> dict:
    """Write the merged model of a finished run to `output_dir`; returns the verification report."""
    run = RunDir(run_path).require_complete()
    out = Path(output_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"--output-dir {out} is not empty", "Pass --overwrite to replace it, or choose another folder.")
    if dtype not in ("auto", *DTYPES):
        raise UserError(f"--dtype must be auto, {', '.join(DTYPES)} (got {dtype})")
    cfg = TrainConfig.from_dict(yaml.safe_load((run / "config.yaml").read_text()), "config.yaml")
    base = resolve_model(cfg.model.model)
    base_config = load_config(base, cfg.model.trust_remote_code)
    check_adapter_matches(run.path, base_config)
    save_dtype = DTYPES[dtype] if dtype != "auto" else _config_dtype(base_config)

    tokenizer = load_tokenizer(str(run.path), cfg.model.trust_remote_code, padding_side="left")
    encoder = PromptEncoder(tokenizer, Task.from_mapping(run.label_mapping()), cfg.model.max_length)
    rows = (run.split("validation") or run.split("train"))[:verify_samples]
    if not rows:
        raise UserError(f"run folder {run.path} has no rows to verify the merge on")
    ids, mask = left_pad([encoder.train_example(r)["input_ids"] for r in rows], encoder.tok.pad_token_id,
                         dist.device())
    batch = {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}

    from peft import PeftModel

    model = load_model(base, torch.float32, dist.device(), cfg.model.attn_implementation, cfg.model.trust_remote_code)
    model = PeftModel.from_pretrained(model, str(run.path)).eval()
    reference = _logits(model, batch)
    merged = model.merge_and_unload().eval()
    scale = max(1.0, float(reference.abs().max()))
    diff = _max_diff(_logits(merged, batch), reference, mask)
    report = {"source_run": str(run.path), "base_model": cfg.model.model, "dtype": str(save_dtype).split(".")[-1],
              "verify_inputs": len(rows), "verify_tokens": int(mask.sum()), "max_abs_logit": round(scale, 4),
              "merged_vs_adapter_max_abs_diff": diff, "tolerance": tolerance * scale}
    log.info("merge check: max |merged - (base+adapter)| = %.2e over %d tokens (max |logit| %.1f)",
             diff, report["verify_tokens"], scale)
    if not diff <= tolerance * scale:
        raise MergeMismatch(f"merged logits differ from base+adapter logits by {diff:.3e} "
                            f"(allowed {tolerance * scale:.3e}) on {len(rows)} prompts of {run.path}",
                            "The merged model was not saved. Check the adapter and the base model version.")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        merged.to(save_dtype).save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for name in COPIED:
            if (run / name).is_file():
                shutil.copy2(run / name, tmp / name)
        del merged, model
        if save_dtype == torch.float32:
            reloaded = load_model(str(tmp), torch.float32, dist.device(), cfg.model.attn_implementation,
                                  cfg.model.trust_remote_code).eval()
            saved_diff = _max_diff(_logits(reloaded, batch), reference, mask)
            del reloaded
            report["saved_vs_adapter_max_abs_diff"] = saved_diff
            if not saved_diff <= tolerance * scale:
                raise MergeMismatch(f"the saved merged model's logits differ from base+adapter logits by "
                                    f"{saved_diff:.3e} (allowed {tolerance * scale:.3e})")
        write_json(tmp / "merge.json", report)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("merged model (%s) written to %s", report["dtype"], out)
    return report


def _config_dtype(config) -> torch.dtype:
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) else torch.float32


def load_merged(path: str | os.PathLike, precision: str = "fp32"):
    """(model, encoder) of a merged folder: the same prompt as training, from its label_mapping.json."""
    path = Path(path)
    if not (path / "merge.json").is_file() or not (path / "label_mapping.json").is_file():
        raise UserError(f"{path} is not a merged model folder (no merge.json / label_mapping.json)",
                        "Write one with: qwen-ft merge --model-path RUN --output-dir DIR")
    cfg = TrainConfig.from_dict(yaml.safe_load((path / "config.yaml").read_text()), "config.yaml")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    model = load_model(str(path), dtype, dist.device(), cfg.model.attn_implementation,
                       cfg.model.trust_remote_code).eval()
    tokenizer = load_tokenizer(str(path), cfg.model.trust_remote_code, padding_side="left")
    mapping = yaml.safe_load((path / "label_mapping.json").read_text())
    return model, PromptEncoder(tokenizer, Task.from_mapping(mapping), cfg.model.max_length)
