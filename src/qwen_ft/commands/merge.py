"""`qwen-ft merge`: a run folder's adapter + its base -> a standalone model folder, verified."""

from __future__ import annotations

import logging

from qwen_ft.merge import merge_run

log = logging.getLogger(__name__)


def run_merge(model_path: str, output_dir: str, dtype: str = "auto", verify_samples: int = 4,
              tolerance: float = 1e-3, overwrite: bool = False, trust_remote_code: bool = False) -> dict:
    report = merge_run(model_path, output_dir, dtype, verify_samples, tolerance, overwrite, trust_remote_code)
    saved = report.get("saved_vs_adapter_max_abs_diff")
    log.info("verified on %d prompts: max |merged - (base+adapter)| logit difference %.2e%s",
             report["verify_inputs"], report["merged_vs_adapter_max_abs_diff"],
             f" (saved and reloaded: {saved:.2e})" if saved is not None else "")
    return report


def add_parser(sub, name: str) -> None:
    p = sub.add_parser(name, help="Merge a run's LoRA adapter into its base model (safetensors), verified.")
    p.add_argument("--model-path", required=True, help="Run folder written by `qwen-ft train`.")
    p.add_argument("--output-dir", required=True, help="Folder for the standalone merged model.")
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="Dtype of the saved weights (auto: the base model's own).")
    p.add_argument("--verify-samples", type=int, default=4,
                   help="Prompts on which merged logits are checked against base+adapter logits (fp32).")
    p.add_argument("--tolerance", type=float, default=1e-3,
                   help="Allowed logit difference, relative to the largest logit.")
    p.add_argument("--overwrite", action="store_true",
                   help="Replace a merged model folder written earlier by qwen-ft merge (never any other folder).")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="Allow Python code shipped with the base model (auto_map). Off unless given here; a run "
                        "trained with it refuses to merge without it.")
    p.set_defaults(func=lambda a: run_merge(a.model_path, a.output_dir, a.dtype, a.verify_samples, a.tolerance,
                                            a.overwrite, a.trust_remote_code))
