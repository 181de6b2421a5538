"""`qwen-ft validate`: score a run's validation (or test) rows, sharded over processes, and report."""

from __future__ import annotations

import logging
from pathlib import Path

from qwen_ft import distributed as dist
from qwen_ft.errors import Problems, UserError
from qwen_ft.inference import load_run
from qwen_ft.metrics import classification_report, write_confusion
from qwen_ft.runs import RunDir, write_json, write_jsonl
from qwen_ft.scoring import Timer

log = logging.getLogger(__name__)


def run_validate(model_path: str, split: str = "validation", num_samples: int | None = None,
                 decode: str = "constrained", batch_size: int = 16, output_dir: str | None = None,
                 base_model: str | None = None, precision: str = "auto", gpu_id: int | None = None,
                 baseline: bool = False) -> dict:
    dist.select_gpu(gpu_id)
    p = Problems()  # every problem with the flags and the folder at once
    p.check(batch_size > 0, f"--batch-size must be > 0 (got {batch_size})")
    p.check(num_samples is None or num_samples > 0, f"--num-val-samples must be > 0 (got {num_samples})")
    run = p.attempt(RunDir(model_path).require_complete)
    p.raise_if_any()
    rows = run.split(split)
    if not rows:
        raise UserError(f"the {split} split of {model_path} is empty", "Use --split validation or --split test.")
    rows = rows[:num_samples] if num_samples else rows
    out_dir = Path(output_dir) if output_dir else Path(model_path) / ("eval-baseline" if baseline else "eval")

    dist.init()
    loaded = load_run(model_path, base_model, precision, adapter=not baseline)
    labels = loaded.encoder.task.labels
    scorer = loaded.scorer
    predict = {
        "constrained": scorer.decode,  # fast: shared-prefix KV cache + greedy decoding over the label trie
        "exact": scorer.score,  # every label's exact log-probability (and a distribution over labels)
    }.get(decode, scorer.generate)
    # The same batches for 1..N processes, each rank taking every N-th: a row meets the same neighbours
    # (padding, shared prefix) as in one process, so the predictions do not depend on the process count.
    batches = dist.batch_plan([len(loaded.encoder.prompt_ids(row)) for row in rows], batch_size,
                              scorer.max_batch_tokens)
    truncated = loaded.encoder.n_truncated  # each rank has encoded every row exactly once so far
    results = []
    with Timer() as timer:
        for b in dist.shard(batches):
            results += zip(batches[b], predict([rows[i] for i in batches[b]], batch_size))
    parts = dist.gather_objects({"results": results, "seconds": timer.seconds,
                                 "tokens": scorer.n_prompt_tokens, "computed": scorer.n_computed_tokens,
                                 "memory": dist.peak_memory()})
    if not dist.is_main():
        return {}

    merged = sorted((pair for p in parts for pair in p["results"]), key=lambda pair: pair[0])
    preds = [r for _, r in merged]
    golds = [row["label"] for row in rows]
    report = classification_report(golds, [p["pred"] for p in preds], labels)
    seconds = max(p["seconds"] for p in parts)
    report.update({
        "split": split, "decode": decode, "baseline": baseline, "model_path": str(model_path), "precision": loaded.precision,
        "world_size": dist.world_size(), "seconds": round(seconds, 3),
        "samples_per_s": round(len(rows) / seconds, 3) if seconds else None,
        "prompt_tokens_per_s": round(sum(p["tokens"] for p in parts) / seconds, 1) if seconds else None,
        "computed_tokens": sum(p["computed"] for p in parts),  # constrained: shared prefix counted once per batch
        "memory_per_rank": [p["memory"] for p in parts], "truncated_prompts": truncated,
    })
    if truncated:
        log.warning("%d of %d prompts were longer than --max-length %d: their question text was truncated",
                    truncated, len(rows), loaded.encoder.max_length)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "eval.json").unlink(missing_ok=True)  # eval.json marks a whole eval: gone first, written last
    write_jsonl(out_dir / "predictions.jsonl", [
        {"id": row["id"], "label": row["label"], **pred, "correct": pred["pred"] == row["label"]}
        for row, pred in zip(rows, preds)])
    write_confusion(golds, [p["pred"] for p in preds], labels, out_dir)
    write_json(out_dir / "eval.json", report)
    log.info(summary_table(report, labels))
    log.info("wrote %s", out_dir / "eval.json")
    return report


def summary_table(report: dict, labels: list[str]) -> str:
    width = max(12, *(len(lab) for lab in labels))
    lines = [f"{'label':<{width}}  precision  recall     f1  support"]
    for lab in labels:
        m = report["per_label"][lab]
        lines.append(f"{lab:<{width}}  {m['precision']:9.3f}  {m['recall']:6.3f}  {m['f1']:5.3f}  {m['support']:7d}")
    lo, hi = report["accuracy_ci95"]
    lines += [
        "",
        f"accuracy    {report['accuracy']:.4f}  (95% CI {lo:.3f}-{hi:.3f}, n={report['n']})",
        f"macro-F1    {report['macro_f1']:.4f}    weighted-F1 {report['weighted_f1']:.4f}",
        f"valid       {report['valid_pct']:.1f}%   decode {report['decode']}   "
        f"{report['samples_per_s']} samples/s on {report['world_size']} process(es)",
    ]
    return "\n".join(lines)


def add_parser(sub, name: str) -> None:
    p = sub.add_parser(name, help="Score a run's validation/test rows (label-constrained by default).")
    p.add_argument("--model-path", required=True, help="Run folder written by `qwen-ft train`.")
    p.add_argument("--split", default="validation", choices=("validation", "test"))
    p.add_argument("--num-val-samples", type=int, default=None, help="Score only the first N rows of the split.")
    p.add_argument("--decode", default="constrained", choices=("constrained", "exact", "free"),
                   help="constrained (fast): greedy decoding over the labels' token trie, the shared instruction "
                        "computed once (always valid); exact: each label's exact probability, argmax (always "
                        "valid, slower); free: greedy text, exact match.")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--output-dir", default=None, help="Where eval.json etc. go (default: RUN/eval).")
    p.add_argument("--base-model", default=None, help="Override the base model recorded in the run.")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    p.add_argument("--gpu-id", type=int, default=None)
    p.add_argument("--baseline", action="store_true",
                   help="Score the base model without the adapter (same prompt and rows): the untrained baseline.")
    p.set_defaults(func=lambda a: run_validate(a.model_path, a.split, a.num_val_samples, a.decode, a.batch_size,
                                               a.output_dir, a.base_model, a.precision, a.gpu_id, a.baseline))
