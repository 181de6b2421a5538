"""Seeded per-label sampling and stratified train/validation/test splits."""

from __future__ import annotations

import random
from collections import Counter, defaultdict

from qwen_ft.errors import UserError


def sample_per_label(rows: list[dict], max_per_label: int | None, seed: int) -> list[dict]:
    """At most `max_per_label` rows of each label, chosen with `seed`; the original order is kept."""
    if max_per_label is None:
        return rows
    by_label: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        by_label[r["label"]].append(i)
    rng = random.Random(seed)
    keep: set[int] = set()
    for label in sorted(by_label):
        idx = by_label[label]
        keep.update(idx if len(idx) <= max_per_label else rng.sample(idx, max_per_label))
    return [r for i, r in enumerate(rows) if i in keep]


def sample(rows: list[dict], n: int | None, seed: int) -> list[dict]:
    if n is None or len(rows) <= n:
        return rows
    keep = set(random.Random(seed).sample(range(len(rows)), n))
    return [r for i, r in enumerate(rows) if i in keep]


def split_rows(rows: list[dict], val_fraction: float, test_fraction: float, seed: int,
               stratify: bool = True) -> dict[str, list[dict]]:
    """Stratified (by label) train/validation/test split; each label needs >= 3 rows when stratified.

    Stratified means every label keeps (about) its share in each split, and every label is in training. When a
    split has fewer rows than there are labels, not every label can be in it; the rows are then allotted per
    label (largest remainder, ties drawn with `seed`) instead of falling back to a random split.
    """
    counts = Counter(r["label"] for r in rows)
    if stratify:
        small = {k: v for k, v in counts.items() if v < 3}
        if small:
            raise UserError(
                f"too few rows for a stratified split: {', '.join(f'{k!r} has {v}' for k, v in sorted(small.items()))} "
                "(each label needs at least 3: one each for train, validation, test)",
                "Add rows for these labels, drop them from the data, or raise --max-samples-per-category.")
    idx = list(range(len(rows)))
    labels = [r["label"] for r in rows]
    parts: dict[str, list[int]] = {}
    rest = idx
    if test_fraction > 0:
        rest, parts["test"] = _split(idx, labels, test_fraction, seed, stratify)
    val_of_rest = val_fraction / (1 - test_fraction)
    parts["train"], parts["validation"] = _split(rest, [labels[i] for i in rest], val_of_rest, seed, stratify)
    parts.setdefault("test", [])
    return {name: [rows[i] for i in sorted(ix)] for name, ix in parts.items()}


def _split(idx, labels, fraction, seed, stratify):
    from sklearn.model_selection import train_test_split

    n_classes = len(set(labels))
    n_take = max(1, round(fraction * len(idx)))
    if len(idx) - n_take < (n_classes if stratify else 1):
        need = n_classes if stratify else 1
        raise UserError(f"cannot split {len(idx)} rows into {fraction:.0%}: {len(idx) - n_take} rows would be left "
                        f"for training, and it needs at least {need}" + (" (one per label)" if stratify else ""),
                        f"Use at least {_rows_needed(need, fraction)} rows, or lower --val-fraction / "
                        "--test-fraction.")
    if stratify and n_take < n_classes:  # sklearn would refuse: allot the rows label by label
        return _split_per_label(idx, labels, n_take, seed)
    try:
        return train_test_split(idx, test_size=n_take, random_state=seed, stratify=labels if stratify else None)
    except ValueError as e:
        raise UserError(f"cannot split {len(idx)} rows into {fraction:.0%}: {e}",
                        "Use more rows or change --val-fraction / --test-fraction.") from None


def _rows_needed(keep: int, fraction: float) -> int:
    n = keep + 1
    while n - max(1, round(fraction * n)) < keep:
        n += 1
    return n


def _split_per_label(idx: list[int], labels: list, n_take: int, seed: int) -> tuple[list[int], list[int]]:
    """Take `n_take` rows (fewer than there are labels): at most one per label, never a label's last row,
    labels drawn in proportion to their size (largest share first, ties by `seed`)."""
    rng = random.Random(seed)
    by_label: dict = defaultdict(list)
    for i, lab in zip(idx, labels):
        by_label[lab].append(i)
    order = sorted(by_label, key=str)
    rng.shuffle(order)
    eligible = [lab for lab in sorted(order, key=lambda lab: -len(by_label[lab])) if len(by_label[lab]) > 1]
    chosen = eligible[:n_take]  # n_take < n_classes; every label has >= 2 rows left here when stratified
    taken = {rng.choice(by_label[lab]) for lab in sorted(chosen, key=str)}
    return [i for i in idx if i not in taken], sorted(taken)
