"""Where a run came from: package versions, the platform and the source commit, recorded in run.json."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path

from qwen_ft.outputs import WRITER


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
