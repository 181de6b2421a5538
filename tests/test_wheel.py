"""The built wheel works outside the checkout: console script, bundled demo data and packaged configs.

The wheel is built from a copy of the sources (`python -m build --wheel --no-isolation`: the venv's own
setuptools, so no package index is needed) and installed with `pip install --no-deps --no-index` into a
fresh virtual environment. That environment reuses the dependencies installed in this one (torch,
transformers, ...) through a `.pth` file listing this environment's site-packages: `--system-site-packages`
would expose the base interpreter's packages, not this venv's. Paths in a `.pth` file are appended
without processing the `.pth` files they hold, so the checkout's editable install stays invisible; the
test checks that `qwen_ft` is imported from the new environment. Every command runs from an empty
temporary folder, with no PYTHONPATH.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def sh(cmd: list, cwd: Path, env: dict, timeout: int = 600) -> str:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    pytest.importorskip("build", reason="the wheel is built with `build` (pip install -e '.[dev]')")
    src = tmp_path_factory.mktemp("sdist-tree")
    shutil.copy2(REPO / "pyproject.toml", src)
    shutil.copy2(REPO / "README.md", src)
    shutil.copytree(REPO / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    out = tmp_path_factory.mktemp("dist")
    sh([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", out, src], src, dict(os.environ))
    (whl,) = out.glob("qwen_ft-*.whl")
    return whl


def test_wheel_ships_the_demo_data_configs_and_console_script(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for shipped in ("qwen_ft/data/demo_category.jsonl", "qwen_ft/data/demo_mc.jsonl", "qwen_ft/configs/demo.yaml"):
        assert shipped in names
    entry = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "qwen-ft = qwen_ft.cli:run" in zipfile.ZipFile(wheel).read(entry).decode()
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)


def test_installed_wheel_trains_and_runs_the_packaged_study_from_another_folder(wheel, tiny_qwen3, tmp_path):
    venv = tmp_path / "venv"
    sh([sys.executable, "-m", "venv", venv], tmp_path, dict(os.environ))
    py, cli = venv / "bin" / "python", venv / "bin" / "qwen-ft"
    site = Path(sh([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path,
                   dict(os.environ)).strip())
    (site / "_outer_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", QWEN_FT_CACHE=str(tmp_path / "cache"))
    sh([py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel], tmp_path, env)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = sh([py, "-c", "import qwen_ft; print(qwen_ft.__file__)"], elsewhere, env).strip()
    assert Path(where).is_relative_to(venv), where  # the wheel's copy, not the checkout's

    version = re.search(r'^version = "(.+)"', (REPO / "pyproject.toml").read_text(), re.M).group(1)
    assert sh([cli, "--version"], elsewhere, env).strip() == f"qwen-ft {version}"

    sh([cli, "train", "--model", tiny_qwen3, "--data", "demo", "--max-samples-per-category", "3", "--epochs", "1",
        "--batch-size", "8", "--precision", "fp32", "--max-length", "256", "--output-dir", "run"], elsewhere, env)
    run = elsewhere / "run"
    assert (run / "COMPLETE").is_file() and (run / "adapter_model.safetensors").is_file()
    assert len((run / "split" / "train.jsonl").read_text().splitlines()) > 0

    out = sh([cli, "study", "--config", "demo", "--output-dir", "study", "--phases", "data"], elsewhere, env)
    assert "data: task multiple_choice" in out
    for name in ("train", "tune", "validation"):
        assert (elsewhere / "study" / "data" / f"{name}.jsonl").read_text().strip()
