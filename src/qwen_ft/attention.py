"""Attention on the CPU: plain matmuls for the short rows a classifier sees, sdpa for everything else.

PyTorch's CPU sdpa kernel (flash attention in blocks) runs this model family's attention (head dim 64,
grouped-query heads, 60-400 tokens) at 40-65 GFLOP/s where a bf16 matmul of the same size runs at
several hundred, and it repeats every key/value head for the query heads of its group first (a copy,
and a sum in the backward pass). Here the query heads of a group are stacked on the rows of one matmul
against their shared key/value head, so nothing is repeated: on an AVX512-BF16 EPYC, forward + backward
of one layer (8 rows of 80 tokens) took 3.5 ms vs 11.4 ms for sdpa (`benchmarks/levers.py` measures it in
whole training steps). The scores are computed and normalised in fp32 and the probabilities rounded to the
value dtype before the product with the values, which is what sdpa's CPU kernel does with bf16 inputs.

Registered with transformers' AttentionInterface under NAME, with sdpa's boolean mask; `use_on(model)`
switches a model with the default attention to it (`models.load_model` does). Falls back to sdpa for
whatever it is not for: GPU tensors, dropout, soft-capping, sliding windows, non-causal calls without a
mask, and score matrices above MAX_SCORES elements (their memory: the backward pass keeps them, per layer).

Hand-written because no maintained library has a CPU attention kernel that beats this at these sizes
(Liger and flash-attn are GPU kernels; sdpa is measured above).
"""

from __future__ import annotations

import torch

NAME = "qwen_ft_cpu"
MAX_SCORES = 1 << 22  # batch x heads x queries x keys: 16 MB of fp32 scores per layer, 8 rows of ~250 tokens


def matmul_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                     is_causal=None, **kwargs):
    """transformers' attention-function signature: query [B, H, Tq, D], key/value [B, Hkv, Tk, D], mask
    bool [B, 1, Tq, Tk] (True: attend) or None (causal); returns ([B, Tq, H, D], None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    b, h, tq, d = query.shape
    hkv, tk = key.shape[1], key.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if query.device.type != "cpu" or (dropout and module.training) or kwargs.get("softcap") is not None \
            or kwargs.get("sliding_window") or h % hkv or b * h * tq * tk > MAX_SCORES \
            or (attention_mask is None and not causal) \
            or (attention_mask is not None and attention_mask.dtype != torch.bool):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    g = h // hkv
    scale = d ** -0.5 if scaling is None else scaling
    if attention_mask is None:  # causal: the queries are the last tq of the tk positions
        attention_mask = torch.ones(tq, tk, dtype=torch.bool, device=query.device).tril(tk - tq)
    else:  # [B, 1, 1, Tq, Tk] against scores [B, Hkv, g, Tq, Tk]
        attention_mask = attention_mask[:, :, None, :, :tk]
    with torch.autocast(query.device.type, enabled=False):
        # the g query heads of a key/value head (consecutive, as transformers' repeat_kv orders them) as rows
        q = query.reshape(b, hkv, g * tq, d).float() * scale
        scores = torch.matmul(q, key.float().transpose(-1, -2)).view(b, hkv, g, tq, tk)
        # a fully masked row (a left-padding position) gets uniform weights, not NaN: its output is unused,
        # but a NaN there would reach the weight gradients through 0 * NaN
        scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        probs = scores.softmax(-1).to(value.dtype)
        out = torch.matmul(probs.view(b, hkv, g * tq, tk), value)
    return out.view(b, h, tq, d).transpose(1, 2).contiguous(), None


def register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, matmul_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def use_on(model) -> bool:
    """Switch a model that runs sdpa (transformers' default) to this attention; True if it did. On a GPU
    (a model loaded on the CPU and moved later) every call falls back to sdpa."""
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    register()
    model.set_attn_implementation(NAME)
    return True
