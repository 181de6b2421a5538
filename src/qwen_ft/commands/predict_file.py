"""`qwen-ft predict`: label a file (jsonl / csv / parquet, or jsonl on stdin) with a trained classifier.

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
import io
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

from qwen_ft.data.sources import iter_jsonl
from qwen_ft.engine import Classifier, stderr_is_terminal
from qwen_ft.errors import UserError
from qwen_ft.runs import atomic_write_text
from qwen_ft.tasks.base import clean_text
from qwen_ft.tasks.category import TEXT_COLUMNS

log = logging.getLogger(__name__)

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


# ----------------------------------------------------------------------------- the command

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


def run_predict_file(model_path: str, input_path: str, output_path: str, top: int = 1, resume: bool = False,
                     batch_size: int = 32, chunk_rows: int = 1024, id_column: str | None = None,
                     text_column: str | None = None, decode: str = "auto", normalize: str = "auto",
                     input_format: str | None = None, overwrite: bool = False, base_model: str | None = None,
                     precision: str = "auto", trust_remote_code: bool = False, min_confidence: float | None = None,
                     fallback_label: str | None = None, adapter_scale: float = 1.0) -> dict:
    if top < 1 or batch_size < 1 or chunk_rows < 1:
        raise UserError(f"--top, --batch-size and --chunk-rows must be >= 1 (got {top}, {batch_size}, {chunk_rows})")
    in_fmt = file_format(input_path, input_format, "input")
    output = Path(output_path)
    out_fmt = file_format(output_path, None, "output")
    if input_path != "-" and not Path(input_path).is_file():
        raise UserError(f"input file not found: {input_path}")
    if input_path != "-" and output.exists() and output.resolve() == Path(input_path).resolve():
        raise UserError("--output is the --input file", "Write the predictions to another file.")
    progress = Progress(output)
    state = progress.read()
    settings = {"model_path": str(Path(model_path).resolve()), "input": input_path if input_path == "-" else
                str(Path(input_path).resolve()), "top": top, "batch_size": batch_size, "chunk_rows": chunk_rows,
                "id_column": id_column, "text_column": text_column, "decode": decode, "normalize": normalize,
                "base_model": base_model, "precision": precision,
                **({"min_confidence": min_confidence, "fallback_label": fallback_label}
                   if min_confidence is not None or fallback_label is not None else {}),
                **({"adapter_scale": adapter_scale} if adapter_scale != 1.0 else {})}
    settings.update(identity(input_path, Path(model_path)))
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
    clf = Classifier.load(model_path, base_model=base_model, precision=precision, trust_remote_code=trust_remote_code,
                          adapter_scale=adapter_scale)
    abstain = clf.abstention(min_confidence, fallback_label, decode, normalize)
    if abstain is not None:
        log.info("abstaining below probability %.6g (%s): answering %r", abstain.threshold, abstain.source,
                 abstain.fallback)
    done = state["rows"] if resume else 0
    records = read_records(input_path, in_fmt, chunk_rows)
    first = next(records, None)
    if first is None:
        raise UserError(f"input {input_path} has no rows")
    columns = list(first)
    text_col = pick(columns, text_column, ("question", *TEXT_COLUMNS) if clf.task.name == "multiple_choice"
                    else TEXT_COLUMNS, "text", True)
    id_col = pick(columns, id_column, ID_COLUMNS, "id", False)
    records = _skip(_prepend(first, records), done)

    mode = "r+b" if resume else "xb"
    with open(progress.partial, mode) as out:
        if resume:
            out.truncate(state["bytes"])  # a chunk torn by the interruption is cut off
            out.seek(state["bytes"])
        else:
            progress.commit(0, 0, settings)
        bar = _bar(done)
        t0, n_new, no_text = time.perf_counter(), 0, 0
        for chunk in chunks(records, chunk_rows):
            lines, n_bad = predict_chunk(clf, chunk, text_col, id_col, top, batch_size, decode, normalize, abstain)
            out.write(lines)
            out.flush()
            os.fsync(out.fileno())
            done, n_new, no_text = done + len(chunk), n_new + len(chunk), no_text + n_bad
            progress.commit(done, out.tell(), settings)
            if bar is not None:
                bar.update(len(chunk))
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t0
    convert(progress.partial, output, out_fmt, chunk_rows, output_columns(id_col is not None, top, abstain is not None))
    progress.record.unlink(missing_ok=True)
    summary = {"rows": done, "new_rows": n_new, "rows_without_text": no_text, "seconds": round(seconds, 3),
               "rows_per_s": round(n_new / seconds, 1) if seconds > 0 else None, "output": str(output),
               "peak_rss_mb": peak_rss_mb()}
    if no_text:
        log.warning("%d rows had no usable text (label left empty)", no_text)
    log.info("predicted %d rows (%d now) in %.1f s: %s rows/s; peak RSS %.0f MB; wrote %s", done, n_new, seconds,
             summary["rows_per_s"], summary["peak_rss_mb"], output)
    return summary


def predict_chunk(clf: Classifier, chunk: list[dict], text_col: str, id_col: str | None, top: int,
                  batch_size: int, decode: str, normalize: str, abstain=None) -> tuple[bytes, int]:
    rows = [to_row(clf, rec, text_col) for rec in chunk]
    usable = [i for i, r in enumerate(rows) if r is not None]
    results, _ = clf.classify([rows[i] for i in usable], decode=decode, normalize=normalize, top_k=top,
                              batch_size=batch_size)
    if abstain is not None:
        results = [abstain.apply(r) for r in results]
    by_row = dict(zip(usable, results))
    buf = io.StringIO()
    for i, rec in enumerate(chunk):
        out = {"id": id_text(rec.get(id_col))} if id_col else {}
        res = by_row.get(i)
        if res is None:
            out.update({"label": None, "probability": None, "raw_probability": None, "error": "no text"})
        else:  # probability: calibrated when the run has a calibration.json for this scoring
            out.update({"label": res["pred"], "probability": res["probability"],
                        "raw_probability": res["raw_probability"]})
            if abstain is not None:
                out.update({"abstained": res["abstained"], "model_label": res.get("model_label", res["pred"])})
        if top > 1:
            out["top"] = res["top"] if res is not None else []
        buf.write(json.dumps(out, ensure_ascii=False) + "\n")
    return buf.getvalue().encode("utf-8"), len(chunk) - len(usable)


def peak_rss_mb() -> float:
    """This process's peak resident memory. Linux VmHWM, because getrusage's ru_maxrss survives exec: a
    process started by a large one (a test runner, a notebook) reports its parent's size."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    from qwen_ft.distributed import peak_memory

    return peak_memory()["peak_rss_mb"]


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


def _bar(done: int):
    if not stderr_is_terminal():
        return None
    from tqdm.auto import tqdm

    return tqdm(initial=done, unit="row", dynamic_ncols=True, mininterval=0.5, desc="predict")


def add_abstention_flags(p) -> None:
    """--min-confidence, --fallback-label and --adapter-scale: the same for predict, test and serve."""
    p.add_argument("--min-confidence", type=float, default=None, metavar="P",
                   help="Answer --fallback-label (abstained: true) when the label's probability is below P "
                        "(default: the run's threshold.json, from `validate --fit-threshold`, if any).")
    p.add_argument("--fallback-label", default=None,
                   help="The answer when abstaining (default: the run's catch-all label, e.g. 'other', else 'abstain').")
    p.add_argument("--adapter-scale", type=float, default=1.0,
                   help="Multiply the adapter's update by this (0: the base model, 1: the trained run).")


def add_parser(sub, name: str) -> None:
    p = sub.add_parser(name, help="Label a jsonl/csv/parquet file (streamed; resumable) with a trained run.")
    p.add_argument("--model-path", required=True, help="Run folder written by `qwen-ft train` (or `qwen-ft merge`).")
    p.add_argument("--input", required=True, help="Input .jsonl/.csv/.parquet file, or - for JSON lines on stdin.")
    p.add_argument("--output", required=True, help="Output file; its suffix (.jsonl/.csv/.parquet) sets the format.")
    p.add_argument("--top", type=int, default=1, help="Also write the K most probable labels per row (K > 1).")
    p.add_argument("--resume", action="store_true", help="Continue an interrupted run from OUTPUT.partial.")
    p.add_argument("--overwrite", action="store_true", help="Replace an existing --output.")
    p.add_argument("--batch-size", type=int, default=32, help="Rows per forward pass.")
    p.add_argument("--chunk-rows", type=int, default=1024, help="Rows read, classified and saved at a time.")
    p.add_argument("--id-column", default=None, help=f"Column copied to the output (default: {', '.join(ID_COLUMNS)}).")
    p.add_argument("--text-column", default=None, help="Column holding the text (default: question/text/...).")
    p.add_argument("--input-format", default=None, choices=("jsonl", "csv", "parquet"),
                   help="Format of --input when its suffix does not say (stdin: jsonl).")
    p.add_argument("--decode", default="auto", choices=("auto", "constrained", "exact"),
                   help="auto (default): constrained where answers end with an end token, else exact; constrained "
                        "(fast; probability of the first answer token); exact (each label's full probability).")
    p.add_argument("--normalize", default="auto", choices=("auto", "none", "token", "char"),
                   help="With --decode exact (auto: per character for plain prompts, else none).")
    p.add_argument("--base-model", default=None)
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    p.add_argument("--trust-remote-code", action="store_true", help="Allow the model's own code (see validate).")
    add_abstention_flags(p)
    p.set_defaults(func=lambda a: run_predict_file(
        a.model_path, a.input, a.output, a.top, a.resume, a.batch_size, a.chunk_rows, a.id_column, a.text_column,
        a.decode, a.normalize, a.input_format, a.overwrite, a.base_model, a.precision, a.trust_remote_code,
        a.min_confidence, a.fallback_label, a.adapter_scale))
