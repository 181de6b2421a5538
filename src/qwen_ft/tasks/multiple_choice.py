"""Question + lettered choices -> the letter of the answer (CommonsenseQA and friends).

Two answer formats: `letter` (the default: the model writes the letter) and `text` (the model writes
the text of the correct choice, exactly as listed; the prediction is mapped back to its letter, so
metrics stay per letter). Small models (~100M parameters) cannot bind a letter to a choice; they can
write the choice itself, which is the format to use for them (see the README's optimizer study).

Three record formats load: HF CommonsenseQA (`question`, `choices{label,text}`, `answerKey`), the GKP
"standardized" format (`query`, `cands`, `answer` text) and MMLU-style (`question`, `options`, `answer`
letter or `answer_index`).
"""

from __future__ import annotations

import dataclasses
import string
from collections import Counter
from typing import Any, ClassVar

from qwen_ft.errors import Problems
from qwen_ft.tasks.base import Task, clean_text, group_value

LETTERS = string.ascii_uppercase


def _as_list(value: Any) -> list | None:
    if value is None or isinstance(value, (str, bytes, dict)):
        return None
    try:
        return list(value)
    except TypeError:
        return None


def _parse_record(rec: dict) -> tuple[str | None, list[str] | None, str | None, str | None]:
    """(question, choice texts, answer letter, problem) for one record in any known format."""
    question = clean_text(rec.get("question", rec.get("query")))
    if question is None:
        return None, None, None, "no question text"
    if "choices" in rec:
        ch = rec["choices"]
        if not isinstance(ch, dict):
            return question, None, None, "'choices' is not a {label, text} mapping"
        texts, labels = _as_list(ch.get("text")), _as_list(ch.get("label"))
        if texts is None or labels is None or len(texts) != len(labels):
            return question, None, None, "'choices' needs equally long 'label' and 'text' lists"
        texts = [clean_text(t) for t in texts]
        if any(t is None for t in texts):
            return question, None, None, "a choice text is empty"
        key = clean_text(rec.get("answerKey"))
        labels = [clean_text(lab) for lab in labels]
        if key is None or key not in labels:
            return question, texts, None, f"answerKey {rec.get('answerKey')!r} is not among the choice labels {labels}"
        return question, texts, LETTERS[labels.index(key)], None
    texts = _as_list(rec.get("cands", rec.get("options")))
    if texts is None:
        return question, None, None, "no choices ('choices', 'cands' or 'options')"
    texts = [clean_text(t) for t in texts]
    if any(t is None for t in texts):
        return question, None, None, "a choice text is empty"
    answer = rec.get("answer")
    if "cands" in rec:
        answer = clean_text(answer)
        if answer not in texts:
            return question, texts, None, f"answer {rec.get('answer')!r} is not among the choices"
        return question, texts, LETTERS[texts.index(answer)], None  # duplicates: the first one
    idx = rec.get("answer_index")
    letter = clean_text(answer)
    if letter is not None and len(letter) == 1 and letter.upper() in LETTERS[: len(texts)]:
        return question, texts, letter.upper(), None
    if isinstance(idx, int) and not isinstance(idx, bool) and 0 <= idx < len(texts):
        return question, texts, LETTERS[idx], None
    return question, texts, None, f"answer {answer!r} is not a letter of the {len(texts)} choices"


class MultipleChoiceTask(Task):
    name: ClassVar[str] = "multiple_choice"
    DEFAULT_INSTRUCTION: ClassVar[str] = (
        "Answer the multiple-choice question. Reply with the letter of the correct choice only ({labels})."
    )
    TEXT_INSTRUCTION: ClassVar[str] = (
        "Answer the multiple-choice question. Reply with the text of the correct choice only, exactly as listed."
    )
    DEFAULT_QUESTION: ClassVar[str] = "Question: {question}\n{choices}"
    PLAIN_QUESTION: ClassVar[str] = "Question: {question}"  # lm-evaluation-harness: choices are not listed

    @staticmethod
    def matches(columns: list[str]) -> bool:
        return bool({"choices", "cands", "options"} & set(columns))

    @staticmethod
    def normalize(records: list[dict], id_prefix: str = "row", group_column: str | None = None,
                  slice_columns: tuple[str, ...] = (),
                  **_: Any) -> tuple[list[dict], int]:
        """Records -> rows {id, question, choices, label} (+ group: the `group_column` value); every malformed
        row is reported at once."""
        p = Problems()
        rows = []
        for i, rec in enumerate(records):
            question, texts, letter, problem = _parse_record(rec)
            if problem is None and not 2 <= len(texts) <= len(LETTERS):
                problem = f"{len(texts)} choices (need 2 to {len(LETTERS)})"
            if problem is not None:
                if len(p.items) < 10:
                    p.add(f"row {i}: {problem}")
                elif len(p.items) == 10:
                    p.add("... (more rows with problems)")
                continue
            rid = clean_text(rec.get("id")) or f"{id_prefix}-{i}"
            rows.append({"id": rid, "question": question, "choices": texts, "label": letter,
                         **group_value(rec, group_column, slice_columns)})
        if rows and not p.items:
            counts = Counter(len(r["choices"]) for r in rows)
            if len(counts) > 1:
                usual = counts.most_common(1)[0][0]
                bad = [i for i, r in enumerate(rows) if len(r["choices"]) != usual][:5]
                p.add(f"rows have different numbers of choices ({dict(counts)}); most have {usual}, "
                      f"rows {bad} differ")
        p.raise_if_any("Fix the multiple-choice rows: each needs a question, the same number of choices, and "
                       "an answer among them.")
        return rows, 0

    @classmethod
    def create(cls, rows: list[dict], instruction: str | None = None, question_template: str | None = None,
               answer_format: str = "letter", prompt_style: str = "chat"):
        """`prompt_style` plain: no chat template and no instruction; the question alone, then the answer
        text (lm-evaluation-harness's multiple-choice format, in which every choice is scored)."""
        n = max(len(r["choices"]) for r in rows)
        text = answer_format == "text" or prompt_style == "plain"
        plain = prompt_style == "plain"
        default = "" if plain else cls.TEXT_INSTRUCTION if text else cls.DEFAULT_INSTRUCTION
        extra = {"answer_format": "text"} if text else {}
        if plain:
            extra["prompt_style"] = "plain"
        return cls(labels=list(LETTERS[:n]), instruction=default if instruction is None else instruction,
                   question_template=question_template or (cls.PLAIN_QUESTION if plain else cls.DEFAULT_QUESTION),
                   extra=extra)

    def plain_prompt(self) -> MultipleChoiceTask:
        """Also without the instruction (lm-evaluation-harness: the question alone, its choices not listed)."""
        return dataclasses.replace(super().plain_prompt(), instruction="")

    def row_labels(self, row: dict) -> list[str]:
        return self.labels[: len(row["choices"])]

    @property
    def per_row_answers(self) -> bool:
        return self.extra.get("answer_format") == "text"

    def answer(self, row: dict, label: str) -> str:
        return row["choices"][LETTERS.index(label)] if self.per_row_answers else label

    def user_message(self, row: dict, question: str | None = None) -> str:
        choices = "\n".join(f"{LETTERS[i]}. {t}" for i, t in enumerate(row["choices"]))
        return self.question_template.format(question=row["question"] if question is None else question,
                                             choices=choices)
