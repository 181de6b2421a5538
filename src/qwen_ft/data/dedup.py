"""The near-duplicate screen: evaluation rows that are copies of training rows, exact or nearly so.

A validation question that is a reworded copy of a training question measures memory, not generalisation.
Two tests, both on the question text (and a multiple-choice row's choices):

* exact, after normalisation: Unicode NFKC, case folded, punctuation dropped, whitespace collapsed;
* near: Jaccard similarity >= `threshold` (0.8 by default) of the word-bigram sets. Candidates come from
  MinHash locality-sensitive hashing (datasketch; 128 permutations), and every candidate pair is then
  checked with its exact Jaccard similarity, so LSH only decides what is compared, never what is reported.

Why word bigrams and 0.8: questions are short (MMLU-Pro's median is ~30 words), so the long shingles used
for web documents would let one changed word remove most of a question's shingles; with bigrams, one word
changed in a 20-word question leaves a Jaccard similarity of 0.81, two changed words 0.65, and unrelated
questions on one topic share few bigrams. The threshold is the one of
the deduplication literature for near-copies (Lee et al. 2022 use 0.8 on 5-grams of long documents).
"""

from __future__ import annotations

import re
import unicodedata

THRESHOLD = 0.8
NUM_PERM = 128
MODES = ("exact", "near")
_PUNCT = re.compile(r"[^\w\s]+")


def normalise(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(_PUNCT.sub(" ", text).split())


def row_text(row: dict) -> str:
    return " ".join([row["question"], *(row.get("choices") or ())])


def shingles(text: str) -> set[str]:
    """Word bigrams of the normalised text (the single word for a one-word text)."""
    words = normalise(text).split()
    return {" ".join(words[i:i + 2]) for i in range(max(1, len(words) - 1))} if words else set()


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def _minhash(items: set[str]):
    from datasketch import MinHash

    m = MinHash(num_perm=NUM_PERM, seed=1)
    m.update_batch([s.encode("utf-8") for s in sorted(items)])
    return m


class Index:
    """The rows of reference splits, queried for exact and near copies of other rows."""

    def __init__(self, rows: list[dict], threshold: float = THRESHOLD):
        from datasketch import MinHashLSH

        self.threshold = threshold
        self.exact = {normalise(row_text(r)) for r in rows}
        self.sets = [shingles(row_text(r)) for r in rows]
        self.lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM)
        for i, s in enumerate(self.sets):
            self.lsh.insert(i, _minhash(s))

    def match(self, row: dict) -> str | None:
        """"exact", "near" or None for a row against the indexed ones."""
        if normalise(row_text(row)) in self.exact:
            return "exact"
        s = shingles(row_text(row))
        if any(jaccard(s, self.sets[i]) >= self.threshold for i in self.lsh.query(_minhash(s))):
            return "near"
        return None


def screen(splits: dict[str, list[dict]], threshold: float = THRESHOLD) -> tuple[dict, dict[str, list[str | None]]]:
    """(counts for run.json, each evaluation row's match): validation against train, test against train and
    validation."""
    matches: dict[str, list[str | None]] = {}
    counts: dict = {"method": "normalised exact + MinHash LSH on word bigrams, verified by Jaccard",
                    "threshold": threshold}
    train = Index(splits.get("train", []), threshold)
    against = {"validation": [("train", train)]}
    if splits.get("test"):
        against["test"] = [("train", train), ("validation", Index(splits.get("validation", []), threshold))]
    for name, refs in against.items():
        rows = splits.get(name, [])
        found: list[str | None] = []
        for row in rows:
            hit = None
            for _, index in refs:
                hit = index.match(row)
                if hit:
                    break
            found.append(hit)
        matches[name] = found
        counts[name] = {"n": len(rows), "exact": sum(m == "exact" for m in found),
                        "near": sum(m == "near" for m in found),
                        "against": [ref for ref, _ in refs]}
    return counts, matches


def drop(splits: dict[str, list[dict]], matches: dict[str, list[str | None]], mode: str) -> dict[str, list[dict]]:
    """The splits without the evaluation rows that `mode` calls copies (exact: exact only; near: both)."""
    drops = {"exact": {"exact"}, "near": {"exact", "near"}}[mode]
    out = dict(splits)
    for name, found in matches.items():
        out[name] = [r for r, m in zip(splits[name], found) if m not in drops]
    return out
