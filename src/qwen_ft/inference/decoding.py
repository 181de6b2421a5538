"""One batch of rows scored under one decode: the per-row results `engine.Classifier` returns, from the forward
passes of `kernels`.

Decoding (`decode=`):
* `constrained` (default): greedy over the row's answers' token trie, the shared instruction computed
  once. `probability` is that of the chosen first answer token, renormalized over the row's distinct
  first tokens; answers that start with the same token share its probability in `top`.
* `exact`: each answer's full log-probability; `probability`/`top` are the softmax over the row's
  answers of the log-probabilities, optionally normalized (`normalize=`): `token` divides by the
  number of answer tokens (end of turn included), `char` by the number of characters of the answer
  text as written after the prompt (lm-evaluation-harness `acc_norm`).
* `free`: greedy text, valid only when it equals an answer.
* `head`: the only decode of a `--head classification` run (`auto` picks it): one pass over each left-padded
  prompt; `probability`/`top` are the softmax of the head's logits over the labels.

A row's result: `pred`, `probability`, `raw_probability`, `top` ([label, probability] pairs), `valid`, and
`scores`, the raw scores its softmax is taken over (`qwen_ft.inference.calibration`).
"""

from __future__ import annotations

import torch

from qwen_ft import attention
from qwen_ft.encoding import check_head_prompt
from qwen_ft.errors import UserError
from qwen_ft.inference import calibration as calib
from qwen_ft.inference.kernels import (
    Counts,
    generate_texts,
    greedy_trie,
    left_pad,
    match_answer,
    option_logprobs,
    packed_pass,
    suffix_pass,
)

DECODES = ("auto", "constrained", "exact", "free", "head")
NORMALIZE = ("auto", "none", "token", "char")
# Pack a batch (no padding; kernels.packed_pass) when padding it would cost more than this x its real tokens:
# on CPU, random groups of rows padded to ~2x their real tokens ran twice as fast packed, while length-sorted
# groups (little padding) ran faster padded (a packed row's attention spans the whole pack; docs/performance.md).
PACK_ABOVE_PADDING = 1.25
# Real tokens per packed batch on CPU. Under sdpa a pack's attention scores every token against the whole pack,
# so long packs cost more than padding saves (packs of 2048 tokens validated slower than never packing); with
# qwen-ft's attention scoring each segment alone (attention.SEGMENTS) the cap matters less (docs/performance.md).
MAX_PACK_TOKENS_CPU = 512


def check_args(decode: str, normalize: str, top_k: int, batch_size: int, head: bool, ends_answers: bool) -> None:
    """One UserError for a decode/normalize that does not apply to this classifier, or bad sizes."""
    if decode not in DECODES:
        raise UserError(f"decode must be one of {', '.join(DECODES)} (got {decode!r})")
    if normalize not in NORMALIZE:
        raise UserError(f"normalize must be one of {', '.join(NORMALIZE)} (got {normalize!r})")
    if head != (decode == "head"):
        if head:
            raise UserError(f"--decode {decode} scores written answers, and this run has a classification head "
                            "(--head classification), which writes none", "Use --decode head (or auto).")
        raise UserError("--decode head applies to runs trained with --head classification, and this one "
                        "writes its answers", "Use --decode auto, constrained or exact.")
    if decode == "head" and normalize != "none":
        raise UserError(f"--normalize {normalize} applies to --decode exact, not to a classification head",
                        "Leave --normalize at auto.")
    if normalize != "none" and decode != "exact":
        raise UserError(f"--normalize {normalize} applies to --decode exact (each answer's full "
                        f"log-probability), not to --decode {decode}", "Add --decode exact.")
    if decode not in ("exact", "head") and not ends_answers:
        raise UserError(f"--decode {decode} needs answers that end with an end-of-turn token, and this "
                        "run's answers carry none (one answer may be the start of another)",
                        "Use --decode exact.")
    if not isinstance(top_k, int) or top_k < 1:
        raise UserError(f"top-k must be >= 1 (got {top_k})")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"--batch-size must be > 0 (got {batch_size})")


def score_batch(clf, decode: str, normalize: str, top_k: int, rows: list[dict], prompts: list[list[int]],
                prefix: list[int], cache, counts: Counts, packable: bool = False) -> list[dict]:
    """Each row's result under `decode`, the rows' prompts running after the shared `prefix` (its KV `cache`)."""
    if decode == "free":
        return _free(clf, rows, prompts, counts)
    if decode == "head":
        return _head(clf, prompts, top_k, counts)
    opts = [clf.encoder.answer_options(r) for r in rows]
    suffixes = [p[len(prefix):] for p in prompts]
    if decode == "exact":
        return _exact(clf, normalize, top_k, rows, opts, suffixes, prefix, cache, counts)
    return _constrained(clf, top_k, opts, suffixes, prefix, cache, counts, packable)


def _exact(clf, normalize, top_k, rows, opts, suffixes, prefix, cache, counts) -> list[dict]:
    seqs = [s for _, s in opts]
    logp = option_logprobs(clf.model, suffixes, seqs, len(prefix), cache, clf.pad_id, clf.device, counts)
    out = []
    for k, (labels, options) in enumerate(opts):
        scores = logp[k, : len(labels)].double()
        if normalize == "token":
            scores = scores / torch.tensor([len(s) for s in options], dtype=torch.float64)
        elif normalize == "char":
            # as written after the prompt: with the leading space of template-less prompts, as
            # lm-evaluation-harness counts its continuation (" " + answer)
            lead = 0 if clf.encoder.has_template else 1
            chars = [max(1, lead + len(clf.task.answer(rows[k], lab))) for lab in labels]
            scores = scores / torch.tensor(chars, dtype=torch.float64)
        res = _ranked(labels, torch.softmax(scores, -1).tolist(), top_k)
        res["scores"] = {"labels": list(labels), "values": scores.tolist(), "groups": list(range(len(labels)))}
        out.append(res)
    return out


def _constrained(clf, top_k, opts, suffixes, prefix, cache, counts, packable) -> list[dict]:
    seqs = [s for _, s in opts]
    if packable and len(suffixes) * max(map(len, suffixes)) > PACK_ABOVE_PADDING * sum(map(len, suffixes)):
        # one pass decides every row, and padding would more than PACK_ABOVE_PADDING x the work: no padding
        logits, kv, mask, lengths = packed_pass(clf.model, suffixes, len(prefix), cache, clf.device,
                                                counts), None, None, None
    else:
        logits, kv, mask, lengths = suffix_pass(clf.model, suffixes, len(prefix), cache, clf.pad_id,
                                              clf.device, counts)
    chosen = greedy_trie(clf.model, logits, seqs, kv, mask, lengths, clf.device, counts)
    out = []
    for k, (labels, options) in enumerate(opts):
        first_ids = sorted({s[0] for s in options})
        first_logits = logits[k, first_ids].double()
        p = torch.softmax(first_logits, -1).tolist()
        by_token = dict(zip(first_ids, p))
        probs = [by_token[s[0]] for s in options]
        res = _ranked(labels, probs, top_k, first=chosen[k])
        logit_of = dict(zip(first_ids, first_logits.tolist()))
        res["scores"] = {"labels": list(labels), "values": [logit_of[s[0]] for s in options],
                         "groups": [s[0] for s in options]}
        out.append(res)
    return out


@torch.inference_mode()
def _head(clf, prompts, top_k, counts) -> list[dict]:
    """A classification head's softmax over the labels. Left-padded, so every row's last prompt token is the
    last column, which is the token the model pools: the last one that is not the pad id (prompts never
    end with it: `check_head_prompt`)."""
    model = clf.model
    ids, mask = left_pad([check_head_prompt(p, model.config.pad_token_id) for p in prompts], clf.pad_id, clf.device)
    counts.computed_tokens += int(mask.sum())
    logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                   use_cache=False).logits.double().cpu()
    out = []
    for row_logits in logits:
        res = _ranked(clf.labels, torch.softmax(row_logits, -1).tolist(), top_k)
        res["scores"] = {"labels": list(clf.labels), "values": row_logits.tolist(),
                         "groups": list(range(len(clf.labels)))}
        out.append(res)
    return out


def _free(clf, rows, prompts, counts) -> list[dict]:
    tok, task = clf.encoder.tok, clf.task
    stop = list({clf.encoder.eot_id, *([tok.eos_token_id] if tok.eos_token_id is not None else [])})
    longest = max(clf.encoder.answer_len(r) for r in rows)
    texts = generate_texts(clf.model, tok, prompts, longest + 2, stop, clf.pad_id, clf.device, counts)
    out = []
    for row, text in zip(rows, texts):
        pred = match_answer(text, {lab: task.answer(row, lab) for lab in task.row_labels(row)})
        out.append({"pred": pred, "probability": None, "raw_probability": None, "top": [], "valid": pred is not None,
                    "output": text})
    return out


def _can_pack(model, device) -> bool:
    """Whether batches may run packed (`kernels.packed_pass`): on CPU (where it was measured), with sdpa
    attention (it takes the boolean 4D mask as given; eager attention would add it, flash-attention kernels
    take none) or qwen-ft's CPU attention where it honours the segment lengths (`attention.packs`), and only
    full attention in every layer (a sliding window or a recurrent/linear-attention layer would see across
    the packed rows)."""
    impl = getattr(model.config, "_attn_implementation", None)
    return device.type == "cpu" and ((impl == "sdpa" and attention.full_attention_only(model.config))
                                     or (impl == attention.NAME and attention.packs(model)))


def _one_pass(options: list[list[int]]) -> bool:
    """Whether the first pass decides among these answers (their first tokens all differ)."""
    return len({o[0] for o in options}) == len(options)


def _margin(res: dict) -> float:
    """Raw score of the best answer minus the runner-up's, over distinct scores (answers that share a first
    token share one score under constrained decoding); infinite when one answer stands alone."""
    scores = res.get("scores")
    if not scores:
        return float("inf")
    best: dict = {}
    for group, value in zip(scores["groups"], scores["values"]):
        best[group] = max(value, best.get(group, float("-inf")))
    top = sorted(best.values(), reverse=True)
    return top[0] - top[1] if len(top) > 1 else float("inf")


def _ranked(labels: list[str], probs: list[float], top_k: int, first: int | None = None) -> dict:
    """Result of one row from its answers' probabilities; `first` forces the prediction (greedy trie)."""
    order = sorted(range(len(labels)), key=lambda j: (j != first, -probs[j], j))
    best = order[0]
    p = round(float(probs[best]), 6)
    return {"pred": labels[best], "probability": p, "raw_probability": p,
            "top": [[labels[j], round(float(probs[j]), 6)] for j in order[:top_k]], "valid": True}


def _calibrated(res: dict, temperature: float, top_k: int) -> dict:
    """A row's result with `probability` and `top` at `temperature`; its prediction (kept first, whatever
    rounding does to near-ties) and `raw_probability` stay as scored."""
    scores = res["scores"]
    labels = scores["labels"]
    ranked = _ranked(labels, calib.probabilities(scores, temperature), top_k, first=labels.index(res["pred"]))
    return {**res, "probability": ranked["probability"], "top": ranked["top"]}
