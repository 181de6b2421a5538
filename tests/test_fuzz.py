"""Property tests of the data loaders: any file of malformed rows gives a valid data set or a UserError,
never another exception."""

from __future__ import annotations

import csv
import functools
import json
import math
import os
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qwen_ft.config import DataArgs
from qwen_ft.data.prepare import Prepared, prepare
from qwen_ft.data.sources import read_records
from qwen_ft.errors import UserError

# FUZZ_EXAMPLES=1000 for a longer hunt; the default keeps the file at a few seconds
SETTINGS = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "60")), deadline=None, suppress_health_check=[HealthCheck.too_slow])

COLUMNS = ["question", "text", "query", "category", "label", "id", "choices", "answerKey", "options", "answer",
           "answer_index", "cands", "extra"]
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 30), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.sampled_from(["law", "math", "A", "B", "C", " ", "", "nan", "{x}", "{question}"]),
)
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=5),
    st.fixed_dictionaries({}, optional={"label": st.lists(inner, max_size=5), "text": st.lists(inner, max_size=5)}),
), max_leaves=8)


@st.composite
def mostly_good(draw):
    """A valid category or multiple-choice data set, then a few rows spoiled: the interesting edge."""
    text = st.text(min_size=1, max_size=20)
    if draw(st.booleans()):
        labels = draw(st.lists(st.sampled_from(["law", "math", "art", " law", "Law", "3"]), min_size=1, max_size=3,
                               unique=True))
        records = [{"question": draw(text), "category": lab} for lab in labels for _ in range(draw(st.integers(3, 8)))]
    else:
        n = draw(st.integers(2, 5))
        records = [{"question": draw(text),
                    "choices": {"label": list("ABCDE"[:n]), "text": draw(st.lists(text, min_size=n, max_size=n))},
                    "answerKey": draw(st.sampled_from("ABCDE"[:n]))} for _ in range(draw(st.integers(5, 25)))]
    for _ in range(draw(st.integers(0, 3))):
        row = records[draw(st.integers(0, len(records) - 1))]
        key = draw(st.sampled_from(COLUMNS))
        if draw(st.booleans()):
            row.pop(key, None)
        else:
            row[key] = draw(values)
    return records


datasets = st.one_of(st.lists(st.dictionaries(st.sampled_from(COLUMNS), values, max_size=6), max_size=40),
                     mostly_good())


KNOWN_GOOD = tempfile.TemporaryDirectory(prefix="qwen-ft-known-good-")


def good_file(kind: str, suffix: str, part: str = "all") -> str:
    """A known-good data file: the bundled demo rows of `kind` ("category": `demo`, "multiple_choice": `demo-mc`)
    written as `suffix`; part "train" / "val": every other row (both hold every label)."""
    from qwen_ft.data.sources import demo_path

    path = Path(KNOWN_GOOD.name) / f"{kind}-{part}{suffix}"
    if path.exists():
        return str(path)
    lines = demo_path("demo" if kind == "category" else "demo-mc").read_text(encoding="utf-8").splitlines()
    records = [json.loads(x) for x in lines if x.strip()]
    records = records if part == "all" else records[part == "val"::2]
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif suffix == ".json":
        path.write_text(json.dumps(records))
    elif suffix == ".csv":  # flat string columns (the category rows) only
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=sorted({k for r in records for k in r}))
            w.writeheader()
            w.writerows(records)
    else:
        import pandas as pd

        pd.DataFrame(records).to_parquet(path)
    return str(path)


@functools.cache
def known_good_outcome(kind: str, suffix: str, val_suffix: str | None, task: str, test_fraction: float,
                       max_samples_per_category: int | None) -> str | None:
    """What `prepare` does with the fuzzed call's options on known-good files of the same formats: None when
    it loads them (then its splits are checked), else its error message."""
    data = DataArgs(data=good_file(kind, suffix, "train" if val_suffix else "all"),
                    validation_data=good_file(kind, val_suffix, "val") if val_suffix else None, task=task,
                    test_fraction=test_fraction, max_samples_per_category=max_samples_per_category)
    try:
        prepared = prepare(data, seed=0)
    except UserError as e:
        return e.message
    assert prepared.task.name == kind and prepared.splits["train"] and prepared.splits["validation"]
    return None


def check_loader_accepts_good_data(data: DataArgs) -> None:
    """A UserError on fuzzed rows counts only if the same options load good rows in the same formats; options
    that no data can satisfy must be refused on good rows too, with the error naming the problem."""
    kind = "multiple_choice" if data.task == "multiple_choice" else "category"
    val_suffix = Path(data.validation_data).suffix if data.validation_data else None
    outcome = known_good_outcome(kind, Path(data.data).suffix, val_suffix, data.task, data.test_fraction,
                                 data.max_samples_per_category)
    if data.max_samples_per_category is not None and data.max_samples_per_category < 3:
        # per-category sampling is a category-data flag, and a stratified split needs 3 rows of each label
        expected = ("--max-samples-per-category applies to category data" if kind == "multiple_choice"
                    else "too few rows for a stratified split")
        assert outcome is not None and expected in outcome, (data, outcome)
    else:
        assert outcome is None, (data, outcome)


def check(data: DataArgs) -> None:
    try:
        prepared = prepare(data, seed=0)
    except UserError as e:
        assert e.message.strip()
        check_loader_accepts_good_data(data)
        return
    assert isinstance(prepared, Prepared)
    assert prepared.splits["train"] and prepared.splits["validation"]
    labels = set(prepared.task.labels)
    for name, split in prepared.splits.items():
        for row in split:
            assert isinstance(row["question"], str) and row["question"].strip()
            assert isinstance(row["label"], str) and row["label"] in labels, (name, row)
            if prepared.task.name == "multiple_choice":
                assert 2 <= len(row["choices"]) <= 26 and all(isinstance(c, str) and c for c in row["choices"])
                assert row["label"] in prepared.task.row_labels(row)


def jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, list):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    return value


@SETTINGS
@given(datasets, st.booleans())
def test_jsonl_rows(records, nan_literals):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.jsonl"
        rows = records if nan_literals else [jsonable(r) for r in records]  # NaN/Infinity literals as Python writes
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        check(DataArgs(data=str(path)))


@SETTINGS
@given(datasets, st.sampled_from(["json", "csv"]))
def test_json_and_csv_rows(records, fmt):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"data.{fmt}"
        if fmt == "json":
            path.write_text(json.dumps(records))
        else:
            columns = sorted({k for r in records for k in r})
            with open(path, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=columns)
                if columns:
                    w.writeheader()
                for r in records:
                    w.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in r.items()})
        check(DataArgs(data=str(path)))


@SETTINGS
@given(datasets, datasets, st.sampled_from(["auto", "category", "multiple_choice"]))
def test_separate_validation_file_and_task(train_rows, val_rows, task):
    with tempfile.TemporaryDirectory() as tmp:
        tr, va = Path(tmp) / "train.jsonl", Path(tmp) / "val.jsonl"
        tr.write_text("".join(json.dumps(jsonable(r)) + "\n" for r in train_rows))
        va.write_text("".join(json.dumps(jsonable(r)) + "\n" for r in val_rows))
        check(DataArgs(data=str(tr), validation_data=str(va), task=task, test_fraction=0.0))
        check(DataArgs(data=str(tr), task=task, max_samples_per_category=2))


@SETTINGS
@given(st.binary(max_size=300), st.sampled_from([".jsonl", ".json", ".csv", ".parquet"]))
def test_arbitrary_bytes(blob, suffix):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"data{suffix}"
        path.write_bytes(blob)
        try:
            records = read_records(str(path))
        except UserError:
            return
        assert isinstance(records, list) and all(isinstance(r, dict) for r in records)
        check(DataArgs(data=str(path)))
