"""From a data config to a task plus seeded train/validation/test rows, validated before any model loads."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

from qwen_ft.config import DataArgs
from qwen_ft.data.sources import describe, read_records
from qwen_ft.data.splits import sample, sample_per_label, split_rows
from qwen_ft.errors import Problems, UserError
from qwen_ft.tasks import TASKS, Task, detect_task

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    task: Task
    splits: dict[str, list[dict]]
    dropped: int = 0

    def summary(self) -> str:
        sizes = ", ".join(f"{k} {len(v)}" for k, v in self.splits.items())
        return f"task {self.task.name}, {len(self.task.labels)} labels; rows: {sizes}"


def load_rows(source: str, task_name: str, data: DataArgs, id_prefix: str) -> tuple[str, list[dict], int]:
    records = read_records(source, data.hub_split)
    if not records:
        raise UserError(f"data set {describe(source)} is empty", "Pass a file with at least a few rows.")
    if task_name == "auto":
        task_name = detect_task(list(records[0].keys()))
    rows, dropped = TASKS[task_name].normalize(records, text_column=data.text_column,
                                               label_column=data.label_column, id_prefix=id_prefix)
    if not rows:
        raise UserError(f"data set {describe(source)} is empty after dropping {dropped} rows without text or label",
                        "Check --text-column / --label-column.")
    return task_name, rows, dropped


def prepare(data: DataArgs, seed: int) -> Prepared:
    p = Problems()  # both sources are checked, and both reported, before either is used
    loaded = p.attempt(load_rows, data.data, data.task, data, "train" if data.validation_data else "row")
    vloaded = None
    if data.validation_data:
        vtask = loaded[0] if loaded else data.task
        vloaded = p.attempt(load_rows, data.validation_data, vtask, data, "val")
    p.raise_if_any()
    task_name, rows, dropped = loaded
    if dropped:
        log.warning("dropped %d rows without text or label from %s", dropped, describe(data.data))
    is_mc = task_name == "multiple_choice"
    if data.answer_format != "letter" and not is_mc:
        raise UserError(f"--answer-format {data.answer_format} applies to multiple-choice data, but this is a "
                        f"{task_name} task", "Drop --answer-format (or answer_format in the YAML) for this data.")
    rows = sample(sample_per_label(rows, None if is_mc else data.max_samples_per_category, seed), data.max_samples, seed)

    if data.validation_data:
        vtask, val_rows, vdropped = vloaded
        if vtask != task_name:
            raise UserError(f"--validation-data holds a {vtask} task but --data holds {task_name}")
        dropped += vdropped
        val_rows = sample(val_rows, data.max_validation_samples, seed)
        test_fraction = data.test_fraction if data.test_fraction > 0 else 0.0
        if test_fraction > 0:
            parts = split_rows(rows, test_fraction, 0.0, seed, stratify=not is_mc)
            splits = {"train": parts["train"], "validation": val_rows, "test": parts["validation"]}
        else:
            splits = {"train": rows, "validation": val_rows, "test": []}
    else:
        splits = split_rows(rows, data.val_fraction, data.test_fraction, seed, stratify=not is_mc)
        if data.max_validation_samples:
            splits["validation"] = sample(splits["validation"], data.max_validation_samples, seed)

    for name in ("train", "validation"):
        p.check(len(splits[name]) > 0, f"the {name} split is empty ({len(rows)} rows in all)")
    p.raise_if_any("Use more rows (raise --max-samples-per-category) or change the split fractions.")

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
    return Prepared(task=task, splits=splits, dropped=dropped)


def _check_template(task: Task) -> None:
    try:
        task.system_message()
        probe = {"question": "q", "choices": ["a", "b"], "label": task.labels[0]}
        task.user_message(probe)
    except (KeyError, IndexError, ValueError) as e:
        raise UserError(f"bad prompt template: {e!r}",
                        "--instruction may use {labels}; --question-template may use {question} and {choices}."
                        ) from None
