"""Score a merged model on rows: accuracy with a 95% CI, samples/s and prompt tokens/s.

Constrained decoding (the prediction is always one of the row's answers, so always valid) is the reported
accuracy: `constrained` (greedy over the answers' token trie, as `qwen-ft validate`) or `exact` (argmax
of each answer's full probability). Free greedy decoding is optional, for comparison with parsers of
generated text.
"""

from __future__ import annotations

import logging

from qwen_ft.metrics import classification_report
from qwen_ft.scoring import LabelScorer, Timer

log = logging.getLogger(__name__)


def evaluate(model, encoder, rows: list[dict], batch_size: int = 16, free_decode: bool = False,
             decode: str = "constrained") -> tuple[dict, list]:
    """(report, per-row predictions) for `rows` scored by `model` with `encoder`'s prompt."""
    scorer = LabelScorer(model, encoder)
    labels = encoder.task.labels
    golds = [r["label"] for r in rows]
    with Timer() as timer:
        results = scorer.decode(rows, batch_size) if decode == "constrained" else scorer.score(rows, batch_size)
    report = classification_report(golds, [r["pred"] for r in results], labels)
    report.update({
        "decode": decode, "seconds": round(timer.seconds, 3),
        "samples_per_s": round(len(rows) / timer.seconds, 3),
        "prompt_tokens_per_s": round(scorer.n_prompt_tokens / timer.seconds, 1),
        "prompt_tokens": scorer.n_prompt_tokens, "chance": _chance(encoder, rows),
    })
    predictions = [{"id": row["id"], "label": row["label"], **res, "correct": res["pred"] == row["label"]}
                   for row, res in zip(rows, results)]
    if free_decode:
        scorer.n_prompt_tokens = 0
        with Timer() as free_timer:
            free = scorer.generate(rows, batch_size)
        free_report = classification_report(golds, [r["pred"] for r in free], labels)
        report["free"] = {k: free_report[k] for k in ("accuracy", "accuracy_ci95", "valid_pct")}
        report["free"]["samples_per_s"] = round(len(rows) / free_timer.seconds, 3)
        for pred, res in zip(predictions, free):
            pred["free_output"], pred["free_pred"] = res["output"], res["pred"]
    log.info("accuracy %.4f (95%% CI %.3f-%.3f, n=%d, chance %.3f), %.1f samples/s", report["accuracy"],
             *report["accuracy_ci95"], report["n"], report["chance"], report["samples_per_s"])
    return report, predictions


def _chance(encoder, rows: list[dict]) -> float:
    """Expected accuracy of a uniform guess among each row's allowed labels."""
    return sum(1 / len(encoder.task.row_labels(r)) for r in rows) / len(rows) if rows else 0.0
