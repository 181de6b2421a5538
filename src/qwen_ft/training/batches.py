"""Training batches: left-padded or packed collators, the seeded length-grouped order, and the losses.

Batches are left-padded, so every row's answer sits at its end, and the model computes logits only for the
last K+1 positions (`logits_to_keep`) instead of every position x the whole vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.trainer_pt_utils import LengthGroupedSampler

from qwen_ft import attention
from qwen_ft.encoding import IGNORE
from qwen_ft.inference.kernels import left_pad

# A training batch runs packed when padding it would compute more than this x its real tokens: on
# length-grouped batches with little padding a packed step is slower (the per-layer gather of the segments),
# on the Trainer's batches (the longest example of a mega-batch leading) packing pays (benchmarks/levers.py).
PACK_ABOVE_PADDING = 1.2


class LeftPadCollator:
    """Pads a batch on the left; `labels` keep the answer mask built at encoding time."""

    def __init__(self, pad_id: int, pad_to_multiple_of: int | None = None):
        self.pad_id = pad_id
        self.multiple = pad_to_multiple_of

    def _width(self, features: list[dict]) -> int:
        width = max(len(f["input_ids"]) for f in features)
        return -(-width // self.multiple) * self.multiple if self.multiple else width

    def _inputs(self, features: list[dict], width: int) -> dict:
        input_ids, mask = left_pad([f["input_ids"] for f in features], self.pad_id, "cpu", width)
        return {"input_ids": input_ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}

    def __call__(self, features: list[dict]) -> dict:
        width = self._width(features)
        labels, _ = left_pad([f["labels"] for f in features], IGNORE, "cpu", width)
        # from each row's first answer token to its end (the rows end together): the positions the loss needs
        answer_span = max(len(f["labels"]) - next((j for j, v in enumerate(f["labels"]) if v != IGNORE),
                                                  len(f["labels"])) for f in features)
        return {**self._inputs(features, width), "labels": labels, "logits_to_keep": min(max(answer_span, 1) + 1, width)}


class PackedCollator(LeftPadCollator):
    """A batch whose padding would cost more than PACK_ABOVE_PADDING x its real tokens runs as one row without
    padding (CPU, qwen-ft's attention: `attention.packs`); others are padded on the left as LeftPadCollator pads.
    Packed: the examples one after another, positions restarting at 0 for each, their lengths under
    `attention.SEGMENTS` so that each attends to itself only; logits only where an answer token is predicted
    (plus one unused last position), and `labels` (IGNORE, then those answer tokens) line up with them the way
    `answer_loss` reads a padded batch's last K+1 positions: the loss, the gradients and the Trainer's token count
    are the padded batch's. The linear layers and MLPs compute no padding; the attention lays the segments out
    as [segments, longest] (the same scores as the padded batch, without the masked cross-example pairs).
    Hand-written: transformers' padding-free path (restarting position ids) derives a block-diagonal mask over
    the whole row, which sdpa would score in full (T^2 per head); it stays as a safety net - were the segment
    keyword ever dropped, that mask still keeps the examples apart. `pack_above` 0: every batch packed."""

    def __init__(self, pad_id: int, pack_above: float = PACK_ABOVE_PADDING):
        super().__init__(pad_id)
        self.pack_above = pack_above

    def __call__(self, features: list[dict]) -> dict:
        real = sum(len(f["input_ids"]) for f in features)
        if len(features) * self._width(features) <= self.pack_above * real:
            return super().__call__(features)
        ids, positions, keep, targets, offset = [], [], [], [], 0
        for f in features:
            n = len(f["input_ids"])
            ids += f["input_ids"]
            positions += range(n)
            for j, label in enumerate(f["labels"]):
                if label != IGNORE and j:  # the token at j is predicted at position j - 1
                    keep.append(offset + j - 1)
                    targets.append(label)
            offset += n
        return {"input_ids": torch.tensor([ids]), "position_ids": torch.tensor([positions]),
                "labels": torch.tensor([[IGNORE, *targets]]), "logits_to_keep": torch.tensor([*keep, offset - 1]),
                attention.SEGMENTS: [len(f["input_ids"]) for f in features]}


def answer_loss(outputs, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """Cross-entropy over the answer tokens only; logits cover the last K+1 positions."""
    logits = outputs.logits
    k = logits.size(1) - 1
    targets = labels[:, labels.size(1) - k:].to(logits.device)
    loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                           ignore_index=IGNORE, reduction="sum")
    n = num_items_in_batch if num_items_in_batch is not None else targets.ne(IGNORE).sum()
    return loss / n


class HeadCollator(LeftPadCollator):
    """A classification-head batch (`--head classification`): prompts padded on the left, so each row's last
    prompt token sits in the last column; `labels` are the class ids."""

    def __call__(self, features: list[dict]) -> dict:
        return {**self._inputs(features, self._width(features)),
                "labels": torch.tensor([f["labels"] for f in features], dtype=torch.long)}


def class_loss(outputs, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """The sequence-classification model's own cross-entropy over its pooled logits, summed and divided by the
    rows of the whole (accumulated, all-process) batch as `answer_loss` is: the model's per-micro-batch mean
    would be scaled by neither gradient accumulation nor the process count."""
    logits = outputs.logits.float()
    loss = F.cross_entropy(logits, labels.to(logits.device), reduction="sum")
    return loss / (num_items_in_batch if num_items_in_batch is not None else labels.numel())


def collator(model, tokenizer, head: bool, cpu: bool):
    """Packed batches where every attention call honours them (LM-head training on the CPU with qwen-ft's
    attention: no padding through the linear layers), else batches padded on the left (to a multiple of 8 on
    GPUs)."""
    multiple = None if cpu else 8
    if head:
        return HeadCollator(tokenizer.pad_token_id, multiple)
    if cpu and attention.packs(model):
        return PackedCollator(tokenizer.pad_token_id)
    return LeftPadCollator(tokenizer.pad_token_id, multiple)


class SeededLengthGroupedSampler(LengthGroupedSampler):
    """Length-grouped order drawn from (seed, epoch) alone. The stock sampler draws it from the global RNG,
    whose state at an epoch start a resumed run cannot reproduce, so its data order would differ."""

    def __init__(self, batch_size: int, lengths: list[int], seed: int):
        super().__init__(batch_size, lengths=lengths, generator=torch.Generator())
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:  # called by the Trainer (via accelerate) before each epoch
        self.epoch = epoch

    def __iter__(self):
        self.generator.manual_seed(self.seed + self.epoch)
        return super().__iter__()
