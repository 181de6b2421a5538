"""Phase completion markers: `phase.json` in each phase's output folder, written last and atomically.

A marker holds the hash of the config that produced the folder. A phase is skipped when its marker's
hash equals the hash of the current config (which includes the hashes of the phases it reads from), so
changing, say, the data section reruns data and everything after it, and nothing else. Markers are read
back through study/load.py, the one reader of a study folder.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from qwen_ft.outputs import write_json
from qwen_ft.study.load import MARKER, read_marker


def digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def matches(folder: Path, config_hash: str) -> bool:
    marker = read_marker(folder)
    return marker is not None and marker.get("config_hash") == config_hash


def write(folder: Path, phase: str, config_hash: str, seconds: float, **info: Any) -> dict:
    marker = {"phase": phase, "config_hash": config_hash, "seconds": round(seconds, 2),
              "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), **info}
    write_json(Path(folder) / MARKER, marker)
    return marker


def clear(folder: Path) -> None:
    (Path(folder) / MARKER).unlink(missing_ok=True)
