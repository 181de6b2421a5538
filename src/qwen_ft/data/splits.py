"""Seeded per-label sampling, stratified train/validation/test splits, and held-out groups."""

from __future__ import annotations

import logging
import random
from collections import Counter, defaultdict

from qwen_ft.errors import UserError

log = logging.getLogger(__name__)


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


def oversample(rows: list[dict], seed: int) -> list[dict]:
    """Class-balanced training rows: each label's rows repeated (whole passes, then a seeded sample of the rest)
    until it has as many as the largest label. The copies' ids end in '-rep1', '-rep2', ..."""
    by_label: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_label[r["label"]].append(r)
    most = max((len(v) for v in by_label.values()), default=0)
    rng = random.Random(seed)
    out = list(rows)
    for label in sorted(by_label):
        own = by_label[label]
        need, k = most - len(own), 0
        while need > 0:
            k += 1
            take = own if need >= len(own) else rng.sample(own, need)
            out += [{**r, "id": f"{r['id']}-rep{k}"} for r in take]
            need -= len(take)
    return out


def group_folds(rows: list[dict], k: int, seed: int) -> list[list[str]]:
    """K folds of whole groups (each row's "group"), every group in exactly one fold, the folds' row counts as
    even as whole groups allow: groups taken largest first (ties in a seeded order), each into the fold with
    the fewest rows so far (sklearn's GroupKFold rule, with a seed for the ties)."""
    sizes = Counter(r["group"] for r in rows)
    if not 2 <= k <= len(sizes):
        raise UserError(f"--folds {k}: the data has {len(sizes)} groups; cross-validation needs 2 <= folds <= groups",
                        "Pass fewer --folds, or split by a column with more values.")
    order = sorted(sizes, key=str)
    random.Random(seed).shuffle(order)
    order.sort(key=lambda g: -sizes[g])  # stable: the seeded order breaks ties
    folds: list[list[str]] = [[] for _ in range(k)]
    load = [0] * k
    for g in order:
        j = min(range(k), key=lambda i: (load[i], i))
        folds[j].append(g)
        load[j] += sizes[g]
    return [sorted(f, key=str) for f in folds]


def hold_out_groups(rows: list[dict], groups: list[str], column: str) -> tuple[list[dict], list[dict], list[str]]:
    """(other rows, test rows, held-out groups) for groups named by the caller (a cross-validation fold)."""
    present = {r["group"] for r in rows}
    unknown = sorted(set(groups) - present)
    if unknown:
        raise UserError(f"--holdout-groups: {', '.join(map(repr, unknown[:5]))} not found in --split-by {column}",
                        "Name values of that column (run.json's split_groups lists a run's groups).")
    held = set(groups)
    return ([r for r in rows if r["group"] not in held], [r for r in rows if r["group"] in held],
            sorted(held, key=str))


def split_by_group(rows: list[dict], test_fraction: float, seed: int, column: str,
                   stratify: bool = True) -> tuple[list[dict], list[dict], list[str]]:
    """(other rows, test rows, held-out groups): whole groups (each row's "group", the --split-by `column`)
    held out as the test split, about `test_fraction` of the rows, drawn with `seed`.

    Groups are visited in a seeded order; one is taken when it brings the test split closer to its share. A group
    is passed over (the draw goes on with the next) when taking it would leave a label fewer than 3 rows outside
    the test split (stratified: train and validation need one each, the stratified split 3), so every label keeps
    training rows; only when no group at all can be held out is it an error, naming those labels."""
    if test_fraction <= 0:
        raise UserError(f"--split-by {column} holds whole groups out as the test split, but --test-fraction is "
                        f"{test_fraction}", "Pass --test-fraction > 0 (e.g. 0.2) with --split-by.")
    sizes = Counter(r["group"] for r in rows)
    if len(sizes) < 2:
        raise UserError(f"--split-by {column}: the data has {len(sizes)} group(s) ({', '.join(map(repr, sizes))}); "
                        "holding whole groups out needs at least 2", "Pick a column with several values.")
    labels_of: dict[str, Counter] = defaultdict(Counter)
    for r in rows:
        labels_of[r["group"]][r["label"]] += 1
    left = Counter(r["label"] for r in rows)  # rows of each label outside the test split
    floor = {lab: min(3, n) for lab, n in left.items()}
    order = sorted(sizes, key=str)
    random.Random(seed).shuffle(order)
    target, taken, held, blocking = test_fraction * len(rows), 0, [], set()

    def blocked(g) -> set:
        """The labels that would keep fewer than their floor of rows outside the test split if `g` went."""
        return {lab for lab, n in labels_of[g].items() if stratify and left[lab] - n < floor[lab]}

    def take(g) -> None:
        nonlocal taken
        held.append(g)
        taken += sizes[g]
        left.subtract(labels_of[g])

    for g in order:
        if len(held) == len(sizes) - 1:  # one group at least stays for training
            break
        if abs(taken + sizes[g] - target) >= abs(taken - target):
            continue
        if labels := blocked(g):
            blocking |= labels
            continue
        take(g)
    if not held:  # every group is over twice the share: the smallest one that can go
        fits = [g for g in sorted(order, key=lambda g: sizes[g]) if not blocked(g)]
        if not fits:
            raise UserError(f"--split-by {column}: no group can be held out without leaving a label fewer than 3 "
                            f"rows for training and validation (labels: {', '.join(sorted(map(str, blocking)))})",
                            "Add rows for these labels, drop them, or split by another column.")
        take(fits[0])
    if not 0.5 * target <= taken <= 1.5 * target:
        log.warning("--split-by %s: the %d held-out group(s) hold %.1f%% of the rows (--test-fraction %.1f%%); whole "
                    "groups rarely add up to the share exactly", column, len(held), 100 * taken / len(rows),
                    100 * test_fraction)
    held_set = set(held)
    return ([r for r in rows if r["group"] not in held_set], [r for r in rows if r["group"] in held_set],
            sorted(held, key=str))
