#!/usr/bin/env python
"""qwen-ft defaults vs the seed guide's reference recipe, side by side on the same model, rows and split.

    python benchmarks/vs_reference.py --model smollm2-135m --data ../shared/data/mmlu_pro/test.parquet \
        --max-samples-per-category 40 --budget-s 300 --json bench.json --markdown bench.md

Two pipelines, each in its own subprocess (so peak RSS / GPU memory are separate), one after the other:

* reference - a faithful re-implementation of the seed script's choices: every example padded to
  --max-length (512) tokens, float32, labels rebuilt from input_ids by the collator (the whole prompt, and
  with pad == eos the end of the answer masked), LoRA dropout of the seed's 0.6B preset (0.05), the seed's
  0.6B hyper-parameters; validation by one free `generate` per sample (max_new_tokens=10), prefix match.
* ours - `qwen_ft.training.train` and `qwen_ft.commands.validate.run_validate` with the
  package defaults, exactly as `qwen-ft train --model M --data D --max-samples-per-category N` then
  `qwen-ft validate --model-path RUN` runs them.

Both train for the same wall-clock budget (`--budget-s`, the time inside `Trainer.train`, per-epoch
validation loss included; a pipeline that finishes its epochs earlier stops earlier) and are then
validated on the same first `--num-val-samples` validation rows.

MFU = achieved training FLOP/s / a matmul peak measured in the same worker, same threads and dtype.
Training FLOPs are counted from the model's shapes for the useful (non-pad) tokens of every training
batch: forward 2*in*out per linear and token, backward 1x forward for the frozen linears (gradient of
the input only) and 2x for the LoRA matrices; causal attention (QK^T and AV) forward and 2x backward;
the vocabulary head only at the positions where logits are computed and needed.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SEED = 42
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# The seed guide's 0.6B row (the smallest it documents), used by the reference recipe.
REFERENCE = {"lora_rank": 16, "lora_alpha": 32, "lora_dropout": 0.05, "learning_rate": 3e-4, "batch_size": 8,
             "epochs": 8, "weight_decay": 0.01, "warmup_ratio": 0.1, "max_new_tokens": 10}


# ============================================================================ shared helpers (workers)

def device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def matmul_peak(dtype_name: str, hidden: int, inter: int, seconds: float = 1.5) -> dict:
    """Best FLOP/s of a few matmuls (square, and the model's MLP shape) in this dtype on these threads."""
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    dev = device()
    best, shapes = 0.0, {}
    for m, k, n in [(2048, 2048, 2048), (4096, hidden, inter), (4096, inter, hidden)]:
        a = torch.randn(m, k, dtype=dtype, device=dev)
        b = torch.randn(k, n, dtype=dtype, device=dev)
        for _ in range(2):
            a @ b
        sync()
        t0, reps = time.perf_counter(), 0
        while time.perf_counter() - t0 < seconds:
            a @ b
            reps += 1
            if dev.type == "cuda" and reps % 10:
                continue
            sync()
        sync()
        flops = 2 * m * k * n * reps / (time.perf_counter() - t0)
        shapes[f"{m}x{k}x{n}"] = round(flops / 1e9, 1)
        best = max(best, flops)
    return {"dtype": dtype_name, "gflops": round(best / 1e9, 1), "by_shape_gflops": shapes,
            "threads": torch.get_num_threads()}


class FlopCounter:
    """Counts useful training tokens, computed (padded) tokens and training FLOPs from batch shapes.

    Registered as a forward pre-hook on the model; only forward passes in training mode count.
    """

    def __init__(self, config, lora_rank: int, targets: list[str]):
        c = config
        h, inter, layers = c.hidden_size, c.intermediate_size, c.num_hidden_layers
        heads = c.num_attention_heads
        kv = getattr(c, "num_key_value_heads", None) or heads
        hd = getattr(c, "head_dim", None) or h // heads
        shapes = {"q_proj": (h, heads * hd), "k_proj": (h, kv * hd), "v_proj": (h, kv * hd),
                  "o_proj": (heads * hd, h), "gate_proj": (h, inter), "up_proj": (h, inter),
                  "down_proj": (inter, h)}
        base = sum(i * o for i, o in shapes.values())
        lora = sum(lora_rank * (i + o) for name, (i, o) in shapes.items() if name in targets)
        # per token per layer: frozen linears forward + input-grad backward; LoRA forward + 2x backward
        self.linear_per_token = layers * (2 * base * 2 + 2 * lora * 3)
        self.forward_per_token = layers * 2 * base  # inference (adapter merged), linears only
        self.attn_per_pair = layers * 2 * 2 * heads * hd * 3  # QK^T + AV, forward + 2x backward, per (q,k) pair
        self.head_per_position = 2 * h * c.vocab_size * 2  # vocabulary head forward + input-grad backward
        self.useful_tokens = 0
        self.padded_tokens = 0
        self.samples = 0
        self.flops = 0.0
        self.steps = 0

    def hook(self, module, args, kwargs):
        import torch

        from qwen_ft.attention import SEGMENTS

        if not module.training:
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        keep = kwargs.get("logits_to_keep", 0)
        if ids is None:
            return
        b, t = ids.shape
        segments = kwargs.get(SEGMENTS)  # a packed batch (training.batches.PackedCollator): one row, no padding
        lengths = segments or (mask.sum(1).tolist() if mask is not None else [t] * b)
        self.samples += len(lengths)
        self.padded_tokens += b * t
        if isinstance(keep, torch.Tensor):  # the positions kept, over the whole batch
            self.flops += len(keep) * self.head_per_position
        for n in lengths:
            n = int(n)
            self.useful_tokens += n
            self.flops += n * self.linear_per_token + n * (n + 1) / 2 * self.attn_per_pair
            if not isinstance(keep, torch.Tensor):
                self.flops += (min(int(keep), n) if keep else n) * self.head_per_position


def budget_callback(budget_s: float, timing: dict):
    """Stops training once `budget_s` seconds have passed inside Trainer.train; times evaluation apart."""
    from transformers import TrainerCallback

    class TimeBudget(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            timing["t0"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if time.perf_counter() - timing["t0"] >= budget_s:
                timing["stopped_by_budget"] = True
                control.should_training_stop = True
                control.should_evaluate = False
                control.should_save = False

        def on_epoch_end(self, args, state, control, **kwargs):
            if timing.get("stopped_by_budget"):
                control.should_evaluate = False
                control.should_save = False

        def on_train_end(self, args, state, control, **kwargs):
            timing["train_wall_s"] = time.perf_counter() - timing["t0"]

    return TimeBudget()


def time_evaluation(trainer, timing: dict) -> None:
    original = trainer.evaluate

    def evaluate(*a, **k):
        t0 = time.perf_counter()
        try:
            return original(*a, **k)
        finally:
            timing["eval_s"] = timing.get("eval_s", 0.0) + time.perf_counter() - t0

    trainer.evaluate = evaluate


def memory() -> dict:
    import torch

    out = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if torch.cuda.is_available():
        out["gpu_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def prepared_rows(spec: dict):
    from qwen_ft.config import DataArgs
    from qwen_ft.data.prepare import prepare

    return prepare(DataArgs(data=spec["data"], task=spec["task"],
                            max_samples_per_category=spec["max_samples_per_category"]), SEED)


def train_summary(counter: FlopCounter, timing: dict, n_train: int, peak: dict) -> dict:
    train_s = timing["train_wall_s"] - timing.get("eval_s", 0.0)
    flops_per_s = counter.flops / train_s if train_s else 0.0
    epochs = counter.samples / n_train if n_train else 0.0
    return {
        "train_wall_s": round(timing["train_wall_s"], 2),
        "train_compute_s": round(train_s, 2),
        "eval_loss_s": round(timing.get("eval_s", 0.0), 2),
        "stopped_by_budget": bool(timing.get("stopped_by_budget")),
        "steps": counter.steps,
        "epochs_done": round(epochs, 3),
        "useful_tokens": counter.useful_tokens,
        "padded_tokens": counter.padded_tokens,
        "train_tokens_per_s": round(counter.useful_tokens / train_s, 1) if train_s else None,
        "train_padded_tokens_per_s": round(counter.padded_tokens / train_s, 1) if train_s else None,
        "seconds_per_epoch": round(train_s / epochs, 1) if epochs else None,
        "train_gflops_per_s": round(flops_per_s / 1e9, 1),
        "matmul_peak": peak,
        "mfu": round(flops_per_s / (peak["gflops"] * 1e9), 4) if peak["gflops"] else None,
    }


# ============================================================================ reference worker

def prefix_match(text: str, labels: list[str]) -> str | None:
    """The seed's check: the generated text starts with a label (longest label first)."""
    cleaned = text.strip().lower()
    for label in sorted(labels, key=len, reverse=True):
        if cleaned.startswith(label.lower()):
            return label
    return None


def run_reference(spec: dict) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainingArguments,
    )

    from qwen_ft.models import resolve_model

    prepared = prepared_rows(spec)
    task = prepared.task
    train_rows = prepared.splits["train"]
    val_rows = prepared.splits["validation"][: spec["num_val_samples"]]
    path = resolve_model(spec["model"])
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token  # the seed's choice
    system = task.system_message()

    def prompt(row):
        msgs = [{"role": "system", "content": system}, {"role": "user", "content": task.user_message(row)}]
        return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, enable_thinking=False)

    def full_text(row):
        msgs = [{"role": "system", "content": system}, {"role": "user", "content": task.user_message(row)},
                {"role": "assistant", "content": row["label"]}]
        return tok.apply_chat_template(msgs, tokenize=False, enable_thinking=False)

    max_len = spec["max_length"]

    def encode(rows):
        enc = tok([full_text(r) for r in rows], padding="max_length", truncation=True, max_length=max_len)
        return Dataset.from_dict({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})

    train_ds, eval_ds = encode(train_rows), encode(prepared.splits["validation"])
    dev = device()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(dev)
    peak = matmul_peak("fp32", model.config.hidden_size, model.config.intermediate_size, spec["peak_seconds"])
    model = get_peft_model(model, LoraConfig(r=REFERENCE["lora_rank"], lora_alpha=REFERENCE["lora_alpha"],
                                             lora_dropout=REFERENCE["lora_dropout"], target_modules=LORA_TARGETS,
                                             task_type="CAUSAL_LM"))
    counter = FlopCounter(model.config, REFERENCE["lora_rank"], LORA_TARGETS)
    model.register_forward_pre_hook(counter.hook, with_kwargs=True)
    timing: dict = {}
    out = Path(spec["workdir"]) / "reference"
    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=REFERENCE["batch_size"],
        per_device_eval_batch_size=REFERENCE["batch_size"], num_train_epochs=REFERENCE["epochs"],
        learning_rate=REFERENCE["learning_rate"], weight_decay=REFERENCE["weight_decay"],
        warmup_steps=REFERENCE["warmup_ratio"], max_grad_norm=1.0, logging_steps=10, eval_strategy="epoch",
        save_strategy="no", report_to="none", seed=SEED, use_cpu=dev.type == "cpu", disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                      data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
                      callbacks=[budget_callback(spec["budget_s"], timing)])
    time_evaluation(trainer, timing)
    _count_steps(trainer, counter)
    trainer.train()
    result = {"train": train_summary(counter, timing, len(train_rows), peak)}

    # validation: one free generate per sample, 10 new tokens, prefix match of the text
    trainer.optimizer = trainer.lr_scheduler = None
    del trainer
    gc.collect()
    model.eval()
    labels = task.labels
    preds, t0 = [], time.perf_counter()
    with torch.no_grad():
        for row in val_rows:
            enc = tok(prompt(row), return_tensors="pt").to(dev)
            gen = model.generate(**enc, max_new_tokens=REFERENCE["max_new_tokens"], do_sample=False,
                                 pad_token_id=tok.pad_token_id)
            text = tok.decode(gen[0, enc["input_ids"].size(1):], skip_special_tokens=True)
            preds.append(prefix_match(text, labels))
    sync()
    seconds = time.perf_counter() - t0
    n = len(val_rows)
    result["validate"] = {
        "n": n, "seconds": round(seconds, 2), "samples_per_s": round(n / seconds, 3),
        "accuracy": round(sum(p == r["label"] for p, r in zip(preds, val_rows)) / n, 4),
        "valid_pct": round(100 * sum(p is not None for p in preds) / n, 2),
    }
    result["memory"] = memory()
    return result


def _count_steps(trainer, counter: FlopCounter) -> None:
    from transformers import TrainerCallback

    class Steps(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            counter.steps = state.global_step

    trainer.add_callback(Steps())


# ============================================================================ ours worker

def run_ours(spec: dict) -> dict:
    import importlib

    import torch

    from qwen_ft import process
    from qwen_ft.commands.validate import run_validate
    from qwen_ft.precision import resolve_precision

    process.setup()  # the threads and allocator the `qwen-ft` command sets for itself
    train_lib = importlib.import_module("qwen_ft.training.train")  # the module (qwen_ft.training.train: the function)

    timing: dict = {}
    holder: dict = {}
    original_build = train_lib._setup_trainer

    def build_with_budget(cfg, run, model, tokenizer, train_ds, val_ds, precision, extra_callbacks):
        trainer = original_build(cfg, run, model, tokenizer, train_ds, val_ds, precision, extra_callbacks)
        trainer.add_callback(budget_callback(spec["budget_s"], timing))
        time_evaluation(trainer, timing)
        _count_steps(trainer, holder["counter"])
        holder["n_train"] = len(train_ds)
        holder["lora_rank"] = cfg.lora.rank
        return trainer

    def hook(model):
        cfg = model.config
        targets = sorted(next(iter(model.peft_config.values())).target_modules)
        rank = next(iter(model.peft_config.values())).r
        holder["counter"] = FlopCounter(cfg, rank, targets)
        model.register_forward_pre_hook(holder["counter"].hook, with_kwargs=True)
        dtype = resolve_precision("auto")
        holder["peak"] = matmul_peak(dtype, cfg.hidden_size, cfg.intermediate_size, spec["peak_seconds"])
        return model

    train_lib._setup_trainer = build_with_budget
    run_dir = Path(spec["workdir"]) / "ours"
    user = {"model.model": spec["model"], "data.data": spec["data"], "data.task": spec["task"],
            "data.max_samples_per_category": spec["max_samples_per_category"], "train.output_dir": str(run_dir)}
    user.update(spec.get("ours_overrides") or {})
    train_lib.train(user, overwrite=True, model_hook=hook)
    train_lib._setup_trainer = original_build
    result = {"train": train_summary(holder["counter"], timing, holder["n_train"], holder["peak"])}
    kwargs = dict(spec.get("validate_overrides") or {})
    report = run_validate(str(run_dir), "validation", spec["num_val_samples"], **kwargs)
    result["validate"] = {"n": report["n"], "seconds": report["seconds"], "samples_per_s": report["samples_per_s"],
                          "accuracy": round(report["accuracy"], 4), "valid_pct": report["valid_pct"],
                          "decode": report["decode"], "precision": report.get("precision")}
    computed = report.get("computed_tokens")
    if computed:  # validation FLOP/s, and the samples/s this machine would give if every FLOP ran at the peak
        flops = computed * holder["counter"].forward_per_token
        peak = holder["peak"]["gflops"] * 1e9
        result["validate"].update({"computed_tokens": computed,
                                   "gflops_per_s": round(flops / report["seconds"] / 1e9, 1),
                                   "samples_per_s_at_peak": round(report["n"] * peak / flops, 2),
                                   "eval_ceiling_fraction": round(report["samples_per_s"] * flops / report["n"] / peak,
                                                                  4)})
    result["memory"] = memory()
    del torch
    return result


# ============================================================================ parent: run both, report

def worker_main(which: str, spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    if spec.get("threads"):  # both pipelines on this many threads (ours: through QWEN_FT_THREADS)
        import torch

        os.environ["QWEN_FT_THREADS"] = str(spec["threads"])
        torch.set_num_threads(spec["threads"])
    sys.path.insert(0, str(REPO / "src"))
    result = run_reference(spec) if which == "reference" else run_ours(spec)
    Path(out_path).write_text(json.dumps(result, indent=2))


def ratio(a, b):
    return round(a / b, 3) if a is not None and b else None


def summarize(ref: dict, ours: dict, spec: dict, env: dict) -> dict:
    mem_key = "gpu_peak_mb" if "gpu_peak_mb" in ours["memory"] else "peak_rss_mb"
    flat = {}
    for name, r in (("reference", ref), ("ours", ours)):
        flat[name] = {**r["train"], **{f"val_{k}": v for k, v in r["validate"].items()},
                      "peak_memory_mb": r["memory"][mem_key], "peak_memory_kind": mem_key, **r["memory"]}
    rt, ot = ref["train"], ours["train"]
    rv, ov = ref["validate"], ours["validate"]
    flat["ours"]["eval_ceiling_fraction"] = ov.get("eval_ceiling_fraction")  # validation samples/s / its FLOP ceiling
    ratios = {
        "train_tokens_per_s": ratio(ot["train_tokens_per_s"], rt["train_tokens_per_s"]),
        "train_padded_tokens_per_s": ratio(ot["train_padded_tokens_per_s"], rt["train_padded_tokens_per_s"]),
        "seconds_per_epoch": ratio(ot["seconds_per_epoch"], rt["seconds_per_epoch"]),
        "eval_samples_per_s": ratio(ov["samples_per_s"], rv["samples_per_s"]),
        "val_accuracy": ratio(ov["accuracy"], rv["accuracy"]),
        "peak_rss": ratio(ours["memory"]["peak_rss_mb"], ref["memory"]["peak_rss_mb"]),
        "peak_memory": ratio(flat["ours"]["peak_memory_mb"], flat["reference"]["peak_memory_mb"]),
        "mfu": ratio(ot["mfu"], rt["mfu"]),
    }
    targets = {
        "train_tokens_per_s >= 5x": (ratios["train_tokens_per_s"] or 0) >= 5,
        "val_accuracy >= reference": ov["accuracy"] >= rv["accuracy"],
        "eval_samples_per_s >= 20x": (ratios["eval_samples_per_s"] or 0) >= 20,
        "valid outputs 100%": ov["valid_pct"] >= 100,
        "ours.mfu >= 0.5": (ot["mfu"] or 0) >= 0.5,
        "ours.eval_ceiling_fraction >= 0.7": (ov.get("eval_ceiling_fraction") or 0) >= 0.7,
        "peak_memory <= 0.5x": (ratios["peak_memory"] or 9) <= 0.5,
    }
    return {"spec": spec, "env": env, "reference": flat["reference"], "ours": flat["ours"], "ratios": ratios,
            "targets_met": targets}


def markdown(s: dict) -> str:
    r, o, q = s["reference"], s["ours"], s["ratios"]
    mem = "GPU peak memory (MB)" if r["peak_memory_kind"] == "gpu_peak_mb" else "Peak RSS (MB)"

    def f(v, nd=1):
        return "-" if v is None else (f"{v:,.{nd}f}" if isinstance(v, float) else f"{v:,}")

    rows = [
        ("Training useful (non-pad) tokens/s", r["train_tokens_per_s"], o["train_tokens_per_s"], q["train_tokens_per_s"]),
        ("Training padded tokens/s", r["train_padded_tokens_per_s"], o["train_padded_tokens_per_s"],
         q["train_padded_tokens_per_s"]),
        ("Seconds per epoch", r["seconds_per_epoch"], o["seconds_per_epoch"], q["seconds_per_epoch"]),
        (f"Training wall s (budget {s['spec']['budget_s']:g}s, incl. val loss)", r["train_wall_s"], o["train_wall_s"],
         None),
        ("Epochs done in the budget", r["epochs_done"], o["epochs_done"], None),
        ("Val accuracy after the equal budget", r["val_accuracy"], o["val_accuracy"], q["val_accuracy"]),
        ("Validation samples/s", r["val_samples_per_s"], o["val_samples_per_s"], q["eval_samples_per_s"]),
        ("Validation samples/s if all its FLOPs ran at the matmul peak", None, o.get("val_samples_per_s_at_peak"),
         ratio(o.get("val_samples_per_s_at_peak"), r["val_samples_per_s"])),
        ("Validation: fraction of that ceiling reached", None, o.get("val_eval_ceiling_fraction"), None),
        ("Valid outputs %", r["val_valid_pct"], o["val_valid_pct"], None),
        (mem, r["peak_memory_mb"], o["peak_memory_mb"], q["peak_memory"]),
        ("Training GFLOP/s (useful, counted)", r["train_gflops_per_s"], o["train_gflops_per_s"], None),
        (f"Matmul peak GFLOP/s (measured, {r['matmul_peak']['dtype']} vs {o['matmul_peak']['dtype']})",
         r["matmul_peak"]["gflops"], o["matmul_peak"]["gflops"], None),
        ("MFU (of the dtype's measured peak)", r["mfu"], o["mfu"], q["mfu"]),
    ]
    out = ["| metric | reference recipe | qwen-ft defaults | ours / reference |", "|---|---:|---:|---:|"]
    for name, a, b, c in rows:
        nd = 4 if "accuracy" in name or "MFU" in name or "fraction" in name else 1
        out.append(f"| {name} | {f(a, nd)} | {f(b, nd)} | {f(c, 2)} |")
    env = s["env"]
    out.append("")
    out.append(f"Model {s['spec']['model']}, data {Path(s['spec']['data']).name}, "
               f"{s['spec']['max_samples_per_category']} rows/category, {s['spec']['num_val_samples']} validation "
               f"rows; {env['device']} [{env.get('isa', '?')}], {env['threads']} threads, torch {env['torch']}; "
               f"load average before {env['load_before']}, after {env['load_after']}.")
    if env.get("reference_from"):
        out.append(f"Reference pipeline: the result of an earlier run on this machine ({env['reference_from']}).")
    out.append("Targets: " + ", ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in s["targets_met"].items()))
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="Hub id, local model folder, or 'smollm2-135m'.")
    p.add_argument("--data", default=str(REPO.parent / "shared/data/mmlu_pro/test.parquet"),
                   help="Data file (or 'demo'); both pipelines sample and split it the same way (seed 42).")
    p.add_argument("--task", default="category")
    p.add_argument("--max-samples-per-category", type=int, default=40)
    p.add_argument("--num-val-samples", type=int, default=None, help="Validate on the first N validation rows.")
    p.add_argument("--budget-s", type=float, default=300, help="Training wall-clock budget per pipeline (s).")
    p.add_argument("--max-length", type=int, default=512, help="The reference pads every example to this.")
    p.add_argument("--peak-seconds", type=float, default=1.5, help="Time per shape of the matmul-peak probe.")
    p.add_argument("--threads", type=int, default=None, help="torch threads in both workers (default: torch's).")
    p.add_argument("--only", choices=("reference", "ours"), default=None, help="Run one pipeline (debugging).")
    p.add_argument("--reference-from", default=None, metavar="WORKDIR",
                   help="Reuse the reference pipeline's result of an earlier run on this machine (its --workdir, "
                        "same model, data, rows, budget and threads) instead of running it again: its code "
                        "does not change with qwen-ft's, and it takes ~6 minutes on a 2-core CPU.")
    p.add_argument("--ours-override", action="append", default=[], metavar="KEY=VALUE",
                   help="Extra config for our pipeline, e.g. lora.dropout=0.05 (for lever measurements).")
    p.add_argument("--validate-override", action="append", default=[], metavar="KEY=VALUE",
                   help="Extra run_validate argument, e.g. decode=exact or batch_size=16.")
    p.add_argument("--json", default=None, help="Write the results here.")
    p.add_argument("--markdown", default=None, help="Write the markdown table here.")
    p.add_argument("--workdir", default=None, help="Scratch folder for run folders (default: a temp dir).")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        worker_main(a.worker, a.spec, a.out)
        return 0

    import torch

    sys.path.insert(0, str(REPO / "src"))
    from qwen_ft import malloc

    work = Path(a.workdir or tempfile.mkdtemp(prefix="qwen-ft-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    data = a.data if a.data in ("demo", "demo-mc") else str(Path(a.data).resolve())
    n_val = a.num_val_samples
    if n_val is None:
        n_val = len(prepared_rows({"data": data, "task": a.task,
                                   "max_samples_per_category": a.max_samples_per_category}).splits["validation"])
    spec = {"model": a.model, "data": data, "task": a.task, "max_samples_per_category": a.max_samples_per_category,
            "num_val_samples": n_val, "budget_s": a.budget_s, "peak_seconds": a.peak_seconds, "max_length": a.max_length, "threads": a.threads,
            "workdir": str(work), "ours_overrides": _kv(a.ours_override), "validate_overrides": _kv(a.validate_override)}
    earlier = _earlier_reference(Path(a.reference_from), spec) if a.reference_from else None  # before any write
    (work / "spec.json").write_text(json.dumps(spec))
    env = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else _cpu_name(),
           "isa": cpu_isa(), "threads": a.threads or torch.get_num_threads(), "torch": torch.__version__,
           "load_before": _load(), **({"reference_from": a.reference_from} if earlier is not None else {})}
    results = {"reference": earlier} if earlier is not None else {}
    for which in ("reference", "ours"):
        if (a.only and which != a.only) or which in results:
            continue
        out = work / f"{which}.json"
        print(f"== {which}: training for up to {a.budget_s:.0f}s, then validating {n_val} rows", flush=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", which, "--spec", str(work / "spec.json"),
               "--out", str(out)]
        envvars = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
        if which == "ours":  # what the `qwen-ft` command sets up when it starts (malloc.relaunch_with_huge_pages)
            envvars = malloc.environ_with_huge_pages(envvars) or envvars
        subprocess.run(cmd, check=True, env=envvars)
        results[which] = json.loads(out.read_text())
        print(json.dumps(results[which], indent=1), flush=True)
    env["load_after"] = _load()
    if a.only:
        return 0
    summary = summarize(results["reference"], results["ours"], spec, env)
    table = markdown(summary)
    summary["markdown"] = table
    print("\n" + table)
    if a.json:
        Path(a.json).write_text(json.dumps(summary, indent=2))
    if a.markdown:
        Path(a.markdown).write_text(table + "\n")
    return 0


def _earlier_reference(workdir: Path, spec: dict) -> dict:
    """The reference result of an earlier run, if that run measured the same thing."""
    try:
        earlier = json.loads((workdir / "spec.json").read_text())
        result = json.loads((workdir / "reference.json").read_text())
    except (OSError, ValueError) as e:
        _fail(f"--reference-from {workdir}: no reference result there ({e}); run without it")
    keys = ("model", "data", "task", "max_samples_per_category", "num_val_samples", "budget_s", "max_length",
            "threads")
    differs = [k for k in keys if earlier.get(k) != spec.get(k)]
    if differs:
        _fail(f"--reference-from {workdir}: that run measured another setting ({', '.join(differs)}); "
              "run without it, or with the same flags")
    return result


def _fail(message: str):
    print(f"vs_reference: {message}", file=sys.stderr)
    sys.exit(2)


def _kv(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def cpu_isa() -> str:
    """The matmul instruction sets that decide this CPU's bf16 peak: AMX tiles (Intel Sapphire Rapids and
    later) run bf16 ~8x faster than fp32; AVX512-BF16 (e.g. AMD EPYC Zen 4) ~2x; AVX2 has no bf16 at all.
    Figures of different machines can only be compared side by side with this printed next to them."""
    try:
        flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("flags")), [])
    except OSError:
        return "unknown"
    found = [name for flag, name in (("amx_bf16", "AMX-BF16"), ("avx512_bf16", "AVX512-BF16"),
                                     ("avx512f", "AVX512F"), ("avx2", "AVX2")) if flag in flags]
    return ", ".join(found) or "none of AMX/AVX512/AVX2"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"CPU ({os.cpu_count()} cores)"


if __name__ == "__main__":
    sys.exit(main())
