"""The CPU matmul attention (qwen_ft.attention) computes what sdpa computes: padded batches, a shared KV-cache
prefix, grouped-query heads, and gradients."""

from __future__ import annotations

import copy

import torch

from qwen_ft import attention
from qwen_ft.config import LoraArgs
from qwen_ft.models import apply_lora


def tiny(seed: int = 0):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    # 6 query heads over 2 key/value heads: the grouping must pair each query head with its own kv head
    config = Qwen3Config(vocab_size=80, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=2, head_dim=8, attn_implementation="sdpa")
    return Qwen3ForCausalLM(config).eval()


def padded_batch():
    g = torch.Generator().manual_seed(3)
    lengths = (7, 3, 10)
    ids = torch.zeros(3, 10, dtype=torch.long)
    mask = torch.zeros(3, 10, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, 10 - n:] = torch.randint(1, 80, (n,), generator=g)
        mask[i, 10 - n:] = 1
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def switched(model):
    other = copy.deepcopy(model)
    assert attention.use_on(other) and other.config._attn_implementation == attention.NAME
    return other


def test_padded_batch_logits_match_sdpa_on_every_real_position():
    model = tiny()
    fast = switched(model)
    ids, mask, pos = padded_batch()
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        b = fast(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        c = fast(input_ids=ids[2:]).logits  # no padding: transformers passes no mask, causal is implied
    real = mask.bool()
    assert torch.allclose(a[real], b[real], atol=1e-5), (a[real] - b[real]).abs().max()
    assert torch.allclose(c[0], a[2], atol=1e-5)
    assert not torch.isnan(b).any()  # fully masked (padding) rows stay finite


def test_suffixes_over_a_shared_prefix_cache_match_sdpa():
    model = tiny()
    fast = switched(model)
    prefix = torch.randint(1, 80, (1, 6), generator=torch.Generator().manual_seed(4))
    ids, mask, pos = padded_batch()
    outs = []
    with torch.no_grad():
        for m in (model, fast):
            cache = m(input_ids=prefix, use_cache=True).past_key_values
            cache.batch_repeat_interleave(3)
            full = torch.cat([torch.ones(3, 6, dtype=torch.long), mask], dim=1)
            outs.append(m(input_ids=ids, attention_mask=full, position_ids=pos + 6, past_key_values=cache,
                          use_cache=True).logits[:, -1])
    assert torch.allclose(outs[0], outs[1], atol=1e-5), (outs[0] - outs[1]).abs().max()


def test_lora_gradients_match_sdpa():
    ids, mask, pos = padded_batch()
    grads = []
    for switch in (False, True):
        model = tiny()
        if switch:
            attention.use_on(model)
        model = apply_lora(model, LoraArgs(rank=4, alpha=8, dropout=0.0)).train()
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(hash(name) % 1000))
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        logits[mask.bool()].logsumexp(-1).sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4), name
    assert any(g.abs().sum() > 0 for g in grads[1].values() if g is not None)


def test_large_score_matrices_fall_back_to_sdpa_exactly(monkeypatch):
    model = tiny()
    fast = switched(model)
    ids, mask, pos = padded_batch()
    monkeypatch.setattr(attention, "MAX_SCORES", 0)
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        b = fast(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    assert torch.equal(a, b)


def test_only_the_default_sdpa_is_switched():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    model = Qwen3ForCausalLM(Qwen3Config(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                         attn_implementation="eager"))
    assert not attention.use_on(model) and model.config._attn_implementation == "eager"


def test_packed_segments_over_a_prefix_match_sdpa_and_skip_the_masked_pairs(monkeypatch):
    """scoring.packed_pass passes the segment lengths: the segment path must give sdpa's logits under the
    block-diagonal mask (prefix 6 tokens, then segments of 1, 5 and 3), without building the packed scores."""
    from qwen_ft.inference.kernels import Counts, packed_pass, prefix_cache

    model = tiny()
    fast = switched(model)
    g = torch.Generator().manual_seed(5)
    prefix = torch.randint(1, 80, (6,), generator=g).tolist()
    seqs = [torch.randint(1, 80, (n,), generator=g).tolist() for n in (1, 5, 3)]
    outs = [packed_pass(m, seqs, 6, prefix_cache(m, prefix, "cpu"), "cpu", Counts()) for m in (model, fast)]
    assert torch.allclose(outs[0], outs[1], atol=1e-5), (outs[0] - outs[1]).abs().max()
    no_prefix = [packed_pass(m, seqs, 0, None, "cpu", Counts()) for m in (model, fast)]
    assert torch.allclose(no_prefix[0], no_prefix[1], atol=1e-5)
    widest = []  # the widest score matrix the segment path built: a segment's keys, not the whole pack
    original = torch.Tensor.softmax
    monkeypatch.setattr(torch.Tensor, "softmax", lambda self, dim: widest.append(self.shape[-1]) or original(self, dim))
    packed_pass(fast, seqs, 6, prefix_cache(fast, prefix, "cpu"), "cpu", Counts())
    assert widest and max(widest) == 6 + 5
