#!/usr/bin/env python
"""One lever at a time, in one process, variants interleaved (A B C A B C ...) so machine load hits all alike.

    python benchmarks/levers.py --model smollm2-135m --data ../shared/data/mmlu_pro/test.parquet --json levers.json

Training: tokens/s of LoRA training steps on the same length-grouped batches for
fp32 / bf16 autocast over fp32 weights / bf16 weights (LoRA fp32), LoRA dropout 0 vs 0.05, and
logits for the answer positions only vs every position, frozen linears held in bf16
(`models.frozen_in_compute_dtype`, the default on CPU: the same losses bit for bit), sdpa vs the default CPU
matmul attention (`qwen_ft.attention`, the default on CPU), padded vs always packed batches
(`training.batches.PackedCollator` with `pack_above=0`; the default packs only batches that would pad more than 1.2x,
and these length-grouped batches hardly pad), and each layer's MLP + norms compiled
(`models.compiled_blocks`, the `--torch-compile` path; the first step's seconds, compiling included, are
printed too; the whole model compiled measured 209.9 tokens/s after 165 s compiling, vs 251.7 for the
blocks). Validation: samples/s of exact scoring vs the fast trie decode, with and without the
shared-prefix KV cache, bf16 vs fp32 weights, sdpa vs the matmul attention, batch sizes; all through the inference engine
(`engine.Classifier`), except the decode without the shared prefix, which the engine always shares: that
one runs kernels.py's stateless kernels over the whole prompts, on the engine's batch plan.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from contextlib import ExitStack, nullcontext
from pathlib import Path

import torch
from peft.helpers import disable_input_dtype_casting

from qwen_ft.config import DataArgs, LoraArgs
from qwen_ft.data.prepare import prepare
from qwen_ft.encoding import PromptEncoder
from qwen_ft.inference.engine import Classifier
from qwen_ft.inference.kernels import Counts, greedy_trie, suffix_pass
from qwen_ft.models import (
    apply_lora,
    compiled_blocks,
    frozen_in_compute_dtype,
    load_model,
    load_tokenizer,
    resolve_model,
)
from qwen_ft.training.batches import LeftPadCollator, PackedCollator, answer_loss


def train_batches(encoder, rows, batch_size: int, n: int, seed: int = 0, pack_above: float | None = None) -> list[dict]:
    """n length-grouped batches (sorted mega-batch, as the Trainer's group_by_length does), padded on the left,
    or with `pack_above` collated by training.batches.PackedCollator (0: every batch one row without padding); the same
    examples either way."""
    feats = [encoder.train_example(r) for r in rows]
    random.Random(seed).shuffle(feats)
    feats = sorted(feats[: batch_size * n * 4], key=lambda f: -f["length"])
    groups = [feats[i: i + batch_size] for i in range(0, len(feats), batch_size)]
    random.Random(seed).shuffle(groups)
    pad = encoder.tok.pad_token_id
    collate = LeftPadCollator(pad) if pack_above is None else PackedCollator(pad, pack_above)
    return [collate(g) for g in groups[:n]]


class TrainVariant:
    def __init__(self, name, path, weights, autocast, dropout, keep_logits=True, cast_lora_input=True,
                 compiled=False, frozen_bf16=False, attn="sdpa", packed=False):
        self.name, self.autocast, self.keep_logits, self.packed = name, autocast, keep_logits, packed
        self.cast_lora_input = cast_lora_input
        torch.manual_seed(0)
        # attn None: the package default (qwen_ft.attention's matmul attention on the CPU, sdpa beyond it)
        model = load_model(path, weights, attn_implementation=attn)
        self.model = apply_lora(model, LoraArgs(rank=16, alpha=32, dropout=dropout))
        self.model.train()
        self.compiled = ExitStack()
        if compiled:
            self.compiled.enter_context(compiled_blocks(self.model))
        if frozen_bf16:  # the training default on CPU: frozen linears held in bf16 for the whole run
            self.compiled.enter_context(frozen_in_compute_dtype(self.model, torch.bfloat16))
        self.first_step_s = None
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=1e-4)
        self.times, self.tokens, self.losses = [], [], []

    def step(self, batch: dict) -> None:
        batch = dict(batch)
        labels = batch.pop("labels")
        keep = batch.pop("logits_to_keep")
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if self.autocast else nullcontext()
        # peft casts each LoRA input to the LoRA weights' dtype (bf16 activations -> fp32); optionally not
        no_cast = nullcontext() if self.cast_lora_input else disable_input_dtype_casting(self.model)
        t0 = time.perf_counter()
        with ctx, no_cast:
            out = self.model(**batch, logits_to_keep=keep if self.keep_logits else 0)
            if self.keep_logits:
                loss = answer_loss(out, labels)
            else:
                lg = out.logits[:, :-1].float()
                loss = torch.nn.functional.cross_entropy(lg.reshape(-1, lg.size(-1)), labels[:, 1:].reshape(-1))
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.times.append(time.perf_counter() - t0)
        self.tokens.append(int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel())
        self.losses.append(loss.item())


def bench_training(path, encoder, rows, steps: int, batch_size: int, only: str | None = None) -> dict:
    specs = [
        ("fp32, dropout 0.05", path, torch.float32, False, 0.05),
        ("fp32, dropout 0", path, torch.float32, False, 0.0),
        ("bf16 autocast / fp32 weights, dropout 0.05", path, torch.float32, True, 0.05),
        ("bf16 autocast / fp32 weights, dropout 0", path, torch.float32, True, 0.0),
        ("bf16 autocast / fp32 weights, frozen linears held in bf16, dropout 0, sdpa", path,
         torch.float32, True, 0.0, {"frozen_bf16": True}),
        ("bf16 autocast / fp32 weights, frozen linears held in bf16, dropout 0, matmul attention",
         path, torch.float32, True, 0.0, {"frozen_bf16": True, "attn": None}),
        ("bf16 autocast / fp32 weights, frozen linears held in bf16, dropout 0, matmul attention, every batch "
         "packed", path, torch.float32, True, 0.0, {"frozen_bf16": True, "attn": None, "packed": True}),
        ("bf16 autocast / fp32 weights, dropout 0, logits at every position", path, torch.float32,
         True, 0.0, {"keep_logits": False}),
        ("bf16 weights (LoRA fp32) + autocast, dropout 0", path, torch.bfloat16, True, 0.0),
        ("bf16 weights (LoRA fp32) + autocast, dropout 0, LoRA input not cast to fp32", path,
         torch.bfloat16, True, 0.0, {"cast_lora_input": False}),
        ("bf16 autocast / fp32 weights, dropout 0, compiled MLP + norms", path, torch.float32, True, 0.0,
         {"compiled": True}),
        ("bf16 autocast / fp32 weights, frozen linears held in bf16, dropout 0, matmul attention, compiled MLP + "
         "norms", path, torch.float32, True, 0.0, {"compiled": True, "frozen_bf16": True, "attn": None}),
    ]
    variants = [TrainVariant(*spec[:5], **(spec[5] if len(spec) > 5 else {})) for spec in specs
                if only is None or any(part in spec[0] for part in only.split("|"))]
    batches = {packed: train_batches(encoder, rows, batch_size, steps + 1, pack_above=0 if packed else None)
               for packed in (False, True)}
    for v in variants:  # warm-up step (allocator, kernels; compiling, for the compiled variant)
        v.step(batches[v.packed][0])
        v.first_step_s = round(v.times[0], 1)
        v.times, v.tokens = [], []
    for i in range(1, steps + 1):
        for v in variants:
            v.step(batches[v.packed][i])
    out = {v.name: round(sum(v.tokens) / sum(v.times), 1) for v in variants}
    out["first step s (includes compiling)"] = {v.name: v.first_step_s for v in variants}
    # same seed, same batches: a lever that only moves casts must give the very same losses
    out["losses"] = {v.name: [round(x, 6) for x in v.losses] for v in variants}
    return out


def decode_unshared(engine: Classifier, rows: list[dict], batch_size: int) -> list[str]:
    """The constrained decode's predictions with no shared-prefix KV cache: every row runs its whole prompt
    (kernels.py's kernels, prefix length 0, over the engine's batch plan for that length)."""
    prompts = [engine.encoder.prompt_ids(r) for r in rows]
    counts = Counts()
    preds: list[str] = [""] * len(rows)
    for idx in engine.plan(prompts, 0, batch_size):
        opts = [engine.encoder.answer_options(rows[i]) for i in idx]
        logits, kv, mask, lengths = suffix_pass(engine.model, [prompts[i] for i in idx], 0, None, engine.pad_id,
                                                engine.device, counts)
        chosen = greedy_trie(engine.model, logits, [seqs for _, seqs in opts], kv, mask, lengths, engine.device,
                             counts)
        for k, i in enumerate(idx):
            preds[i] = opts[k][0][chosen[k]]
    return preds


def bench_eval(path, encoder, rows, rounds: int) -> dict:
    models = {"bf16": load_model(path, torch.bfloat16).eval(), "fp32": load_model(path, torch.float32).eval(),
              "bf16 sdpa": load_model(path, torch.bfloat16, attn_implementation="sdpa").eval()}
    # one engine per weight dtype, built (instruction KV cache included) before any timing
    engines = {dtype: Classifier(m, encoder, dtype, {"model_path": str(path)}) for dtype, m in models.items()}
    cases = [
        ("exact score, bf16, batch 16", "bf16", "exact", 16, True),
        ("trie decode, bf16, batch 16, no shared prefix", "bf16", "constrained", 16, False),
        ("trie decode, fp32, batch 32, shared prefix", "fp32", "constrained", 32, True),
        ("trie decode, bf16, batch 8, shared prefix", "bf16", "constrained", 8, True),
        ("trie decode, bf16, batch 16, shared prefix", "bf16", "constrained", 16, True),
        ("trie decode, bf16, batch 32, shared prefix", "bf16", "constrained", 32, True),
        ("trie decode, bf16, batch 32, shared prefix, sdpa attention", "bf16 sdpa", "constrained", 32, True),
        ("trie decode, bf16, batch 64, shared prefix", "bf16", "constrained", 64, True),
    ]
    out: dict[str, list[float]] = {c[0]: [] for c in cases}
    preds = {}
    for _ in range(rounds):
        for name, dtype, decode, bs, share in cases:
            engine = engines[dtype]
            t0 = time.perf_counter()
            if share:
                res = [r["pred"] for r in engine.classify(rows, decode=decode, batch_size=bs)[0]]
            else:
                res = decode_unshared(engine, rows, bs)
            out[name].append(len(rows) / (time.perf_counter() - t0))
            preds[name] = res
    result = {k: round(statistics.median(v), 2) for k, v in out.items()}
    base = preds["trie decode, bf16, batch 32, shared prefix"]
    result["agreement of sdpa with the default matmul attention"] = round(
        sum(a == b for a, b in zip(base, preds["trie decode, bf16, batch 32, shared prefix, sdpa attention"]))
        / len(base), 3)
    result["agreement with 'exact score' (untrained model)"] = round(
        sum(a == b for a, b in zip(base, preds["exact score, bf16, batch 16"])) / len(base), 3)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/mmlu_pro/test.parquet"))
    p.add_argument("--max-samples-per-category", type=int, default=40)
    p.add_argument("--train-steps", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--eval-rows", type=int, default=56)
    p.add_argument("--eval-rounds", type=int, default=2)
    p.add_argument("--skip", choices=("train", "eval"), default=None)
    p.add_argument("--only", default=None, help="Train only the variants whose name contains this text (several: A|B).")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    prepared = prepare(DataArgs(data=a.data, task="category", max_samples_per_category=a.max_samples_per_category), 42)
    path = resolve_model(a.model)
    encoder = PromptEncoder(load_tokenizer(path), prepared.task, 512)
    result = {"threads": torch.get_num_threads(), "torch": torch.__version__}
    if a.skip != "train":
        result["train_tokens_per_s"] = bench_training(path, encoder, prepared.splits["train"], a.train_steps,
                                                      a.batch_size, a.only)
        print(json.dumps(result["train_tokens_per_s"], indent=1), flush=True)
    if a.skip != "eval":
        result["eval_samples_per_s"] = bench_eval(path, encoder, prepared.splits["validation"][: a.eval_rows],
                                                  a.eval_rounds)
        print(json.dumps(result["eval_samples_per_s"], indent=1), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
