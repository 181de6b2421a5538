"""The answers' wire shapes for the router's clients: semantic-router's `http_classify` list and OpenAI's
chat completion (with logprobs, and as a one-chunk stream). Pure functions of a classified row."""

from __future__ import annotations

import json
import math
import time
import uuid

TINY = 1e-12  # log(0) is -inf, which is not JSON: a label the model gives no mass gets log(1e-12)


def label_scores(res: dict, labels: list[str]) -> list[dict]:
    """Every label once with its probability, summing to 1: semantic-router matches each name against its
    mapping and refuses a missing or duplicate label or a sum off 1 by more than 0.02. Constrained decoding
    gives labels that share a first answer token that token's probability each, so the list is renormalised."""
    probs = dict(res["top"])
    total = sum(probs.get(lab, 0.0) for lab in labels) or 1.0
    return [{"label": lab, "score": probs.get(lab, 0.0) / total} for lab in labels]


def result(res: dict, top_k: int) -> dict:
    out = {"label": res["pred"], "probability": res["probability"], "raw_probability": res["raw_probability"],
           "top": [{"label": lab, "probability": p} for lab, p in res["top"][:top_k]]}
    if "abstained" in res:
        out.update({"abstained": res["abstained"], "model_label": res.get("model_label", res["pred"])})
    return out


def _logprob(label: str, p: float) -> dict:
    return {"token": label, "logprob": math.log(max(p, TINY)), "bytes": list(label.encode("utf-8"))}


def logprobs(res: dict, top_logprobs: int) -> dict:
    """OpenAI's `choices[0].logprobs`: the answer is one "token" (the label) with its log-probability and the
    `top_logprobs` most probable labels."""
    probs = dict(res["top"])
    entry = _logprob(res["pred"], probs.get(res["pred"], res.get("probability") or 0.0))
    entry["top_logprobs"] = [_logprob(lab, p) for lab, p in res["top"][:top_logprobs]]
    return {"content": [entry], "refusal": None}


def chat_completion(res: dict, model: str, classification: dict, top_logprobs: int | None) -> dict:
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": res["pred"]}, "finish_reason": "stop",
                     "logprobs": None if top_logprobs is None else logprobs(res, top_logprobs)}],
        "classification": classification,
    }


def chat_stream(completion: dict) -> list[str]:
    """The completion as server-sent events, the way OpenAI clients read a stream: one chunk holding the whole
    answer, then `data: [DONE]`."""
    choice = completion["choices"][0]
    chunk = {"id": completion["id"], "object": "chat.completion.chunk", "created": completion["created"],
             "model": completion["model"],
             "choices": [{"index": 0, "delta": {"role": "assistant", "content": choice["message"]["content"]},
                          "finish_reason": "stop", "logprobs": choice["logprobs"]}]}
    return [f"data: {json.dumps(chunk)}\n\n", "data: [DONE]\n\n"]
