"""`qwen-ft test`: the guide's inference demo - each input's label, its probability, the alternatives."""

from __future__ import annotations

import json
import sys

from qwen_ft.errors import UserError
from qwen_ft.inference import load_run


def parse_input(text: str, task_name: str) -> dict:
    if task_name == "multiple_choice":
        try:
            row = json.loads(text)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict) or not isinstance(row.get("choices"), list) or "question" not in row:
            raise UserError(f"multiple-choice input must be JSON like "
                            f'{{"question": "...", "choices": ["...", "..."]}}; got {text[:80]!r}')
        return {"question": str(row["question"]), "choices": [str(c) for c in row["choices"]]}
    return {"question": text}


def run_predict(model_path: str, texts: list[str], top: int = 3, base_model: str | None = None,
                precision: str = "auto") -> list[dict]:
    loaded = load_run(model_path, base_model, precision)
    if not texts:
        texts = [line.strip() for line in sys.stdin if line.strip()]
    if not texts:
        raise UserError("no input: pass texts as arguments or lines on standard input")
    rows = [parse_input(t, loaded.encoder.task.name) for t in texts]
    results = loaded.scorer.score(rows)
    out = []
    for text, res in zip(texts, results):
        ranked = sorted(res["probs"].items(), key=lambda kv: -kv[1])
        out.append({"input": text, "label": res["pred"], "probability": ranked[0][1], "alternatives": ranked[1:top]})
        alts = ", ".join(f"{lab} {p:.3f}" for lab, p in ranked[1:top])
        print(f"{text[:70]!r}\n  -> {res['pred']} (p={ranked[0][1]:.3f}); next: {alts}")
    return out


def add_parser(sub, name: str) -> None:
    p = sub.add_parser(name, help="Predict labels for texts given as arguments or lines on stdin.")
    p.add_argument("--model-path", required=True, help="Run folder written by `qwen-ft train`.")
    p.add_argument("texts", nargs="*", help="Inputs (multiple choice: JSON with question and choices).")
    p.add_argument("--top", type=int, default=3, help="Show this many labels per input.")
    p.add_argument("--base-model", default=None)
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    p.set_defaults(func=lambda a: run_predict(a.model_path, a.texts, a.top, a.base_model, a.precision))
