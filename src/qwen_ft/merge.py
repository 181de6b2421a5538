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
from pathlib import Path

import torch

from qwen_ft import distributed as dist
from qwen_ft.config import TrainConfig
from qwen_ft.encoding import PromptEncoder
from qwen_ft.errors import UserError
from qwen_ft.inference.kernels import left_pad
from qwen_ft.models import (
    DTYPES,
    check_adapter_matches,
    load_adapter,
    load_config,
    load_model,
    load_tokenizer,
    require_trust,
    resolve_model,
)
from qwen_ft.outputs import MERGE_MARKER, WRITER, claim_output, plan_output, write_json
from qwen_ft.run_checks import labels_digest
from qwen_ft.runs import RunDir
from qwen_ft.tasks import Task

log = logging.getLogger(__name__)

# calibration.json: the merged model's logits equal base+adapter's, so the run's temperature holds for it
COPIED = ("label_mapping.json", "config.yaml", "run.json", "calibration.json", "threshold.json")


class MergeMismatch(UserError):
    """Merged logits differ from base+adapter logits."""


def _logits(model, batch: dict) -> torch.Tensor:
    with torch.inference_mode():
        return model(**batch).logits.float()


def _max_diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    if a.dim() == 2:  # a classification head's logits: one row per prompt, pooled on its last token
        return float((a - b).abs().max())
    keep = mask.bool()  # padded positions carry no meaning
    return float((a - b).abs()[keep].max())


def merge_run(run_path: str | os.PathLike, output_dir: str | os.PathLike, dtype: str = "auto",
              verify_samples: int = 4, tolerance: float = 1e-3, overwrite: bool = False,
              trust_remote_code: bool = False) -> dict:
    """Write the merged model of a finished run to `output_dir`; returns the verification report.

    The output is built in a hidden staging folder beside `output_dir` and moved into place only once it is
    verified; --overwrite replaces only a merged folder written by qwen-ft, never the run or anything holding it.
    Remote code runs only with `trust_remote_code` (the command's flag), never because the run recorded it.
    """
    if dtype not in ("auto", *DTYPES):
        raise UserError(f"--dtype must be auto, {', '.join(DTYPES)} (got {dtype})")
    run = RunDir(run_path).require_complete()
    cfg = run.config()  # read and checked by RunDir, the one reader of config.yaml
    plan = plan_output(output_dir, overwrite=overwrite, marker=MERGE_MARKER, stage_new=True,
                       inputs={"--model-path": run.path, "base model": cfg.model.model})
    require_trust(run.path, cfg.model.trust_remote_code, trust_remote_code)
    base = resolve_model(cfg.model.model)
    with claim_output(plan, keep_failed=False):
        return _merge(run, cfg, base, plan.work, plan.target, dtype, verify_samples, tolerance, trust_remote_code)


def _merge(run: RunDir, cfg: TrainConfig, base: str, tmp: Path, out: Path, dtype: str, verify_samples: int,
           tolerance: float, trust_remote_code: bool) -> dict:
    base_config = load_config(base, trust_remote_code)
    check_adapter_matches(run.path, base_config, run.recorded("base_shape") or {})
    save_dtype = DTYPES[dtype] if dtype != "auto" else _config_dtype(base_config)

    tokenizer = load_tokenizer(str(run.path), trust_remote_code, padding_side="left")
    encoder = PromptEncoder(tokenizer, Task.from_mapping(run.label_mapping()), cfg.model.max_length)
    rows = (run.split("validation") or run.split("train"))[:verify_samples]
    if not rows:
        raise UserError(f"run folder {run.path} has no rows to verify the merge on")
    # a classification-head run (--head classification) is merged with its head: the saved folder is a
    # sequence-classification model, checked on the prompts it classifies
    pad = encoder.tok.pad_token_id
    head = {"labels": encoder.task.labels, "pad_token_id": pad} if cfg.model.head == "classification" else {}
    seqs = [encoder.head_example(r, pad) if head else encoder.train_example(r) for r in rows]
    ids, mask = left_pad([s["input_ids"] for s in seqs], pad, dist.device())
    batch = {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}

    model = load_model(base, torch.float32, dist.device(), cfg.model.attn_implementation, trust_remote_code, **head)
    model = load_adapter(model, run.path, merge=False).eval()
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

    tmp.mkdir(parents=True, exist_ok=True)
    merged.to(save_dtype).save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    for name in COPIED:
        if (run / name).is_file():
            shutil.copy2(run / name, tmp / name)
    del merged, model
    if save_dtype == torch.float32:
        reloaded = load_model(str(tmp), torch.float32, dist.device(), cfg.model.attn_implementation,
                              trust_remote_code, **head).eval()
        saved_diff = _max_diff(_logits(reloaded, batch), reference, mask)
        del reloaded
        report["saved_vs_adapter_max_abs_diff"] = saved_diff
        if not saved_diff <= tolerance * scale:
            raise MergeMismatch(f"the saved merged model's logits differ from base+adapter logits by "
                                f"{saved_diff:.3e} (allowed {tolerance * scale:.3e})")
    report["labels_sha256"] = labels_digest(RunDir(tmp).label_mapping(check_splits=False)["labels"])
    write_json(tmp / MERGE_MARKER, {"written_by": WRITER, **report})  # last: it marks a whole merged folder
    log.info("merged model (%s) written to %s", report["dtype"], out)
    return report


def _config_dtype(config) -> torch.dtype:
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) else torch.float32
