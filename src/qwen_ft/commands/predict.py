"""`qwen-ft test`: the guide's inference demo - each input's label, its probability, the alternatives."""

from __future__ import annotations

import sys

from qwen_ft.engine import Classifier
from qwen_ft.errors import UserError


def run_predict(model_path: str, texts: list[str], top: int = 3, base_model: str | None = None,
                precision: str = "auto", trust_remote_code: bool = False) -> list[dict]:
    if top < 1:
        raise UserError(f"--top must be >= 1 (got {top})")
    clf = Classifier.load(model_path, base_model=base_model, precision=precision, trust_remote_code=trust_remote_code)
    if not texts:
        texts = [line.strip() for line in sys.stdin if line.strip()]
    if not texts:
        raise UserError("no input: pass texts as arguments or lines on standard input")
    rows = [clf.row(t) for t in texts]
    results, _ = clf.classify(rows, decode="head" if clf.head else "exact", top_k=top)  # every label's probability
    out = []
    for text, res in zip(texts, results):
        out.append({"input": text, "label": res["pred"], "probability": res["probability"],
                    "raw_probability": res["raw_probability"], "alternatives": res["top"][1:]})
        alts = ", ".join(f"{lab} {p:.3f}" for lab, p in res["top"][1:])
        raw = f", raw {res['raw_probability']:.3f}" if res["raw_probability"] != res["probability"] else ""
        print(f"{text[:70]!r}\n  -> {res['pred']} (p={res['probability']:.3f}{raw}); next: {alts}")
    return out


def add_parser(sub, name: str) -> None:
    p = sub.add_parser(name, help="Predict labels for texts given as arguments or lines on stdin.")
    p.add_argument("--model-path", required=True, help="Run folder written by `qwen-ft train` (or `qwen-ft merge`).")
    p.add_argument("texts", nargs="*", help="Inputs (multiple choice: JSON with question and choices).")
    p.add_argument("--top", type=int, default=3, help="Show this many labels per input.")
    p.add_argument("--base-model", default=None)
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    p.add_argument("--trust-remote-code", action="store_true", help="Allow the model's own code (see validate).")
    p.set_defaults(func=lambda a: run_predict(a.model_path, a.texts, a.top, a.base_model, a.precision,
                                              a.trust_remote_code))
