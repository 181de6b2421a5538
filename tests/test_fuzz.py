"""Property tests of the data loaders: any file of malformed rows gives a valid data set or a UserError,
never another exception."""

from __future__ import annotations

import csv
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


def check(data: DataArgs) -> None:
    try:
        prepared = prepare(data, seed=0)
    except UserError as e:
        assert e.message.strip()
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
