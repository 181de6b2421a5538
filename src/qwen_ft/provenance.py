"""Where a run came from: package versions, the platform and the source commit, and the SHA-256 of the data
files and base-model weights it read, recorded in run.json."""

from __future__ import annotations

import functools
import hashlib
import logging
import platform
import re
import subprocess
from pathlib import Path

from qwen_ft.outputs import WRITER

CHUNK = 1 << 20  # read 1 MiB at a time: a multi-GB file never sits in memory whole
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.gguf")
# Past this many bytes of weights in all, each weight file is fingerprinted by its size and the SHA-256 of its
# first and last MiB instead of its whole content: SHA-256 runs at ~1.6 GB/s on one core here (AMD EPYC), so
# 8 GiB (Qwen3-4B in bf16) costs ~5 s at a training start, and a 70B model's 140 GB would cost 90 s or more.
FULL_HASH_LIMIT = 8 << 30
FULL = "sha256 of each whole file"
QUICK = f"sha256 of each file's size, first MiB and last MiB (weights over {FULL_HASH_LIMIT >> 30} GiB in all)"
_SNAPSHOT = re.compile(r"/snapshots/([0-9a-f]{40})(?:/|$)")


def env_info() -> dict:
    import importlib.metadata as md

    versions = {}
    for pkg in ("qwen-ft", "torch", "transformers", "peft", "accelerate", "datasets", "pytorch_optimizer"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    return {"written_by": WRITER, "versions": versions, "python": platform.python_version(), "git_commit": git_commit(),
            "platform": platform.platform()}


def git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def file_sha256(path: str | Path, quick: bool = False) -> str:
    """The SHA-256 of a file's content, streamed; `quick`: of its size, first MiB and last MiB. Within a
    process a file is hashed once while its size and modification time stay the same (a study's trials)."""
    path = Path(path).resolve()
    st = path.stat()
    return _sha256(str(path), st.st_size, st.st_mtime_ns, quick)


@functools.lru_cache(maxsize=256)
def _sha256(path: str, size: int, mtime_ns: int, quick: bool) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if quick:
            digest.update(str(size).encode() + b"\0" + f.read(CHUNK))
            f.seek(max(size - CHUNK, 0))
            digest.update(f.read(CHUNK))
        else:
            while chunk := f.read(CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def file_record(path: str | Path, quick: bool = False) -> dict:
    """{"path", "bytes", "sha256"} of a file (`quick`: "sha256_size_first_last_mib" in place of "sha256")."""
    path = Path(path).expanduser().absolute()  # not resolved: a hub snapshot's file links to a nameless blob
    return {"path": str(path), "bytes": path.stat().st_size,
            ("sha256_size_first_last_mib" if quick else "sha256"): file_sha256(path, quick)}


def data_records(files: dict[str, Path | str | None]) -> dict[str, dict]:
    """run.json's "data_files": each flag's file (a hub data set: {"hub": id}, no digest), always hashed whole
    (it was just read whole, parsed, which costs far more than hashing)."""
    out = {}
    for flag, source in files.items():
        if source is None:
            continue
        path = Path(source).expanduser()
        out[flag] = file_record(path) if path.is_file() else {"hub": str(source), "sha256": None}
    return out


def weight_files(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    return sorted({p for pattern in WEIGHT_PATTERNS for p in folder.glob(pattern) if p.is_file()})


def model_record(source: str, folder: str | Path | None, extra: tuple[Path, ...] = ()) -> dict:
    """run.json's "base_model_files": the base's weight files in `folder` (and `extra`, e.g. the GGUF the
    embedded model was converted from), hashed whole up to FULL_HASH_LIMIT bytes in all, and the hub revision
    (the commit of the hub cache's snapshot folder) when the model came from a hub."""
    if folder is None:  # a hub id not found in the local hub cache
        folder = hub_snapshot(source)
    files = sorted({*(weight_files(folder) if folder else ()), *(Path(p) for p in extra)})
    quick = sum(p.stat().st_size for p in files) > FULL_HASH_LIMIT
    return {"revision": hub_revision(folder), "hashing": QUICK if quick else FULL,
            "files": [file_record(p, quick) for p in files]}


def hub_revision(folder: str | Path | None) -> str | None:
    """The commit hash of a hub cache snapshot folder (.../snapshots/<commit>/), as transformers reads it."""
    for text in (Path(folder).as_posix(), Path(folder).resolve().as_posix()) if folder else ():
        if match := _SNAPSHOT.search(text + "/"):
            return match.group(1)
    return None


def hub_snapshot(repo_id: str) -> Path | None:
    """The local hub cache's snapshot folder of `repo_id` (where its weights were downloaded), or None."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # an id the hub client refuses, a cache it cannot read: no revision, no digests
        return None
    return Path(found).parent if isinstance(found, str) else None


def data_changes(records: dict | None, flags: tuple[str, ...] = ("--data", "--validation-data")) -> list[tuple]:
    """(log level, line) pairs: a warning for each recorded data file (run.json's "input_files") whose content
    differs now, a note for what cannot be checked (a file moved away; a run recorded before digests were)."""
    if records is None:
        return [(logging.INFO, "run.json records no data digests (a run trained before they were recorded): the "
                               "data files are not checked")]
    out = []
    for flag in flags:
        rec = records.get(flag) or {}
        if not rec.get("sha256"):  # no such flag, or a hub data set
            continue
        path = Path(rec["path"])
        if not path.is_file():
            out.append((logging.INFO, f"{flag} {path} is not there any more: its digest is not checked"))
        elif (now := file_sha256(path)) != rec["sha256"]:
            out.append((logging.WARNING, f"the data file {path} ({flag}) has changed since training (SHA-256 "
                        f"{now[:12]}, trained on {rec['sha256'][:12]}): the split scored is the one stored at "
                        "training, not rows of the file as it is now"))
    return out
