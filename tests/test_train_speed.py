"""Training speed levers that must not change a single value: frozen weights held in the autocast dtype."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest
import torch

from qwen_ft.config import LoraArgs
from qwen_ft.models import apply_lora, frozen_in_compute_dtype
from qwen_ft.training import LeftPadCollator, answer_loss


def tiny_lora_model(seed: int = 0):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    base = Qwen3ForCausalLM(Qwen3Config(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                        tie_word_embeddings=True))
    model = apply_lora(base, LoraArgs(rank=4, alpha=8, dropout=0.0))
    for name, p in model.named_parameters():  # LoRA B starts at zero: give it values, so its gradient path counts
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return model.train()


def batch() -> dict:
    g = torch.Generator().manual_seed(1)
    feats = []
    for n in (9, 5, 12):  # different lengths: left padding, a mask, and a sliced logits_to_keep
        ids = torch.randint(3, 96, (n,), generator=g).tolist()
        feats.append({"input_ids": ids, "labels": [-100] * (n - 2) + ids[-2:]})
    return LeftPadCollator(0)(feats)


def step(model) -> tuple[torch.Tensor, dict]:
    b = dict(batch())
    labels, keep = b.pop("labels"), b.pop("logits_to_keep")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = answer_loss(model(**b, logits_to_keep=keep), labels)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def test_frozen_linears_held_in_bf16_compute_the_same_loss_and_gradients_bit_for_bit():
    reference, held = tiny_lora_model(), tiny_lora_model()
    loss_ref, grads_ref = step(reference)
    embed = held.get_input_embeddings().weight
    q = held.base_model.model.model.layers[0].self_attn.q_proj
    with frozen_in_compute_dtype(held, torch.bfloat16):
        # the lever did act: frozen projections and the output head in bf16, everything trained and the
        # embedding (the residual stream) still fp32, and the head no longer shares the embedding's tensor
        assert q.base_layer.weight.dtype == torch.bfloat16 and q.lora_A["default"].weight.dtype == torch.float32
        assert held.get_output_embeddings().weight.dtype == torch.bfloat16 and embed.dtype == torch.float32
        assert not q.cast_input_dtype_enabled
        loss_held, grads_held = step(held)
    assert torch.equal(loss_held, loss_ref), (loss_held.item(), loss_ref.item())
    assert grads_held.keys() == grads_ref.keys() and len(grads_ref) == 2 * 7 * 2
    for name, g in grads_ref.items():
        assert torch.equal(grads_held[name], g), name
    assert any(g.abs().sum() > 0 for g in grads_ref.values())
    # on exit the caller's model is as it was: fp32 weights, the tie restored, peft's input casting back on
    assert q.base_layer.weight.dtype == torch.float32 and q.cast_input_dtype_enabled
    assert held.get_output_embeddings().weight is held.get_input_embeddings().weight
    assert all(p.dtype == torch.float32 for p in held.parameters())


def test_fp32_precision_leaves_the_model_untouched():
    model = tiny_lora_model()
    before = {n: p for n, p in model.named_parameters()}
    with frozen_in_compute_dtype(model, torch.float32):
        assert {n: p for n, p in model.named_parameters()} == before
    with frozen_in_compute_dtype(model, None):
        assert all(p.dtype == torch.float32 for p in model.parameters())



@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_allocator_thresholds_apply_on_glibc_unless_turned_off():
    # mallopt is process-wide and cannot be undone: each setting in its own process. (Whether glibc's defaults
    # fault freed pages in again depends on the process's history - 6,144 to 286,080 minor faults for the same
    # 20 cycles of 60 MB in repeated runs - so the speed is measured by the benchmarks, not asserted here.)
    probe = "from qwen_ft.precision import resolve_precision, tune_allocator; resolve_precision('fp32'); " \
            "print(tune_allocator())"

    def applied(mode: str) -> str:
        env = {**os.environ, "QWEN_FT_MALLOC": mode}
        return subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                              check=True).stdout.strip()

    assert applied("tuned") == "True" and applied("system") == "False"
