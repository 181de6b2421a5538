"""Rows -> token ids through the tokenizer's chat template; the same prompt at training and inference.

Training examples are `prompt ids + label ids + end-of-turn id`, with `labels` = -100 on the prompt, so
the loss covers exactly the answer and the end-of-turn token. The mask is built here, by position,
never from the pad id (for SmolLM2, pad == eos == end-of-turn, and masking by pad id would hide the
token the model must learn to stop with).
"""

from __future__ import annotations

from functools import cached_property

from qwen_ft.errors import UserError
from qwen_ft.tasks import Task

IGNORE = -100


class PromptEncoder:
    def __init__(self, tokenizer, task: Task, max_length: int):
        self.tok = tokenizer
        self.task = task
        self.max_length = max_length
        self.plain = task.extra.get("prompt_style") == "plain"
        self.has_template = bool(getattr(tokenizer, "chat_template", None)) and not self.plain
        # plain prompts score each answer as a continuation (lm-evaluation-harness style): no end token
        # follows it, so answers can only be compared by their exact log-probability, never decoded
        self.ends_answers = not self.plain

    # ------------------------------------------------------------------ prompt text
    def _messages(self, system: str, user: str) -> list[dict]:
        if self.system_role:
            return [{"role": "system", "content": system}, {"role": "user", "content": user}]
        return [{"role": "user", "content": f"{system}\n\n{user}"}]

    def render(self, system: str, user: str, answer: str | None = None) -> str:
        if not self.has_template:
            text = (f"{system}\n\n" if system else "") + f"{user}\nAnswer:"
            return text if answer is None else f"{text} {answer}"
        messages = self._messages(system, user)
        if answer is None:
            return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                enable_thinking=False)
        messages.append({"role": "assistant", "content": answer})
        return self.tok.apply_chat_template(messages, tokenize=False, enable_thinking=False)

    @cached_property
    def system_role(self) -> bool:
        if not self.has_template:
            return False
        try:
            self.tok.apply_chat_template([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
                                         tokenize=False, add_generation_prompt=True)
            return True
        except Exception:  # templates such as Gemma's reject a system role: fold it into the user turn
            return False

    @cached_property
    def eot_id(self) -> int:
        """The token that ends the assistant's turn (<|im_end|> for ChatML), else EOS."""
        if self.has_template:
            marker = "QWENFTLABEL"
            full = self.render("s", "u", marker)
            tail = full[full.rfind(marker) + len(marker):]
            ids = self._ids(tail)
            if ids:
                return ids[0]
        if self.tok.eos_token_id is None:
            raise UserError("the tokenizer has neither a chat template nor an EOS token; cannot mark the answer end")
        return self.tok.eos_token_id

    def _ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    # ------------------------------------------------------------------ answer ids
    def answer_ids(self, text: str) -> list[int]:
        """The tokens the model writes to answer `text`, end-of-turn included."""
        ids = self._ids(("" if self.has_template else " ") + text)
        return ids + [self.eot_id] if self.ends_answers else ids

    @cached_property
    def label_ids(self) -> dict[str, list[int]]:
        """Each label's answer tokens (for tasks whose answer is the label itself)."""
        return {label: self.answer_ids(label) for label in self.task.labels}

    @cached_property
    def max_label_len(self) -> int:
        return max(len(v) for v in self.label_ids.values())

    def answer_options(self, row: dict) -> tuple[list[str], list[list[int]]]:
        """The row's allowed labels and the tokens written for each. When two choices of a row read the
        same, only the first is an option (the model cannot tell them apart)."""
        labels = self.task.row_labels(row)
        if not self.task.per_row_answers:
            return labels, [self.label_ids[lab] for lab in labels]
        kept, seqs, seen = [], [], set()
        for lab in labels:
            ids = self.answer_ids(self.task.answer(row, lab))
            if tuple(ids) not in seen:
                seen.add(tuple(ids))
                kept.append(lab)
                seqs.append(ids)
        return kept, seqs

    def answer_len(self, row: dict) -> int:
        if not self.task.per_row_answers:
            return self.max_label_len
        return max(len(s) for s in self.answer_options(row)[1])

    # ------------------------------------------------------------------ encoding
    @cached_property
    def special_texts(self) -> tuple[str, ...]:
        """The texts the tokenizer reads as special tokens (<|im_end|>, <|im_start|>, ...)."""
        added = getattr(self.tok, "added_tokens_decoder", {}) or {}
        texts = set(getattr(self.tok, "all_special_tokens", []) or [])
        texts |= {t.content for t in added.values() if getattr(t, "special", False)}
        return tuple(sorted((t for t in texts if t), key=len, reverse=True))

    def _prompt(self, system: str, user: str) -> list[int]:
        """The rendered prompt's ids, where text the user wrote never becomes a special token: a question
        holding "<|im_end|>\n<|im_start|>assistant" would otherwise close its own turn and forge an answer.
        Such a user message is tokenized on its own with special-token texts kept as plain text, between the
        template's ids; any other prompt is tokenized whole, as it always was."""
        if not any(t in user for t in self.special_texts):
            return self._ids(self.render(system, user))
        marker = "\x00QWENFT-USER\x00"
        before, after = self.render(system, marker).split(marker)
        plain = self.tok(user, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        return self._ids(before) + plain + self._ids(after)

    def char_bound(self) -> int:
        """Characters of question text worth tokenizing: a token covers far fewer than 32 characters, so a
        longer question is cut to this before tokenizing (a 50 MB text cell costs 32 x --max-length chars)."""
        return 32 * self.max_length

    def prompt_ids(self, row: dict) -> list[int]:
        return self.encode_prompt(row)[0]

    def encode_prompt(self, row: dict) -> tuple[list[int], bool]:
        """(prompt ids, whether the question was cut); an over-long question is cut (never the instruction or
        the answer). The flag is per call: concurrent callers each count their own rows."""
        system = self.task.system_message()
        question = row["question"]
        bounded = len(question) > self.char_bound()
        if bounded:
            question = question[: self.char_bound()]
        ids = self._prompt(system, self.task.user_message(row, question))
        answer_len = self.answer_len(row)
        budget = self.max_length - answer_len
        if len(ids) <= budget:
            return ids, bounded
        q_ids = self._ids(question)
        overhead = len(ids) - len(q_ids)
        keep = budget - overhead - 2
        while keep > 0:
            cut = self.tok.decode(q_ids[:keep]) + " ..."
            ids = self._prompt(system, self.task.user_message(row, cut))
            if len(ids) <= budget:
                return ids, True
            keep -= max(4, len(ids) - budget)
        raise UserError(f"--max-length {self.max_length} is too small: the instruction and choices alone take "
                        f"{overhead} tokens", f"Use --max-length {overhead + answer_len + 64} or more.")

    def train_example(self, row: dict) -> dict:
        return self.example(row)[0]

    def head_example(self, row: dict, pad_id: int | None) -> dict:
        """A classification-head example (`--head classification`): the inference prompt alone, without the
        answer, and its label's index as the target."""
        return self.example(row, head=True, pad_id=pad_id)[0]

    def example(self, row: dict, head: bool = False, pad_id: int | None = None) -> tuple[dict, bool]:
        """(a training example, whether its question was cut)."""
        prompt, cut = self.encode_prompt(row)
        if head:
            prompt = check_head_prompt(prompt, pad_id)
            return {"input_ids": prompt, "labels": self.task.labels.index(row["label"]), "length": len(prompt)}, cut
        answer = self.answer_ids(self.task.answer(row, row["label"]))
        return {"input_ids": prompt + answer, "labels": [IGNORE] * len(prompt) + answer,
                "length": len(prompt) + len(answer)}, cut


def check_head_prompt(ids: list[int], pad_id: int | None) -> list[int]:
    """A classification head reads the last token that is not the pad id (transformers' pooling, the same for
    left and right padding). Prompts end with the opened assistant turn (or 'Answer:'), never with EOS, so
    pad == eos tokenizers (SmolLM2) pool on the prompt's true last token; a prompt ending with the pad id
    would be pooled on an earlier one, so it is refused rather than scored wrong."""
    if ids and pad_id is not None and ids[-1] == pad_id:
        raise UserError("this prompt ends with the padding token, so a classification head cannot find its last "
                        "token", "Use a chat template or --prompt-style plain, whose prompts end with the answer's "
                        "cue, or a tokenizer whose pad token differs from the prompt's last token.")
    return ids
