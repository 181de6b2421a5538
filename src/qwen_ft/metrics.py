"""Accuracy with a confidence interval, F1 scores, per-label report, confusion matrix (CSV + PNG)."""

from __future__ import annotations

from pathlib import Path

INVALID = "<invalid>"


def accuracy_ci(correct: int, total: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a proportion (scipy)."""
    if total == 0:
        return (0.0, 0.0)
    from scipy.stats import binomtest

    ci = binomtest(correct, total).proportion_ci(confidence_level=confidence, method="wilson")
    return (float(ci.low), float(ci.high))


def classification_report(golds: list[str], preds: list[str | None], labels: list[str]) -> dict:
    from sklearn.metrics import f1_score, precision_recall_fscore_support

    preds = [p if p is not None else INVALID for p in preds]
    n = len(golds)
    correct = sum(g == p for g, p in zip(golds, preds))
    low, high = accuracy_ci(correct, n)
    prec, rec, f1, support = precision_recall_fscore_support(golds, preds, labels=labels, zero_division=0)
    return {
        "n": n,
        "accuracy": correct / n if n else 0.0,
        "accuracy_ci95": [low, high],
        "balanced_accuracy": balanced_accuracy(golds, preds),
        # macro-F1 over the labels that occur (gold or predicted): a label absent from a subsample
        # (e.g. --num-val-samples 50) would otherwise count as F1 = 0
        "macro_f1": float(f1_score(golds, preds, labels=[lab for lab in labels if lab in set(golds) | set(preds)],
                                   average="macro", zero_division=0)),
        "weighted_f1": float(f1_score(golds, preds, labels=labels, average="weighted", zero_division=0)),
        "valid_pct": 100.0 * sum(p != INVALID for p in preds) / n if n else 0.0,
        "per_label": {lab: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
                      for lab, p, r, f, s in zip(labels, prec, rec, f1, support)},
    }


def balanced_accuracy(golds: list[str], preds: list[str | None]) -> float:
    """Mean recall over the gold labels present: a constant predictor scores 1/K on K labels, whatever
    their shares (plain accuracy rewards it with the largest label's share)."""
    hits: dict[str, list[int]] = {}
    for g, p in zip(golds, preds):
        hits.setdefault(g, []).append(int(g == p))
    return sum(sum(h) / len(h) for h in hits.values()) / len(hits) if hits else 0.0


LENGTH_BANDS = ((0, 32, "<32"), (32, 64, "32-64"), (64, 128, "64-128"), (128, None, ">=128"))


def length_band(n_tokens: int) -> str:
    """The question-length band (tokens) a row falls in."""
    for low, high, name in LENGTH_BANDS:
        if n_tokens >= low and (high is None or n_tokens < high):
            return name
    raise ValueError(n_tokens)


def slice_report(keys: list[str], golds: list[str], preds: list[str | None]) -> dict:
    """Per slice value: n, accuracy with its 95 % Wilson interval, balanced accuracy; largest slice first."""
    members: dict[str, list[int]] = {}
    for i, k in enumerate(keys):
        members.setdefault(k, []).append(i)
    out = {}
    for key in sorted(members, key=lambda k: (-len(members[k]), k)):
        idx = members[key]
        g, p = [golds[i] for i in idx], [preds[i] for i in idx]
        correct = sum(a == b for a, b in zip(g, p))
        out[key] = {"n": len(idx), "accuracy": correct / len(idx), "accuracy_ci95": list(accuracy_ci(correct, len(idx))),
                    "balanced_accuracy": balanced_accuracy(g, p)}
    return out


def confusion(golds: list[str], preds: list[str | None], labels: list[str]):
    from sklearn.metrics import confusion_matrix

    preds = [p if p is not None else INVALID for p in preds]
    cols = labels + ([INVALID] if INVALID in preds else [])
    return cols, confusion_matrix(golds, preds, labels=cols)


def write_confusion(golds: list[str], preds: list[str | None], labels: list[str], out_dir: Path) -> None:
    import csv
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from qwen_ft.outputs import atomic_write_text, save_figure

    cols, matrix = confusion(golds, preds, labels)
    text = io.StringIO()
    w = csv.writer(text)
    w.writerow(["gold \\ predicted", *cols])
    for lab, row in zip(cols, matrix):
        w.writerow([lab, *row.tolist()])
    atomic_write_text(out_dir / "confusion_matrix.csv", text.getvalue())
    size = max(5, 0.5 * len(cols) + 2)
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right")
    ax.set_yticks(range(len(cols)), cols)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    peak = matrix.max() if matrix.size else 0
    for i in range(len(cols)):
        for j in range(len(cols)):
            if matrix[i, j]:
                ax.text(j, i, int(matrix[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if matrix[i, j] > peak / 2 else "black")
    ax.set_title("Confusion matrix")
    fig.tight_layout()
    save_figure(fig, out_dir / "confusion_matrix.png")
    plt.close(fig)
