"""`qwen-ft test`: the guide's inference demo - each input's label, its probability, the alternatives."""

from __future__ import annotations

import sys

from qwen_ft.commands.predict_file import add_abstention_flags
from qwen_ft.errors import UserError
from qwen_ft.inference.engine import Classifier


def run_predict(model_path: str, texts: list[str], top: int = 3, base_model: str | None = None,
                precision: str = "auto", trust_remote_code: bool = False, min_confidence: float | None = None,
                fallback_label: str | None = None, adapter_scale: float = 1.0) -> list[dict]:
    if top < 1:
        raise UserError(f"--top must be >= 1 (got {top})")
    clf = Classifier.load(model_path, base_model=base_model, precision=precision, trust_remote_code=trust_remote_code,
                          adapter_scale=adapter_scale)
    decode = "head" if clf.head else "exact"  # every label's probability
    abstain = clf.abstention(min_confidence, fallback_label, decode)
    if not texts:
        texts = [line.strip() for line in sys.stdin if line.strip()]
    if not texts:
        raise UserError("no input: pass texts as arguments or lines on standard input")
    rows = [clf.row(t) for t in texts]
    results, _ = clf.classify(rows, decode=decode, top_k=top)
    if abstain is not None:
        results = [abstain.apply(r) for r in results]
    out = []
    for text, res in zip(texts, results):
        out.append({"input": text, "label": res["pred"], "probability": res["probability"],
                    "raw_probability": res["raw_probability"], "alternatives": res["top"][1:],
                    **({"abstained": res["abstained"]} if abstain is not None else {})})
        alts = ", ".join(f"{lab} {p:.3f}" for lab, p in res["top"][1:])
        raw = f", raw {res['raw_probability']:.3f}" if res["raw_probability"] != res["probability"] else ""
        why = f" (abstained: {res['model_label']} is below {abstain.threshold:.3g})" if res.get("abstained") else ""
        print(f"{text[:70]!r}\n  -> {res['pred']}{why} (p={res['probability']:.3f}{raw}); next: {alts}")
    return out


def add_parser(sub, name: str) -> None:
    p = sub.add_parser(name, help="Predict labels for texts given as arguments or lines on stdin.")
    p.add_argument("--model-path", required=True, help="Run folder written by `qwen-ft train` (or `qwen-ft merge`).")
    p.add_argument("texts", nargs="*", help="Inputs (multiple choice: JSON with question and choices).")
    p.add_argument("--top", type=int, default=3, help="Show this many labels per input.")
    p.add_argument("--base-model", default=None)
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    p.add_argument("--trust-remote-code", action="store_true", help="Allow the model's own code (see validate).")
    add_abstention_flags(p)
    p.set_defaults(func=lambda a: run_predict(a.model_path, a.texts, a.top, a.base_model, a.precision,
                                              a.trust_remote_code, a.min_confidence, a.fallback_label,
                                              a.adapter_scale))
