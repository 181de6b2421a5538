"""Seeded character-level noise on question texts: robustness checks (`validate --perturb`) and training-time
augmentation (`train --augment`).

A spec reads `typos:RATE`: each character is, with probability RATE, swapped with the next one, dropped, or
duplicated (equal chances). The noise of a row depends only on (seed, row id, text), never on the order or
batch of the rows. Only the question text changes; labels and multiple-choice choices are left alone.

The measured rate is edits per character: the number of edits that changed the text (a swap of two equal
characters changes nothing and is not counted), divided by the number of characters of the original texts.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from qwen_ft.errors import UserError

KINDS = ("typos",)
FORM = "typos:RATE with RATE in [0, 1] (e.g. typos:0.05: about 5% of the characters swapped, dropped or duplicated)"


@dataclass(frozen=True)
class Perturbation:
    kind: str
    rate: float

    @property
    def spec(self) -> str:
        return f"{self.kind}:{self.rate:g}"


def parse_perturbation(spec: str, flag: str = "--perturb") -> Perturbation:
    """`typos:RATE` -> Perturbation; anything else is a UserError naming the accepted form."""
    kind, sep, value = str(spec).strip().partition(":")
    rate = None
    if sep and kind.strip() in KINDS:
        try:
            rate = float(value)
        except ValueError:
            rate = None
    if rate is None or not 0 <= rate <= 1:  # also rejects NaN
        raise UserError(f"{flag} {spec!r} is not a perturbation", f"Write {FORM}.")
    return Perturbation(kind.strip(), rate)


def typos(text: str, rate: float, rng: random.Random) -> tuple[str, int]:
    """(noisy text, edits that changed it): each position is hit with probability `rate`."""
    chars, out, edits, i = list(text), [], 0, 0
    while i < len(chars):
        c = chars[i]
        if rate > 0 and rng.random() < rate:
            op = rng.choice(("swap", "drop", "duplicate") if i + 1 < len(chars) else ("drop", "duplicate"))
            if op == "swap":
                out += [chars[i + 1], c]
                edits += chars[i + 1] != c
                i += 2
                continue
            edits += 1
            if op == "duplicate":
                out += [c, c]
        else:
            out.append(c)
        i += 1
    return "".join(out), edits


def perturb_rows(rows: list[dict], perturbation: Perturbation, seed: int) -> tuple[list[dict], dict]:
    """(perturbed copies of `rows`, {"kind", "rate", "seed", "chars_changed_fraction"}); the rows given are not
    modified."""
    out, edits, chars = [], 0, 0
    for row in rows:
        rng = random.Random(f"{perturbation.kind}\x00{seed}\x00{row.get('id')}\x00{row['question']}")
        question, n = typos(row["question"], perturbation.rate, rng)
        if not question.strip():  # a one-character question dropped: keep a question to ask
            question, n = row["question"], 0
        out.append({**row, "question": question})
        edits += n
        chars += len(row["question"])
    stats = {"kind": perturbation.kind, "rate": perturbation.rate, "seed": seed,
             "chars_changed_fraction": round(edits / chars, 6) if chars else 0.0}
    return out, stats


def augment_rows(rows: list[dict], spec: str, seed: int) -> list[dict]:
    """`rows` followed by one perturbed copy of each (id suffixed '-aug'): twice the rows."""
    copies, _ = perturb_rows(rows, parse_perturbation(spec, "--augment"), seed)
    return rows + [{**r, "id": f"{r.get('id')}-aug"} for r in copies]
