"""Label-constrained decoding and scoring, and free decoding: the forward passes behind `engine.Classifier`.

Knows tokens and answers, not files, and keeps no state: every function takes the model and returns
what it computed; the tokens it ran are added to a `Counts` that the caller owns (one per call), so one
model can serve concurrent callers.

Two constrained modes; both always return one of the row's answers:

* `constrained` (the fast default): greedy decoding restricted to a token trie of the row's answers. The
  instruction (system message + chat template head) is identical across rows, so its KV cache is
  computed once and shared by every batch; each row then runs only its own suffix, and only the last
  position's logits are computed. Answers whose first token is unique are decided by that one pass;
  only rows whose best first token is shared by several answers take further single-token steps.
* `exact`: the exact log-probability of writing each answer (and then ending the turn), from one pass
  over the row's suffix on top of the shared instruction cache, and one pass over every answer's
  continuation on top of that; gives a probability distribution over the answers.

Why hand-written: `generate(prefix_allowed_tokens_fn=...)` recomputes the shared instruction for every
row, runs the full vocabulary head at every step and gives no distribution over labels.
"""

from __future__ import annotations

import copy
import functools
import inspect
import time
from dataclasses import dataclass

import torch

from qwen_ft import attention


@dataclass
class Counts:
    """Tokens of one call: in the prompts, and actually run through the model (a shared prefix once)."""

    prompt_tokens: int = 0
    computed_tokens: int = 0


def _cache_in(model, kv) -> dict:
    """The KV cache as this transformers version takes it: `cache=` (5.2x; `past_key_values=` is deprecated
    there and goes in 5.40) or `past_key_values=` (earlier 5.x)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {_cache_keyword(type(base)): kv}


@functools.cache
def _cache_keyword(model_class) -> str:
    """Looked up once per model class, not on every forward pass."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def _cache_out(out):
    """The KV cache a forward pass returned, under either name."""
    cache = out.get("cache")
    return cache if cache is not None else out.get("past_key_values")


def left_pad(seqs: list[list[int]], pad_id: int, device, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, width] ids padded on the left with `pad_id` (width: the longest by default), and the mask of real tokens."""
    width = width or max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.as_tensor(s)
        mask[i, width - len(s):] = 1
    return ids.to(device), mask.to(device)


def common_prefix(prompts: list[list[int]]) -> list[int]:
    """The longest common token prefix of all prompts, leaving at least one own token per prompt."""
    first = prompts[0]
    n = min(len(p) for p in prompts) - 1
    for p in prompts[1:]:
        k = 0
        while k < n and p[k] == first[k]:
            k += 1
        n = k
    return first[:max(n, 0)]


@torch.inference_mode()
def prefix_cache(model, prefix: list[int], device):
    """The KV cache of `prefix` (batch 1), or None for an empty prefix. Callers deep-copy it per batch:
    every forward pass appends to the cache it is given."""
    if not prefix:
        return None
    out = model(input_ids=torch.tensor([prefix], device=device), use_cache=True, logits_to_keep=1)
    return _cache_out(out)


@torch.inference_mode()
def suffix_pass(model, suffixes: list[list[int]], prefix_len: int, cache, pad_id: int, device, counts: Counts):
    """Last-position logits [B, V] (float, on CPU) of prefix + each suffix, and the (cache, mask, lengths)
    to continue from. `cache` is the prefix cache (batch 1; not modified) or None. Raw logits, not
    log-probs: choosing among a row's answers needs only their differences (a log_softmax over a 151k
    vocabulary took a third of the constrained time of a tiny model)."""
    ids, mask = left_pad(suffixes, pad_id, device)
    b = ids.size(0)
    counts.computed_tokens += int(mask.sum())
    pos = prefix_len + (mask.cumsum(-1) - 1).clamp(min=0)
    kv = None
    if cache is not None:
        kv = copy.deepcopy(cache)
        kv.batch_repeat_interleave(b)
        mask = torch.cat([torch.ones((b, prefix_len), dtype=mask.dtype, device=device), mask], dim=1)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, **_cache_in(model, kv), use_cache=True,
                logits_to_keep=1)
    lengths = prefix_len + mask[:, prefix_len:].sum(1)
    return out.logits[:, -1].float().cpu(), _cache_out(out), mask, lengths


@torch.inference_mode()
def packed_pass(model, suffixes: list[list[int]], prefix_len: int, cache, device, counts: Counts) -> torch.Tensor:
    """Last-position logits [B, V] (float, on CPU) of prefix + each suffix, like `suffix_pass`, with the
    suffixes packed into one row and no padding: each token attends to the shared prefix and to its own
    suffix only (a block-diagonal causal mask), positions restart after the prefix for every suffix, and
    the prefix cache is used at batch 1 as it is. Leaves nothing to continue from: for rows that one pass
    decides. Hand-written: transformers' packed-sequence support (position ids only) does not combine a
    packed row with a shared prefix cache."""
    lengths = torch.tensor([len(s) for s in suffixes])
    total = int(lengths.sum())
    segment = torch.repeat_interleave(torch.arange(len(suffixes)), lengths)
    starts = lengths.cumsum(0) - lengths
    pos = (prefix_len + torch.arange(total) - starts[segment]).unsqueeze(0)
    own = (segment[:, None] == segment[None, :]) & torch.ones(total, total, dtype=torch.bool).tril()
    mask = torch.cat([torch.ones(total, prefix_len, dtype=torch.bool), own], dim=1)[None, None]
    ids = torch.tensor([t for s in suffixes for t in s]).unsqueeze(0)
    counts.computed_tokens += total
    # the segment lengths let qwen-ft's CPU attention skip the masked pairs; other attentions ignore them
    out = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device),
                **_cache_in(model, copy.deepcopy(cache) if cache is not None else None), use_cache=cache is not None,
                logits_to_keep=(lengths.cumsum(0) - 1).to(device), **{attention.SEGMENTS: lengths.tolist()})
    return out.logits[0].float().cpu()


@torch.inference_mode()
def greedy_trie(model, logp: torch.Tensor, options: list[list[list[int]]], kv, mask, lengths, device,
                counts: Counts) -> list[int]:
    """Per row: the index of the option chosen by greedy decoding over the row's token trie (`logp`: the
    last position's logits or log-probs; only their order among a row's tokens matters)."""
    b = logp.size(0)
    cands = [list(range(len(o))) for o in options]  # option indices still possible per row
    chosen: list[int | None] = [None] * b
    step = 0
    while True:
        pending = []
        for i in range(b):
            if chosen[i] is not None:
                continue
            if len(cands[i]) == 1:
                chosen[i] = cands[i][0]
                continue
            pending.append(i)
        if not pending:
            return chosen
        next_tok = torch.zeros(b, dtype=torch.long)
        for i in pending:
            seqs = options[i]
            tokens = sorted({seqs[j][step] for j in cands[i]})
            tok = tokens[int(logp[i, tokens].argmax())]
            cands[i] = [j for j in cands[i] if seqs[j][step] == tok]
            next_tok[i] = tok
        if all(len(cands[i]) == 1 for i in pending):
            continue
        # some rows still ambiguous: feed their chosen token (all rows step together; cheap: 1 token each)
        mask = torch.cat([mask, torch.ones((b, 1), dtype=mask.dtype, device=device)], dim=1)
        out = model(input_ids=next_tok.unsqueeze(1).to(device), attention_mask=mask,
                    position_ids=lengths.unsqueeze(1), **_cache_in(model, kv), use_cache=True, logits_to_keep=1)
        counts.computed_tokens += b
        kv, lengths = _cache_out(out), lengths + 1
        logp = out.logits[:, -1].float().cpu()
        step += 1


@torch.inference_mode()
def option_logprobs(model, suffixes: list[list[int]], options: list[list[list[int]]], prefix_len: int, cache,
                    pad_id: int, device, counts: Counts) -> torch.Tensor:
    """[B, N] log P(option | prefix + suffix) for each row's options (full token sequences); -inf where a
    row has fewer than N options."""
    last, kv, mask, lengths = suffix_pass(model, suffixes, prefix_len, cache, pad_id, device, counts)
    b, n = len(suffixes), max(len(o) for o in options)
    width = max(1, max(len(s) for o in options for s in o) - 1)
    firsts = torch.zeros((b, n), dtype=torch.long)
    present = torch.zeros((b, n), dtype=torch.bool)
    cont = torch.full((b * n, width), pad_id, dtype=torch.long)
    targets = torch.full((b * n, width), -1, dtype=torch.long)
    for i, row_options in enumerate(options):
        for j, seq in enumerate(row_options):
            firsts[i, j], present[i, j] = seq[0], True
            cont[i * n + j, : len(seq) - 1] = torch.as_tensor(seq[:-1])
            targets[i * n + j, : len(seq) - 1] = torch.as_tensor(seq[1:])
    first = (last.gather(1, firsts) - torch.logsumexp(last, -1, keepdim=True)).masked_fill(~present, float("-inf"))
    if all(len(s) == 1 for o in options for s in o):
        return first
    kv.batch_repeat_interleave(n)
    cont, targets = cont.to(device), targets.to(device)
    full_mask = torch.cat([mask.repeat_interleave(n, 0), torch.ones_like(cont)], dim=1)
    cont_pos = lengths.repeat_interleave(n).unsqueeze(1) + torch.arange(width, device=device)
    counts.computed_tokens += int(cont.numel())
    logits = model(input_ids=cont, attention_mask=full_mask, position_ids=cont_pos, **_cache_in(model, kv),
                   use_cache=False).logits.float()
    logp = torch.log_softmax(logits, dim=-1)
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (targets >= 0)
    return first + picked.sum(-1).view(b, n).cpu()


@torch.inference_mode()
def generate_texts(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, stop: list[int], pad_id: int,
                   device, counts: Counts) -> list[str]:
    """Free greedy decoding of each prompt (for comparison with parsers of generated text)."""
    ids, mask = left_pad(prompts, pad_id, device)
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, num_beams=1,
                         max_new_tokens=max_new_tokens, eos_token_id=stop, pad_token_id=pad_id,
                         temperature=None, top_p=None, top_k=None)
    counts.computed_tokens += int(mask.sum()) + len(prompts) * (out.size(1) - ids.size(1))
    return [tokenizer.decode(out[k, ids.size(1):], skip_special_tokens=True) for k in range(len(prompts))]


def match_answer(text: str, answers: dict[str, str]) -> str | None:
    """The label whose answer equals the whole output (case-insensitive, ignoring surrounding spaces and a
    final period), else None."""
    cleaned = text.strip().rstrip(".").strip().lower()
    for label, answer in answers.items():
        if cleaned == answer.strip().rstrip(".").strip().lower():
            return label
    return None


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0

