"""Attention on the CPU: plain matmuls for the short rows a classifier sees, sdpa for everything else.

PyTorch's CPU sdpa kernel (flash attention in blocks) runs this model family's attention (head dim 64,
grouped-query heads, 60-400 tokens) at 40-65 GFLOP/s where a bf16 matmul of the same size runs at
several hundred, and it repeats every key/value head for the query heads of its group first (a copy,
and a sum in the backward pass). Here the query heads of a group are stacked on the rows of one matmul
against their shared key/value head, so nothing is repeated: on an AVX512-BF16 EPYC, forward + backward
of one layer (8 rows of 80 tokens) took 3.5 ms vs 11.4 ms for sdpa (`benchmarks/levers.py` measures it in
whole training steps). The scores are computed and normalised in fp32 and the probabilities rounded to the
value dtype before the product with the values, which is what sdpa's CPU kernel does with bf16 inputs.

Packed rows (`scoring.packed_pass`: several prompts in one row over a shared prefix cache;
`training.batches.PackedCollator`: several examples in one row) pass their segment lengths as the keyword SEGMENTS:
each segment then attends to the prefix and to itself only, as the block-diagonal mask says, without scoring
the masked pairs (one 512-token pack of 5 prompts: 6.0-7.6 ms per layer under the mask, 1.8 ms per segment).
A call that cannot honour the segments raises rather than attend across them.

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
SEGMENTS = "qwen_ft_segments"  # keyword of a packed row's segment lengths (a list of ints), passed by model(...)
MAX_SCORES = 1 << 22  # batch x heads x queries x keys: 16 MB of fp32 scores per layer, 8 rows of ~250 tokens


def matmul_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                     is_causal=None, **kwargs):
    """transformers' attention-function signature: query [B, H, Tq, D], key/value [B, Hkv, Tk, D], mask
    bool [B, 1, Tq, Tk] (True: attend) or None (causal); returns ([B, Tq, H, D], None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    b, h, tq, d = query.shape
    hkv, tk = key.shape[1], key.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    scale = d ** -0.5 if scaling is None else scaling
    # what only sdpa does: GPU tensors, dropout, soft-capping, sliding windows, query heads not grouped evenly
    not_for_us = query.device.type != "cpu" or bool(dropout and module.training) or h % hkv \
        or kwargs.get("softcap") is not None or bool(kwargs.get("sliding_window"))
    segments = kwargs.get(SEGMENTS)
    if segments is not None:  # a packed row: attending across its segments would be silently wrong, so no fallback
        if not_for_us or b != 1:
            raise RuntimeError(f"packed segments ({SEGMENTS}) reached an attention call that cannot honour them "
                               f"(batch {b}, device {query.device.type}, dropout {dropout}, softcap "
                               f"{kwargs.get('softcap')}, sliding window {kwargs.get('sliding_window')})")
        return segment_attention(query, key, value, segments, scale), None
    if not_for_us or b * h * tq * tk > MAX_SCORES or (attention_mask is None and not causal) \
            or (attention_mask is not None and attention_mask.dtype != torch.bool):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    g = h // hkv
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


def segment_attention(query, key, value, segments: list[int], scale: float) -> torch.Tensor:
    """One packed row: query [1, H, T, D] holds consecutive segments of `segments` tokens (sum T); key/value
    [1, Hkv, P + T, D] a shared prefix of P positions, then the same T. Each segment attends causally to
    itself and to the whole prefix. Returns [1, T, H, D]. The segments are laid out as a padded batch [S, L]
    (L: the longest) for the matmuls; the prefix keys are multiplied once for all of them, not repeated.
    Without a prefix (training) and with more than MAX_SCORES scores, sdpa's kernel runs each segment."""
    _, h, t, d = query.shape
    hkv, p = key.shape[1], key.shape[2] - t
    g, n, width = h // hkv, len(segments), max(segments)
    if not p and n * h * width * width > MAX_SCORES:  # long training rows: sdpa's kernel per segment (memory)
        out, start = [], 0
        for length in segments:
            part = slice(start, start + length)
            out.append(torch.nn.functional.scaled_dot_product_attention(
                query[:, :, part], key[:, :, part], value[:, :, part], is_causal=True, scale=scale, enable_gqa=True))
            start += length
        return torch.cat(out, dim=2).transpose(1, 2).contiguous()
    lengths = torch.tensor(segments)
    slot = torch.arange(width)
    valid = slot < lengths[:, None]  # [S, L]
    # a padding slot reads a real token; index_select, not advanced indexing: its backward is an index_add, where
    # indexing's is an accumulating index_put (fwd + bwd of this gather, 1,557 tokens in 8 segments: 0.97 vs 3.85 ms)
    idx = ((lengths.cumsum(0) - lengths)[:, None] + slot).clamp(max=t - 1).flatten()
    with torch.autocast(query.device.type, enabled=False):
        # [Hkv, S, g, L, D]: the g query heads of a key/value head, per segment
        q = query[0].view(hkv, g, t, d).index_select(2, idx).view(hkv, g, n, width, d)
        q = (q.transpose(1, 2).float() * scale).contiguous()
        k_own = key[0, :, p:].index_select(1, idx).view(hkv, n, width, d).float()  # [Hkv, S, L, D]
        v_own = value[0, :, p:].index_select(1, idx).view(hkv, n, width, d)
        own = torch.matmul(q.view(hkv * n, g * width, d), k_own.view(hkv * n, width, d).transpose(-1, -2))
        own = own.view(hkv, n, g, width, width)
        keep = torch.ones(width, width, dtype=torch.bool).tril() & valid[:, None, None, :]  # [S, 1, L, L]
        own = own.masked_fill(~keep, torch.finfo(own.dtype).min).view(hkv, n, g * width, width)
        if p:
            pre = torch.matmul(q.view(hkv, n * g * width, d), key[0, :, :p].float().transpose(-1, -2))
            probs = torch.cat([pre.view(hkv, n, g * width, p), own], dim=-1).softmax(-1).to(value.dtype)
            out = torch.matmul(probs[..., :p].reshape(hkv, n * g * width, p), value[0, :, :p]).view(
                hkv, n, g * width, d)
            out = (out.float() + torch.matmul(probs[..., p:], v_own).float()).to(value.dtype)  # one rounding
        else:
            out = torch.matmul(own.softmax(-1).to(value.dtype), v_own)
    # [Hkv, S, g, L, D] -> [S * L, Hkv, g, D] -> the valid slots, in packed order -> [1, T, H, D]
    out = out.view(hkv, n, g, width, d).permute(1, 3, 0, 2, 4).reshape(n * width, h, d)
    return out.index_select(0, valid.flatten().nonzero().squeeze(1)).view(1, t, h, d)


def register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, matmul_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def full_attention_only(config) -> bool:
    """Every layer attends to every earlier position: no sliding window, no recurrent/linear-attention layer
    (either would see across the rows of a packed batch)."""
    return (set(getattr(config, "layer_types", None) or ["full_attention"]) == {"full_attention"}
            and not getattr(config, "sliding_window", None))


def packs(model) -> bool:
    """Whether every attention call of `model` (on the CPU, this attention) honours packed segments: full causal
    attention in every layer, no attention dropout, no soft-capping (those raise in matmul_attention)."""
    config = model.config
    return (next(model.parameters()).device.type == "cpu" and getattr(config, "_attn_implementation", None) == NAME
            and full_attention_only(config) and not getattr(config, "attention_dropout", 0.0)
            and getattr(config, "attn_logit_softcapping", None) is None)


def use_on(model) -> bool:
    """Switch a model that runs sdpa (transformers' default) to this attention; True if it did. On a GPU
    (a model loaded on the CPU and moved later) every call falls back to sdpa."""
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    register()
    model.set_attn_implementation(NAME)
    return True
