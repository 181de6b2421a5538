"""Read raw records from a hub id, a local file, or the bundled demo sets.

Local files are read with pandas (fast, no cache folder); hub ids with `datasets`.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterable, Iterator
from importlib import resources
from pathlib import Path

from qwen_ft.errors import UserError

DEMOS = {"demo": "demo_category.jsonl", "demo-mc": "demo_mc.jsonl"}
FORMATS = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}


def demo_path(name: str) -> Path:
    return Path(str(resources.files("qwen_ft.data").joinpath(DEMOS[name])))


def describe(source: str) -> str:
    return f"bundled demo '{source}'" if source in DEMOS else source


def iter_jsonl(lines: Iterable[str], path) -> Iterator[dict]:
    """The objects of a .jsonl stream, one per non-blank line; a line that is not a JSON object, or cannot be
    read at all (not UTF-8, nested past Python's recursion limit, an integer past its digit limit), is one
    clear error naming it. Shared by the loaders and `qwen-ft predict` (which streams, never loading the file)."""
    it, n = iter(lines), 0
    while True:
        n += 1
        try:
            line = next(it)
        except StopIteration:
            return
        except UnicodeDecodeError as e:
            raise UserError(f"{path} line {n} is not UTF-8 text ({e.reason} at byte {e.start})",
                            "Save the file as UTF-8 (a UTF-8 byte-order mark is fine).") from None
        if isinstance(line, bytes):  # read as bytes, so that a decoding error names its line
            try:
                line = line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{path} line {n} is not UTF-8 text ({e.reason} at byte {e.start} of the line)",
                                "Save the file as UTF-8 (a UTF-8 byte-order mark is fine).") from None
        line = line.lstrip("\ufeff")  # files joined with `cat` carry a byte-order mark mid-file too
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except RecursionError:
            raise UserError(f"{path} line {n} is nested too deeply to read", "Flatten the record.") from None
        except ValueError as e:  # JSONDecodeError, and int() past sys.get_int_max_str_digits()
            raise UserError(f"{path} line {n} is not valid JSON: {getattr(e, 'msg', None) or str(e)[:200]}") from None
        if not isinstance(rec, dict):
            raise UserError(f"{path} line {n} is not a JSON object")
        yield rec


def is_hub(source: str | None) -> bool:
    """True when `source` names a hub data set (it would be downloaded), not a local file or demo."""
    if not source or source in DEMOS or Path(source).expanduser().exists():
        return False
    looks_local = source.startswith((".", "/", "~")) or Path(source).suffix.lower() in FORMATS
    return not looks_local and source.count("/") == 1


def read_records(source: str, hub_split: str | None = None) -> list[dict]:
    """Raw records (list of dicts) from `source`; a clear UserError for anything unreadable."""
    if source in DEMOS:
        return _read_file(demo_path(source))
    path = Path(source).expanduser()
    if path.exists():
        if path.is_dir():
            raise UserError(f"data source {source} is a folder; pass a .jsonl, .json, .csv or .parquet file")
        check_regular_file(path, "data source")
        return _read_file(path)
    looks_local = source.startswith((".", "/", "~")) or Path(source).suffix.lower() in FORMATS
    if looks_local or source.count("/") != 1:
        raise UserError(f"data file not found: {source}",
                        "Pass an existing .jsonl/.json/.csv/.parquet file, a hub id like TIGER-Lab/MMLU-Pro, "
                        "or 'demo' / 'demo-mc' for the bundled sets.")
    repo, _, split = source.partition(":")  # "owner/name:validation" reads that split of a hub data set
    return _read_hub(repo, split or hub_split)


def check_regular_file(path: Path, what: str = "file") -> None:
    """Only regular files are read: a FIFO, a device or a socket could block forever or never end."""
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        kind = ("a named pipe (FIFO)" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or
                stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
        raise UserError(f"{what} {path} is {kind}; qwen-ft reads data only from regular files",
                        "Save the data to a .jsonl/.json/.csv/.parquet file and pass that file.")


BOMS = {b"\xff\xfe": "UTF-16", b"\xfe\xff": "UTF-16", b"\xff\xfe\x00\x00": "UTF-32"}


def _encoding_problem(path: Path) -> str | None:
    with open(path, "rb") as f:
        head = f.read(4)
    for bom, name in sorted(BOMS.items(), key=lambda kv: -len(kv[0])):
        if head.startswith(bom):
            return f"{path} is encoded as {name}, not UTF-8"
    return None


def _read_file(path: Path) -> list[dict]:
    import pandas as pd

    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise UserError(f"unknown data format '{path.suffix or '(no suffix)'}' for {path}",
                        f"Use one of: {', '.join(FORMATS)}.")
    if fmt != "parquet" and (problem := _encoding_problem(path)):
        raise UserError(problem, "Save the file as UTF-8 (a UTF-8 byte-order mark is fine).")
    try:
        if fmt == "jsonl":
            with open(path, encoding="utf-8-sig") as f:  # -sig: a UTF-8 byte-order mark is not part of line 1
                return list(iter_jsonl(f, path))
        if fmt == "json":
            data = json.loads(path.read_text(encoding="utf-8-sig"))
            if isinstance(data, dict):  # {"data": [...]} or column-oriented
                data = data.get("data", data.get("rows", data))
            if isinstance(data, dict):
                data = pd.DataFrame(data).to_dict("records")
            if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
                raise UserError(f"{path} must hold a list of objects (or use .jsonl, one object per line)")
            return data
        frame = pd.read_csv(path, encoding="utf-8-sig") if fmt == "csv" else pd.read_parquet(path)
    except UserError:
        raise
    except (OSError, UnicodeDecodeError, ValueError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path} as {fmt}: {e}") from None
    except Exception as e:  # pandas/pyarrow parser errors have many types
        raise UserError(f"cannot read {path} as {fmt}: {type(e).__name__}: {e}") from None
    return frame.to_dict("records")


def _read_hub(repo_id: str, split: str | None) -> list[dict]:
    try:
        import datasets

        if split is None:
            names = datasets.get_dataset_split_names(repo_id)
            split = "train" if "train" in names else names[0]
        ds = datasets.load_dataset(repo_id, split=split)
    except Exception as e:
        raise UserError(f"could not load hub data set '{repo_id}' (split {split}): {type(e).__name__}: {e}",
                        "Offline? Download it once, or pass a local .jsonl/.csv/.parquet file to --data.") from None
    return ds.to_list()
