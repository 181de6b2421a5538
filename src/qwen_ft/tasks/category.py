"""Text -> category label (the seed guide's MMLU-Pro task)."""

from __future__ import annotations

from typing import ClassVar

from qwen_ft.errors import Problems
from qwen_ft.tasks.base import Task, clean_text, group_value

TEXT_COLUMNS = ("question", "text", "input", "prompt", "sentence", "content")
LABEL_COLUMNS = ("category", "label", "labels", "class", "target")


def pick_column(columns: list[str], wanted: str | None, candidates: tuple[str, ...], kind: str, p: Problems) -> str | None:
    if wanted is not None:
        if wanted not in columns:
            p.add(f"{kind} column '{wanted}' not found; columns found: {', '.join(map(str, columns)) or 'none'}")
            return None
        return wanted
    for c in candidates:
        if c in columns:
            return c
    p.add(f"no {kind} column found (looked for {', '.join(candidates)}); columns found: "
          f"{', '.join(map(str, columns)) or 'none'}. Name it with --{kind}-column.")
    return None


class CategoryTask(Task):
    name: ClassVar[str] = "category"
    DEFAULT_INSTRUCTION: ClassVar[str] = (
        "Classify the question into exactly one of these categories: {labels}. "
        "Answer with the category name only."
    )
    DEFAULT_QUESTION: ClassVar[str] = "{question}"

    @staticmethod
    def normalize(records: list[dict], text_column: str | None = None, label_column: str | None = None,
                  id_prefix: str = "row", group_column: str | None = None,
                  slice_columns: tuple[str, ...] = ()) -> tuple[list[dict], int]:
        """Records -> rows {id, question, label} (+ group: the `group_column` value); returns (rows, dropped rows
        without text or label)."""
        columns = list(records[0].keys()) if records else []
        p = Problems()
        text_col = pick_column(columns, text_column, TEXT_COLUMNS, "text", p)
        label_col = pick_column(columns, label_column, LABEL_COLUMNS, "label", p)
        p.raise_if_any()
        rows, dropped = [], 0
        for i, rec in enumerate(records):
            text, label = clean_text(rec.get(text_col)), clean_text(rec.get(label_col))
            if text is None or label is None:
                dropped += 1
                continue
            rid = clean_text(rec.get("id")) or clean_text(rec.get("question_id")) or f"{id_prefix}-{i}"
            rows.append({"id": rid, "question": text, "label": label,
                         **group_value(rec, group_column, slice_columns)})
        return rows, dropped

    @classmethod
    def create(cls, labels: list[str], instruction: str | None = None, question_template: str | None = None):
        return cls(labels=sorted(labels), instruction=instruction or cls.DEFAULT_INSTRUCTION,
                   question_template=question_template or cls.DEFAULT_QUESTION)

    def user_message(self, row: dict, question: str | None = None) -> str:
        return self.question_template.format(question=row["question"] if question is None else question)
