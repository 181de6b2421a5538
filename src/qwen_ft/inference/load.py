"""Loading a classifier from a folder: a run folder (base model + its LoRA adapter, merged into the weights at
load) or a merged model folder (written by `qwen-ft merge`). `is_merged_folder` is the one rule for which of
the two a folder is; everything that must tell them apart asks it.

Remote code runs only when `trust_remote_code` is passed here (the command-line flag); a folder that recorded
it is refused without it, never taken as permission.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from qwen_ft.errors import UserError
from qwen_ft.outputs import MERGE_MARKER
from qwen_ft.runs import RunDir

log = logging.getLogger(__name__)


def is_merged_folder(path) -> bool:
    """Whether `path` is a merged model folder: its marker (written last by `qwen-ft merge`) and its label
    mapping are there. Any other folder is read, and checked, as a run folder."""
    folder = Path(path)
    return (folder / MERGE_MARKER).is_file() and (folder / "label_mapping.json").is_file()


def load_classifier(cls, path, *, base_model: str | None = None, precision: str = "auto", adapter: bool = True,
                    trust_remote_code: bool = False, adapter_scale: float = 1.0):
    """A `cls` (the engine's Classifier) over the folder at `path`; see `Classifier.load` for the arguments."""
    from qwen_ft.encoding import PromptEncoder
    from qwen_ft.models import load_tokenizer, require_trust
    from qwen_ft.precision import inference_dtype, resolve_precision
    from qwen_ft.tasks import Task

    folder = Path(path)
    merged = is_merged_folder(folder)
    _check_folder(folder, merged, adapter, adapter_scale)
    cfg = RunDir(folder).config()
    require_trust(folder, cfg.model.trust_remote_code, trust_remote_code)
    prec = resolve_precision(precision)
    dtype = inference_dtype(prec)
    tokenizer = load_tokenizer(str(folder), trust_remote_code, padding_side="left")
    mapping = RunDir(folder).label_mapping()  # checked (shape, and labels against the run's splits)
    head = _head_settings(folder, cfg, mapping, tokenizer, adapter)
    model, model_path = _load_weights(folder, merged, cfg, dtype, head, base_model=base_model, adapter=adapter,
                                      adapter_scale=adapter_scale, trust_remote_code=trust_remote_code)
    encoder = PromptEncoder(tokenizer, Task.from_mapping(mapping), cfg.model.max_length)
    info = {"model_path": str(folder), "kind": "merged" if merged else "run", "base_model": model_path,
            "adapter": adapter, "precision": prec, "adapter_scale": adapter_scale}
    if dtype in (torch.bfloat16, torch.float16) and not head:
        fp32_logits(model)
    clf = cls(model, encoder, prec, info, _calibration(folder, adapter, adapter_scale))
    clf.threshold = RunDir(folder).threshold() if adapter else None
    return clf


def _check_folder(folder: Path, merged: bool, adapter: bool, adapter_scale) -> None:
    """The folder and the adapter flags agree: a finished run, or a merged folder scored with its adapter."""
    check_adapter_scale(adapter_scale, merged, adapter)
    if not merged:
        RunDir(folder).require_complete()
    elif not adapter:
        raise UserError(f"{folder} is a merged model: it has no separate adapter to leave out",
                        "Pass the run folder it was merged from to score the base model alone.")


def _head_settings(folder: Path, cfg, mapping: dict, tokenizer, adapter: bool) -> dict:
    """A classification-head run: the base with a head over the run's labels, the adapter's trained one ({}: none)."""
    if cfg.model.head != "classification":
        return {}
    if not adapter:
        raise UserError(f"{folder} was trained with --head classification: its head starts random, so the "
                        "base model alone has no meaningful baseline", "Score the run with its adapter.")
    return {"labels": mapping["labels"], "pad_token_id": tokenizer.pad_token_id}


def _load_weights(folder: Path, merged: bool, cfg, dtype: torch.dtype, head: dict, *, base_model: str | None,
                  adapter: bool, adapter_scale: float, trust_remote_code: bool):
    """(model, the path its weights came from): the merged folder's own, or the base with the run's adapter."""
    from qwen_ft import distributed as dist
    from qwen_ft.models import check_adapter_matches, load_adapter, load_config, load_model, resolve_model

    if merged:
        model_path = str(folder)
        model = load_model(model_path, dtype, dist.device(), cfg.model.attn_implementation, trust_remote_code,
                           **head)
        return model, model_path
    model_path = resolve_model(base_model or cfg.model.model)
    recorded_shape = RunDir(folder).recorded("base_shape") or {}
    check_adapter_matches(folder, load_config(model_path, trust_remote_code), recorded_shape)
    model = load_model(model_path, dtype, dist.device(), cfg.model.attn_implementation, trust_remote_code, **head)
    if adapter:
        model = load_adapter(model, folder, merge=True, scale=adapter_scale)
    return model, model_path


def _calibration(folder: Path, adapter: bool, adapter_scale: float) -> dict | None:
    """The folder's calibration.json when it applies: fitted for the adapter's scores, at this adapter scale."""
    calibration = RunDir(folder).calibration() if adapter else None
    if calibration and float(calibration.get("adapter_scale", 1.0)) != adapter_scale:
        log.warning("calibration.json was fitted at adapter scale %g, not %g: probabilities are raw",
                    calibration.get("adapter_scale", 1.0), adapter_scale)
        calibration = None
    if calibration:
        log.info("calibration.json: temperature %.4g for --decode %s --normalize %s",
                 calibration["temperature"], calibration["decode"], calibration["normalize"])
    return calibration


def check_adapter_scale(scale, merged: bool, adapter: bool) -> None:
    """--adapter-scale: a number in [0, 1] (0 the base model, 1 the trained run), for a run folder's adapter."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0.0 <= scale <= 1.0:
        raise UserError(f"--adapter-scale must be a number in [0, 1] (got {scale!r})",
                        "0 scores the base model, 1 the trained run, values between interpolate.")
    if scale != 1.0 and merged:
        raise UserError("--adapter-scale applies to a run folder, and this is a merged model (its adapter is "
                        "already in the weights)", "Pass the run folder, or merge it with --adapter-scale.")
    if scale != 1.0 and not adapter:
        raise UserError("--adapter-scale scales the adapter, and --baseline leaves it out", "Drop one of them.")


class _Fp32Head(torch.nn.Module):
    """The output projection in fp32 over bf16/fp16 hidden states. In bf16 the logits themselves are
    rounded to 8 significant bits (steps of 0.125-0.25 at the magnitudes labels score), so two answers
    could tie by rounding alone; the projection runs on the few positions scored, so fp32 costs little."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("weight", weight.detach().float(), persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach().float(), persistent=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(hidden.float(), self.weight, self.bias)


def fp32_logits(model) -> None:
    """Swap a loaded (inference-only) model's output projection for an fp32 one."""
    head = model.get_output_embeddings()
    if isinstance(head, torch.nn.Linear):
        model.set_output_embeddings(_Fp32Head(head.weight, head.bias))
