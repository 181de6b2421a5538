"""Everything inference needs, from a run folder alone: base model + adapter, tokenizer, task, prompt."""

from __future__ import annotations

from dataclasses import dataclass

import yaml

from qwen_ft import distributed as dist
from qwen_ft.config import TrainConfig
from qwen_ft.encoding import PromptEncoder
from qwen_ft.models import (
    check_adapter_matches,
    load_adapter,
    load_config,
    load_model,
    load_tokenizer,
    resolve_model,
)
from qwen_ft.precision import inference_dtype, resolve_precision
from qwen_ft.runs import RunDir
from qwen_ft.scoring import LabelScorer
from qwen_ft.tasks import Task


@dataclass
class Loaded:
    run: RunDir
    config: TrainConfig
    encoder: PromptEncoder
    scorer: LabelScorer
    precision: str


def load_run(path, base_model: str | None = None, precision: str = "auto", adapter: bool = True) -> Loaded:
    """`adapter=False` scores the base model alone with the same prompt (the untrained baseline)."""
    run = RunDir(path).require_complete()
    cfg = TrainConfig.from_dict(yaml.safe_load((run / "config.yaml").read_text()), "config.yaml")
    base = resolve_model(base_model or cfg.model.model)
    check_adapter_matches(run.path, load_config(base, cfg.model.trust_remote_code))
    prec = resolve_precision(precision)
    model = load_model(base, inference_dtype(prec), dist.device(), cfg.model.attn_implementation,
                       cfg.model.trust_remote_code)
    model = (load_adapter(model, run.path, merge=True) if adapter else model).eval()
    tokenizer = load_tokenizer(str(run.path), cfg.model.trust_remote_code, padding_side="left")
    encoder = PromptEncoder(tokenizer, Task.from_mapping(run.label_mapping()), cfg.model.max_length)
    return Loaded(run, cfg, encoder, LabelScorer(model, encoder), prec)
