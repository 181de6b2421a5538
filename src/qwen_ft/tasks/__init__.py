"""Tasks know rows, labels and prompts - not models or files.

A task turns raw records into normalized rows (`id`, `question`, `label`, and `choices` for multiple
choice), lists the label set, and renders a row as chat messages (system instruction, user message).
The same rendering is used at training and at inference.
"""

from __future__ import annotations

from qwen_ft.tasks.base import Task
from qwen_ft.tasks.category import CategoryTask
from qwen_ft.tasks.multiple_choice import MultipleChoiceTask

TASKS: dict[str, type[Task]] = {"category": CategoryTask, "multiple_choice": MultipleChoiceTask}


def detect_task(columns: list[str]) -> str:
    """Text -> category when there is a category column (MMLU-Pro has options too, but the seed guide
    classifies its questions); multiple choice when the records carry choices; else text -> label."""
    if "category" not in columns and MultipleChoiceTask.matches(columns):
        return "multiple_choice"
    return "category"


__all__ = ["TASKS", "CategoryTask", "MultipleChoiceTask", "Task", "detect_task"]
