"""From a data config to a task plus seeded train/validation/test rows, validated before any model loads."""

from __future__ import annotations

import logging
import os
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from qwen_ft.config import DataArgs, seed_problem
from qwen_ft.data import dedup
from qwen_ft.data.sources import DEMOS, describe, is_hub, read_records
from qwen_ft.data.splits import (
    hold_out_groups,
    oversample,
    sample,
    sample_per_label,
    split_by_group,
    split_rows,
)
from qwen_ft.errors import Problems, UserError
from qwen_ft.perturb import augment_rows
from qwen_ft.tasks import TASKS, Task, detect_task

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    task: Task
    splits: dict[str, list[dict]]
    dropped: int = 0
    duplicates: int = 0  # exact duplicate rows removed before splitting
    groups: dict | None = None  # --split-by: {"column", "test": held-out groups, "train": the others}
    screen: dict | None = None  # the near-duplicate screen's counts (data/dedup.py), before any --dedup drop

    def summary(self) -> str:
        sizes = ", ".join(f"{k} {len(v)}" for k, v in self.splits.items())
        dups = f" ({self.duplicates} duplicate rows removed)" if self.duplicates else ""
        held = (f"; test holds {len(self.groups['test'])} of {len(self.groups['test']) + len(self.groups['train'])} "
                f"groups of {self.groups['column']}, unseen in training" if self.groups else "")
        return f"task {self.task.name}, {len(self.task.labels)} labels; rows: {sizes}{dups}{held}"


def load_rows(source: str, task_name: str, data: DataArgs, id_prefix: str,
              group_column: str | None = None, slice_columns: tuple[str, ...] = ()) -> tuple[str, list[dict], int]:
    """(task name, normalized rows, rows dropped); `group_column`: each row keeps that column's value as
    "group" (--split-by); `slice_columns`: the values of these columns as "slices" (validate --slice-by)."""
    records = read_records(source, data.hub_split)
    if not records:
        raise UserError(f"data set {describe(source)} is empty", "Pass a file with at least a few rows.")
    if group_column is not None and group_column not in records[0]:
        raise UserError(f"--split-by column '{group_column}' not found in {describe(source)}; columns found: "
                        f"{', '.join(map(str, records[0])) or 'none'}", "Name one of these columns in --split-by.")
    missing = [c for c in slice_columns if c not in records[0]]
    if missing:
        raise UserError(f"--slice-by column(s) {', '.join(missing)} not found in {describe(source)}; columns found: "
                        f"{', '.join(map(str, records[0])) or 'none'}", "Name columns of the data in --slice-by.")
    if task_name == "auto":
        task_name = detect_task(list(records[0].keys()))
    if task_name == "multiple_choice":
        _check_choice_counts(records, source)
    rows, dropped = TASKS[task_name].normalize(records, text_column=data.text_column,
                                               label_column=data.label_column, id_prefix=id_prefix,
                                               group_column=group_column, slice_columns=tuple(slice_columns))
    if not rows:
        raise UserError(f"data set {describe(source)} is empty after dropping {dropped} rows without text or label",
                        "Check --text-column / --label-column.")
    return task_name, rows, dropped


def _check_choice_counts(records: list[dict], source: str) -> None:
    """More choices than letters A-Z: one clear report (the task would have no letter for them)."""
    p = Problems()
    for i, rec in enumerate(records):
        ch = rec.get("choices", rec.get("cands", rec.get("options")))
        if isinstance(ch, dict):
            ch = ch.get("label", ch.get("text"))
        try:
            n = len(ch) if ch is not None and not isinstance(ch, (str, bytes)) else 0
        except TypeError:
            continue
        if n > 26 and len(p.items) < 5:
            p.add(f"{describe(source)} row {i}: {n} choices (at most 26, one per letter A-Z)")
    p.raise_if_any("Multiple-choice questions need 2 to 26 choices; drop or split the longer ones.")


def same_source(a: str | None, b: str | None) -> bool:
    if not a or not b:
        return False
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if pa.exists() and pb.exists():
        return os.path.samefile(pa, pb)
    return a == b


def check_flags_apply(data: DataArgs, task_name: str) -> None:
    """Flags that do nothing for this task or source are errors, not silently ignored."""
    p = Problems()
    if task_name == "multiple_choice":
        for name in ("max_samples_per_category", "max_train_samples_per_category", "text_column", "label_column"):
            if getattr(data, name) is not None:
                p.add(f"--{name.replace('_', '-')} applies to category data (text -> label), but this is "
                      "multiple-choice data", f"Drop --{name.replace('_', '-')}; --max-samples limits "
                      "multiple-choice rows.")
    elif data.answer_format != "letter":
        p.add(f"--answer-format {data.answer_format} applies to multiple-choice data, but this is a "
              f"{task_name} task", "Drop --answer-format (or answer_format in the YAML) for this data.")
    if data.hub_split and not (is_hub(data.data) or is_hub(data.validation_data)):
        p.add(f"--hub-split {data.hub_split} applies to hub data sets, but --data is "
              f"{'a bundled demo' if data.data in DEMOS else 'a local file'}", "Drop --hub-split.")
    p.raise_if_any()


def drop_duplicates(rows: list[dict], what: str) -> tuple[list[dict], int]:
    """Exact duplicate rows (same question, choices and label) removed, the first kept; a question with two
    different labels is kept and warned about (it cannot be learnt either way)."""
    seen: dict[tuple, set] = defaultdict(set)
    out, dups = [], 0
    for r in rows:
        key = (r["question"], tuple(r.get("choices") or ()))
        if r["label"] in seen[key]:
            dups += 1
            continue
        seen[key].add(r["label"])
        out.append(r)
    conflicting = sum(1 for labels in seen.values() if len(labels) > 1)
    if dups:
        log.warning("removed %d exact duplicate rows from %s before splitting (they would leak between "
                    "train, validation and test)", dups, what)
    if conflicting:
        log.warning("%d questions of %s appear with different labels; each is kept once per label", conflicting,
                    what)
    return out, dups


def warn_similar_labels(rows: list[dict]) -> None:
    """Labels equal but for case or spacing become distinct classes; say so (the data may mean one class)."""
    groups: dict[str, Counter] = defaultdict(Counter)
    for r in rows:
        groups[" ".join(str(r["label"]).split()).casefold()][r["label"]] += 1
    similar = [g for g in groups.values() if len(g) > 1]
    if similar:
        log.warning("labels that differ only in case or spacing are distinct classes: %s. If they mean the same "
                    "class, write them the same way in the data.",
                    "; ".join(" / ".join(f"{lab!r} ({n} rows)" for lab, n in sorted(g.items())) for g in similar))


def prepare(data: DataArgs, seed: int) -> Prepared:
    if seed_problem(seed):
        raise UserError(seed_problem(seed))
    p = Problems()  # both sources are checked, and both reported, before either is used
    if same_source(data.data, data.validation_data):
        raise UserError(f"--validation-data {data.validation_data} is the same data as --data: every validation "
                        "row would also be a training row", "Drop --validation-data (a validation split is then "
                        "taken from --data), or pass a separate validation file.")
    loaded = p.attempt(load_rows, data.data, data.task, data, "train" if data.validation_data else "row",
                       data.split_by or None)
    vloaded = None
    if data.validation_data:
        vtask = loaded[0] if loaded else data.task
        vloaded = p.attempt(load_rows, data.validation_data, vtask, data, "val")
    p.raise_if_any()
    task_name, rows, dropped = loaded
    if dropped:
        log.warning("dropped %d rows without text or label from %s", dropped, describe(data.data))
    is_mc = task_name == "multiple_choice"
    check_flags_apply(data, task_name)
    rows, duplicates = drop_duplicates(rows, describe(data.data))
    if data.validation_data:  # a question in both sources would be trained on and then validated
        vrows, vdups = drop_duplicates(vloaded[1], describe(data.validation_data))
        vloaded = (vloaded[0], vrows, vloaded[2])
        in_val = {(r["question"], tuple(r.get("choices") or ())) for r in vrows}
        kept = [r for r in rows if (r["question"], tuple(r.get("choices") or ())) not in in_val]
        if len(kept) < len(rows):
            log.warning("removed %d rows of %s that are also in --validation-data %s", len(rows) - len(kept),
                        describe(data.data), describe(data.validation_data))
        duplicates += vdups + len(rows) - len(kept)
        rows = kept
    if not is_mc:
        warn_similar_labels(rows + (vloaded[1] if vloaded else []))
    rows = sample(sample_per_label(rows, None if is_mc else data.max_samples_per_category, seed), data.max_samples, seed)

    groups, test_rows = None, None
    if data.split_by:  # the test split: whole groups, none of them seen in training or validation
        if data.holdout_groups:
            other, test_rows, held = hold_out_groups(rows, data.holdout_groups, data.split_by)
        else:
            other, test_rows, held = split_by_group(rows, data.test_fraction, seed, data.split_by,
                                                    stratify=not is_mc)
        groups = {"column": data.split_by, "test": held,
                  "train": sorted({r["group"] for r in other}, key=str)}
    if data.validation_data:
        vtask, val_rows, vdropped = vloaded
        if vtask != task_name:
            raise UserError(f"--validation-data holds a {vtask} task but --data holds {task_name}")
        dropped += vdropped
        val_rows = sample(val_rows, data.max_validation_samples, seed)
        test_fraction = data.test_fraction if data.test_fraction > 0 else 0.0
        if test_rows is not None:
            splits = {"train": other, "validation": val_rows, "test": test_rows}
        elif test_fraction > 0:
            parts = split_rows(rows, test_fraction, 0.0, seed, stratify=not is_mc)
            splits = {"train": parts["train"], "validation": val_rows, "test": parts["validation"]}
        else:
            splits = {"train": rows, "validation": val_rows, "test": []}
    elif test_rows is not None:  # validation: a stratified share of the in-distribution rows (of all rows)
        val_of_other = data.val_fraction * len(rows) / len(other)
        if val_of_other >= 0.9:
            raise UserError(f"--split-by {data.split_by}: the held-out groups take {len(test_rows)} of {len(rows)} "
                            f"rows, which leaves too few for a {data.val_fraction:.0%} validation split",
                            "Lower --test-fraction or --val-fraction.")
        splits = {**split_rows(other, val_of_other, 0.0, seed, stratify=not is_mc), "test": test_rows}
        if data.max_validation_samples:
            splits["validation"] = sample(splits["validation"], data.max_validation_samples, seed)
    else:
        splits = split_rows(rows, data.val_fraction, data.test_fraction, seed, stratify=not is_mc)
        if data.max_validation_samples:
            splits["validation"] = sample(splits["validation"], data.max_validation_samples, seed)

    if data.max_train_samples_per_category and not is_mc:
        splits["train"] = sample_per_label(splits["train"], data.max_train_samples_per_category, seed)
    screen, matches = dedup.screen(splits)
    if data.dedup:
        kept = dedup.drop(splits, matches, data.dedup)
        screen["dropped"] = {name: len(splits[name]) - len(kept[name]) for name in matches}
        log.info("--dedup %s: dropped %s rows that copy a training (or validation) row", data.dedup,
                 ", ".join(f"{n} {name}" for name, n in screen["dropped"].items()))
        splits = kept
    if data.balance == "oversample" and not is_mc:
        splits["train"] = oversample(splits["train"], seed)
    if data.augment:  # after splitting: a row and its noisy copy are always on the same side
        splits["train"] = augment_rows(splits["train"], data.augment, seed)
    for name in ("train", "validation"):
        p.check(len(splits[name]) > 0, f"the {name} split is empty ({len(rows)} rows in all)")
    p.raise_if_any("Use more rows (raise --max-samples-per-category) or change the split fractions.")

    if is_mc and (data.answer_format == "text" or data.prompt_style == "plain"):
        _warn_repeated_choices(splits["train"] + splits["validation"] + splits["test"])
    if is_mc:
        task = TASKS[task_name].create(rows + splits["validation"], data.instruction, data.question_template,
                                       data.answer_format, data.prompt_style)
    else:
        train_labels = Counter(r["label"] for r in splits["train"])
        unseen = sorted({r["label"] for r in splits["validation"] + splits["test"]} - set(train_labels))
        if unseen:
            raise UserError(f"labels in validation/test not seen in training: {', '.join(unseen)}",
                            "Add training rows for these labels or drop them from the validation data.")
        task = TASKS[task_name].create(list(train_labels), data.instruction, data.question_template)
        if data.prompt_style != "chat":
            task.extra["prompt_style"] = data.prompt_style
    _check_template(task)
    return Prepared(task=task, splits=splits, dropped=dropped, duplicates=duplicates, groups=groups, screen=screen)


def _warn_repeated_choices(rows: list[dict]) -> None:
    """With text answers, two identical choices are one answer: the model's text maps to the first of them."""
    repeated = [r for r in rows if len({c.strip() for c in r["choices"]}) < len(r["choices"])]
    if repeated:
        later = sum(1 for r in repeated if r["choices"].index(r["choices"][ord(r["label"]) - ord("A")])
                    != ord(r["label"]) - ord("A"))
        log.warning("%d multiple-choice rows list the same choice twice; with text answers the model's answer maps "
                    "to the first copy, so the %d of them whose answer is a later copy can never be scored right "
                    "(use --answer-format letter, or fix these rows)", len(repeated), later)


def _check_template(task: Task) -> None:
    from qwen_ft.tasks.base import template_problem

    hint = "--instruction may use {labels}; --question-template may use {question} (and {choices} for multiple choice)."
    questions = ("question", "choices") if task.name == "multiple_choice" else ("question",)
    for problem in (template_problem(task.instruction, "instruction", ("labels",)),
                    template_problem(task.question_template, "question_template", questions)):
        if problem:
            raise UserError(f"bad prompt template: {problem}", hint)
    try:
        task.system_message()
        probe = {"question": "q", "choices": ["a", "b"], "label": task.labels[0]}
        task.user_message(probe)
    except (KeyError, IndexError, ValueError) as e:
        raise UserError(f"bad prompt template: {e!r}",
                        "--instruction may use {labels}; --question-template may use {question} and {choices}."
                        ) from None
