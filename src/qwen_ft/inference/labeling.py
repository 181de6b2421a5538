"""Labeling a file with a trained classifier (`qwen-ft predict`): checks, the classifier, then chunk after chunk
into the resumable partial file (`batch_files`), converted to the output's format at the end."""

from __future__ import annotations

import functools
import io
import json
import logging
from pathlib import Path

from qwen_ft.errors import UserError
from qwen_ft.inference.batch_files import (
    Progress,
    check_start,
    convert,
    file_format,
    id_text,
    identity,
    open_input,
    output_columns,
    to_row,
    write_partial,
)
from qwen_ft.inference.engine import Classifier

log = logging.getLogger(__name__)


def label_file(model_path: str, input_path: str, output_path: str, *, top: int = 1, resume: bool = False,
               batch_size: int = 32, chunk_rows: int = 1024, id_column: str | None = None,
               text_column: str | None = None, decode: str = "auto", normalize: str = "auto",
               input_format: str | None = None, overwrite: bool = False, base_model: str | None = None,
               precision: str = "auto", trust_remote_code: bool = False, min_confidence: float | None = None,
               fallback_label: str | None = None, adapter_scale: float = 1.0) -> dict:
    """Label `input_path` into `output_path` (resumable: see `batch_files`); returns the summary."""
    if top < 1 or batch_size < 1 or chunk_rows < 1:
        raise UserError(f"--top, --batch-size and --chunk-rows must be >= 1 (got {top}, {batch_size}, {chunk_rows})")
    in_fmt, out_fmt, output = _check_paths(input_path, output_path, input_format)
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
    check_start(progress, state, settings, output, resume, overwrite)
    clf = Classifier.load(model_path, base_model=base_model, precision=precision, trust_remote_code=trust_remote_code,
                          adapter_scale=adapter_scale)
    abstain = clf.abstention(min_confidence, fallback_label, decode, normalize)
    if abstain is not None:
        log.info("abstaining below probability %.6g (%s): answering %r", abstain.threshold, abstain.source,
                 abstain.fallback)
    done = state["rows"] if resume else 0
    records, text_col, id_col = open_input(clf, input_path, in_fmt, chunk_rows, text_column, id_column, done)
    classify = functools.partial(predict_chunk, clf, text_col=text_col, id_col=id_col, top=top,
                                 batch_size=batch_size, decode=decode, normalize=normalize, abstain=abstain)
    done, n_new, no_text, seconds = write_partial(progress, records, chunk_rows, classify, settings, done,
                                                  state["bytes"] if resume else None)
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


def _check_paths(input_path: str, output_path: str, input_format: str | None) -> tuple[str, str, Path]:
    """(input format, output format, output path), the input there and not the output."""
    in_fmt = file_format(input_path, input_format, "input")
    output = Path(output_path)
    out_fmt = file_format(output_path, None, "output")
    if input_path != "-" and not Path(input_path).is_file():
        raise UserError(f"input file not found: {input_path}")
    if input_path != "-" and output.exists() and output.resolve() == Path(input_path).resolve():
        raise UserError("--output is the --input file", "Write the predictions to another file.")
    return in_fmt, out_fmt, output


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
