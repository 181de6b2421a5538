"""`qwen-ft predict`'s files: a jsonl / csv / parquet file (or jsonl on stdin) labeled by a trained classifier.

The input is read in chunks of `--chunk-rows` rows (memory stays flat on a file of any length), each
chunk is classified and appended to `OUTPUT.partial` (JSON lines), and `OUTPUT.partial.json` records how
many rows and bytes of it are final after every chunk. A finished run turns the partial file into
OUTPUT (converted to csv / parquet by the output's suffix, again chunk by chunk) with `os.replace`, so
OUTPUT is never half-written. After an interruption, `--resume` cuts the partial file back to its last
recorded chunk and continues from the next input row: chunks start at the same rows as in an
uninterrupted run, so each row meets the same neighbours and the file is byte-identical.
"""

from __future__ import annotations

import csv
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING

from qwen_ft.data.sources import iter_jsonl
from qwen_ft.errors import UserError
from qwen_ft.outputs import atomic_write_text
from qwen_ft.tasks.base import clean_text
from qwen_ft.tasks.category import TEXT_COLUMNS

if TYPE_CHECKING:
    from qwen_ft.inference.engine import Classifier

FORMATS = {".jsonl": "jsonl", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
ID_COLUMNS = ("id", "question_id", "uid", "guid")


# ----------------------------------------------------------------------------- reading, in chunks

def file_format(path: str, given: str | None, what: str) -> str:
    if given:
        return given
    if path == "-":
        return "jsonl"
    fmt = FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise UserError(f"{what} {path}: unknown format '{Path(path).suffix or '(no suffix)'}'",
                        f"Use a file ending in {', '.join(FORMATS)} (or pass --{what}-format).")
    return fmt


def read_records(path: str, fmt: str, chunk_rows: int) -> Iterator[dict]:
    """Records one by one, never the whole file in memory (pyarrow / pandas chunked readers)."""
    if fmt == "jsonl":
        stdin = getattr(sys.stdin, "buffer", sys.stdin)  # a replaced stdin (tests, notebooks) may be text
        f = stdin if path == "-" else open(path, "rb")
        try:
            yield from iter_jsonl(f, path)
        finally:
            if f is not stdin:
                f.close()
    elif fmt == "csv":
        import pandas as pd

        source = sys.stdin if path == "-" else path
        try:  # text stays text (ids like 007 keep their zeros); empty cells are ""
            reader = pd.read_csv(source, chunksize=chunk_rows, dtype=str, keep_default_na=False)
            for frame in reader:
                yield from frame.to_dict("records")
        except (ValueError, pd.errors.ParserError) as e:
            raise UserError(f"cannot read {path} as csv: {e}") from None
    else:
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(sys.stdin.buffer if path == "-" else path)
        except Exception as e:  # pyarrow raises several types for a file that is not parquet
            raise UserError(f"cannot read {path} as parquet: {type(e).__name__}: {e}") from None
        for batch in pf.iter_batches(batch_size=chunk_rows):
            yield from batch.to_pylist()


def chunks(records: Iterator[dict], size: int) -> Iterator[list[dict]]:
    while True:
        chunk = list(islice(records, size))
        if not chunk:
            return
        yield chunk


# ----------------------------------------------------------------------------- rows and results

def pick(columns: list[str], wanted: str | None, candidates: tuple[str, ...], kind: str, required: bool) -> str | None:
    if wanted is not None:
        if wanted not in columns:
            raise UserError(f"{kind} column '{wanted}' not found; columns found: {', '.join(map(str, columns))}")
        return wanted
    found = next((c for c in candidates if c in columns), None)
    if found is None and required:
        raise UserError(f"no {kind} column found (looked for {', '.join(candidates)}); columns found: "
                        f"{', '.join(map(str, columns))}", f"Name it with --{kind}-column.")
    return found


def to_row(clf: Classifier, rec: dict, text_col: str) -> dict | None:
    """The task row of one record, or None when it has no usable text."""
    text = clean_text(rec.get(text_col))
    if text is None:
        return None
    if clf.task.name != "multiple_choice":
        return {"question": text}
    choices = rec.get("choices", rec.get("options", rec.get("cands")))
    if isinstance(choices, dict):  # CommonsenseQA {label, text}
        choices = choices.get("text")
    if isinstance(choices, str):  # csv cells hold JSON lists
        try:
            choices = json.loads(choices)
        except json.JSONDecodeError:
            return None
    if not isinstance(choices, (list, tuple)) or len(choices) < 2:
        return None
    return {"question": text, "choices": [str(c) for c in choices]}


def plain(value):
    """numpy / pandas scalars -> Python values, so that JSON encodes them."""
    return value.item() if hasattr(value, "item") and not isinstance(value, (list, dict, str)) else value


def id_text(value):
    """An id as written: numbers and text as they are, anything else (binary, timestamps, decimals, nested
    values from a parquet column) as text; binary that is not UTF-8 as hex."""
    value = plain(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return bytes(value).hex()
    return str(value)


# ----------------------------------------------------------------------------- writing

def output_columns(has_id: bool, top: int, abstains: bool = False) -> list[str]:
    return [*(["id"] if has_id else []), "label", "probability", "raw_probability", *(["top"] if top > 1 else []),
            *(["abstained", "model_label"] if abstains else []), "error"]


def convert(partial: Path, target: Path, fmt: str, chunk_rows: int, columns: list[str]) -> None:
    """JSON lines -> `fmt` in a temp file beside `target`, then os.replace (target complete or untouched)."""
    if fmt == "jsonl":
        os.replace(partial, target)
        return
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        with open(partial, encoding="utf-8") as src:
            records = (json.loads(line) for line in src)
            if fmt == "csv":
                _write_csv(records, tmp, columns)
            else:
                _write_parquet(records, tmp, chunk_rows, columns)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    partial.unlink()


def _write_csv(records: Iterator[dict], tmp: Path, columns: list[str]) -> None:
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        for rec in records:
            if "top" in rec:
                rec["top"] = json.dumps(rec["top"], ensure_ascii=False)
            writer.writerow(rec)
        f.flush()
        os.fsync(f.fileno())


def _write_parquet(records: Iterator[dict], tmp: Path, chunk_rows: int, columns: list[str]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    fields = {"id": pa.string(), "label": pa.string(), "probability": pa.float64(),
              "raw_probability": pa.float64(), "error": pa.string(), "abstained": pa.bool_(),
              "model_label": pa.string(),
              "top": pa.list_(pa.struct([("label", pa.string()), ("probability", pa.float64())]))}
    schema = pa.schema([(k, fields[k]) for k in columns])
    with pq.ParquetWriter(tmp, schema) as writer:
        for chunk in chunks(records, chunk_rows):
            for rec in chunk:
                if rec.get("id") is not None:
                    rec["id"] = str(rec["id"])  # one column type for ids of any input type
                if "top" in rec:
                    rec["top"] = [{"label": lab, "probability": p} for lab, p in rec["top"]]
            writer.write_table(pa.Table.from_pylist(chunk, schema=schema))


class Progress:
    """The partial output and its record of finished rows (both beside OUTPUT)."""

    def __init__(self, output: Path):
        self.partial = output.with_name(output.name + ".partial")
        self.record = output.with_name(output.name + ".partial.json")

    def read(self) -> dict | None:
        if not self.record.is_file():
            return None
        try:
            return json.loads(self.record.read_text())
        except json.JSONDecodeError:
            return None

    def commit(self, rows: int, size: int, settings: dict) -> None:
        atomic_write_text(self.record, json.dumps({"rows": rows, "bytes": size, "settings": settings}) + "\n")


# ----------------------------------------------------------------------------- resuming

WHAT_CHANGED = {"input_sha256": "the input file's contents (sha256)", "model_files": "the model folder's files "
                "(adapter or weights, labels, calibration, threshold, config)"}
MODEL_FILES = ("adapter_model.safetensors", "label_mapping.json", "calibration.json", "threshold.json", "config.yaml")


def sha256_file(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def identity(input_path: str, model: Path) -> dict:
    """What a resume must continue: the input's full sha256 (about 1 s per GB, against minutes of inference;
    stdin has none) and the sha256 of every model-folder file that decides an answer."""
    files = [*MODEL_FILES, *sorted(p.name for p in model.glob("model*.safetensors"))] if model.is_dir() else []
    return {"input_sha256": None if input_path == "-" else sha256_file(Path(input_path)),
            "model_files": {name: sha256_file(model / name) for name in files if (model / name).is_file()}}


def _prepend(first: dict, rest: Iterator[dict]) -> Iterator[dict]:
    yield first
    yield from rest


def _skip(records: Iterator[dict], n: int) -> Iterator[dict]:
    """Drop the first `n` records (finished before the interruption) without classifying them."""
    skipped = sum(1 for _ in islice(records, n))
    if skipped < n:
        raise UserError(f"--resume: the input has {skipped} rows, fewer than the {n} already predicted",
                        "Resume with the same input file.")
    return records


def check_start(progress: Progress, state: dict | None, settings: dict, output: Path, resume: bool,
                overwrite: bool) -> None:
    """--resume continues an interrupted prediction with the same settings; a new one finds no partial files
    and no output (unless --overwrite)."""
    if resume:
        if state is None or not progress.partial.is_file():
            hint = "It is already complete." if output.exists() else "Drop --resume to start."
            raise UserError(f"--resume: no interrupted prediction for {output} ({progress.record.name} not found)", hint)
        if state["settings"] != settings:
            diff = sorted(k for k in settings if state["settings"].get(k) != settings[k])
            changed = [WHAT_CHANGED.get(k, k) for k in diff]
            raise UserError(f"--resume with other settings than the interrupted run: {', '.join(changed)}",
                            "Resume with the same flags, input and model, or delete the .partial files to start over.")
    else:
        if progress.partial.exists() or progress.record.exists():
            raise UserError(f"{progress.partial} holds an interrupted prediction",
                            "Pass --resume to continue it, or delete it (and its .partial.json) to start over.")
        if output.exists() and not overwrite:
            raise UserError(f"--output {output} already exists", "Pass --overwrite to replace it, or choose another file.")
        output.parent.mkdir(parents=True, exist_ok=True)


def open_input(clf: Classifier, input_path: str, fmt: str, chunk_rows: int, text_column: str | None,
               id_column: str | None, done: int) -> tuple[Iterator[dict], str, str | None]:
    """(the records after the `done` already predicted, the text column, the id column or None)."""
    records = read_records(input_path, fmt, chunk_rows)
    first = next(records, None)
    if first is None:
        raise UserError(f"input {input_path} has no rows")
    columns = list(first)
    text_col = pick(columns, text_column, ("question", *TEXT_COLUMNS) if clf.task.name == "multiple_choice"
                    else TEXT_COLUMNS, "text", True)
    id_col = pick(columns, id_column, ID_COLUMNS, "id", False)
    return _skip(_prepend(first, records), done), text_col, id_col


def write_partial(progress: Progress, records: Iterator[dict], chunk_rows: int,
                  classify: Callable[[list[dict]], tuple[bytes, int]], settings: dict, done: int,
                  resume_at: int | None) -> tuple[int, int, int, float]:
    """Classify and append chunk after chunk, each made final on disk (fsync) before the record says so.
    `resume_at`: the partial file's final bytes (a chunk torn by the interruption is cut off); None: a new file.
    Returns (rows done, rows done now, rows without text, seconds)."""
    with open(progress.partial, "xb" if resume_at is None else "r+b") as out:
        if resume_at is not None:
            out.truncate(resume_at)
            out.seek(resume_at)
        else:
            progress.commit(0, 0, settings)
        bar = _bar(done)
        t0, n_new, no_text = time.perf_counter(), 0, 0
        for chunk in chunks(records, chunk_rows):
            lines, n_bad = classify(chunk)
            out.write(lines)
            out.flush()
            os.fsync(out.fileno())
            done, n_new, no_text = done + len(chunk), n_new + len(chunk), no_text + n_bad
            progress.commit(done, out.tell(), settings)
            if bar is not None:
                bar.update(len(chunk))
        if bar is not None:
            bar.close()
    return done, n_new, no_text, time.perf_counter() - t0


def _bar(done: int):
    from qwen_ft.inference.engine import stderr_is_terminal

    if not stderr_is_terminal():
        return None
    from tqdm.auto import tqdm

    return tqdm(initial=done, unit="row", dynamic_ncols=True, mininterval=0.5, desc="predict")
