"""The task interface shared by category and multiple-choice tasks."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar


def clean_text(value: Any) -> str | None:
    """A usable text cell, or None for missing / NaN / empty / non-text values."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, (int, float)):
        return str(value)
    if not isinstance(value, str):
        return None
    value = value.strip()
    return value or None


def group_value(record: dict, column: str | None, slice_columns: tuple[str, ...] = ()) -> dict:
    """{"group": the row's --split-by value} (text; a missing value is the group '(none)'), or {} without one;
    with `slice_columns` (validate --slice-by) also {"slices": {column: value as text}}."""
    out = {} if column is None else {"group": clean_text(record.get(column)) or "(none)"}
    if slice_columns:
        out["slices"] = {c: clean_text(record.get(c)) or "(none)" for c in slice_columns}
    return out


def template_problem(template: str, what: str, allowed: tuple[str, ...]) -> str | None:
    """Why `template` is not a prompt template (None when it is): only the named fields {allowed}, no
    positional fields, conversions or format specs ({labels:>99999999} would build a gigantic text), and
    balanced braces ({{ and }} for literal ones)."""
    import string

    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as e:
        return f"'{what}' is not a valid template ({e}); write literal braces as {{{{ and }}}}"
    for _, name, spec, conversion in parts:
        if name is None:
            continue
        if name not in allowed or spec or conversion:
            shown = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            return (f"'{what}' uses {shown}; it may use only " + ", ".join("{" + a + "}" for a in allowed)
                    + " (literal braces as {{ and }})")
    return None


@dataclass
class Task:
    """Rows + labels + prompt. Subclasses define how records are read and questions are written."""

    labels: list[str]
    instruction: str
    question_template: str
    name: ClassVar[str] = "task"
    extra: dict = field(default_factory=dict)
    PLAIN_QUESTION: ClassVar[str] = "Question: {question}"

    def row_labels(self, row: dict) -> list[str]:
        """The labels allowed for this row (all labels, or this row's letters)."""
        return self.labels

    @property
    def per_row_answers(self) -> bool:
        """True when what the model writes for a label depends on the row (e.g. a choice's text)."""
        return False

    def answer(self, row: dict, label: str) -> str:
        """The text the model writes to give `label` for `row` (the label itself unless a task says otherwise)."""
        return label

    def user_message(self, row: dict, question: str | None = None) -> str:
        raise NotImplementedError

    def system_message(self) -> str:
        return self.instruction.format(labels=", ".join(self.labels))

    def plain_prompt(self) -> Task:
        """A copy of this task with the plain prompt of the untrained-model baselines (lm-evaluation-harness
        style): no chat template, "Question: ..." then "Answer:", each answer scored as its text."""
        return dataclasses.replace(self, labels=list(self.labels), question_template=self.PLAIN_QUESTION,
                                   extra={**self.extra, "prompt_style": "plain", "answer_format": "text"})

    def to_mapping(self) -> dict:
        """What a run folder stores so that inference renders exactly the same prompt.

        `label2id`, `id2label` (string keys) and `instruction_template` are what vllm-project/semantic-router's
        Qwen3 LoRA classifier reads from an adapter folder (candle-binding, qwen3_multi_lora_classifier.rs:
        categories in id order; the template, with `{question}` replaced by the text, becomes the only user
        turn). Our own prompt puts the instruction in a system turn where the chat template has one, so the
        router's prompt is close to ours, not identical. Derived from the fields above; never read back."""
        system = self.system_message()
        return {
            "task": self.name,
            "labels": self.labels,
            "label_to_id": {label: i for i, label in enumerate(self.labels)},
            "instruction": self.instruction,
            "question_template": self.question_template,
            **self.extra,
            "label2id": {label: i for i, label in enumerate(self.labels)},
            "id2label": {str(i): label for i, label in enumerate(self.labels)},
            "instruction_template": (f"{system}\n\n" if system else "") + self.question_template,
        }

    @classmethod
    def from_mapping(cls, mapping: dict) -> Task:
        from qwen_ft.tasks import TASKS

        task_cls = TASKS[mapping["task"]]
        extra = {k: v for k, v in mapping.items()
                 if k not in ("task", "labels", "instruction", "question_template", "label_to_id", "label2id",
                              "id2label", "instruction_template")}
        return task_cls(labels=list(mapping["labels"]), instruction=mapping["instruction"],
                        question_template=mapping["question_template"], extra=extra)
