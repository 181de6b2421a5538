"""validate --data, test and predict (files in, files out, streamed, resumable) with tiny trained runs."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest

from qwen_ft.cli import main
from qwen_ft.runs import RunDir
from tests.conftest import REPO, copy_run

WORDS = "cell gene force energy contract law market price atom proof theorem river king war poem court tax".split()


def write_texts(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            text = " ".join(rng.choices(WORDS, k=rng.randint(3, 12))) + "?"
            f.write(json.dumps({"id": f"r{i}", "text": text}) + "\n")


def predict_cmd(run: Path, inp: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "qwen_ft", "predict", "--model-path", str(run), "--input", str(inp),
            "--output", str(out), "--precision", "fp32", *extra]


def env() -> dict:
    return {**os.environ, "QWEN_FT_THREADS": "1", "PYTHONPATH": str(REPO / "src") + os.pathsep + str(REPO)}


def labeled_rows(run: Path) -> list[dict]:
    return RunDir(run).split("test") + RunDir(run).split("validation")


@pytest.fixture(scope="module")
def mc_run(tiny_qwen3, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mc") / "run"
    assert main(["train", "--model", str(tiny_qwen3), "--data", "demo-mc", "--max-samples", "24", "--epochs", "1",
                 "--batch-size", "8", "--precision", "fp32", "--output-dir", str(out)]) == 0
    return out


def test_validate_data_equals_predict_compared_by_hand(tiny_run, tmp_path):
    rows = labeled_rows(tiny_run)
    data = tmp_path / "held_out.csv"
    pd.DataFrame({"uid": [r["id"] for r in rows], "body": [r["question"] for r in rows],
                  "topic": [r["label"] for r in rows]}).to_csv(data, index=False)
    assert main(["validate", "--model-path", str(tiny_run), "--data", str(data), "--text-column", "body",
                 "--label-column", "topic", "--batch-size", "8", "--precision", "fp32",
                 "--output-dir", str(tmp_path / "eval")]) == 0
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    out = tmp_path / "pred.jsonl"
    assert main(["predict", "--model-path", str(tiny_run), "--input", str(data), "--output", str(out),
                 "--text-column", "body", "--id-column", "uid", "--batch-size", "8", "--precision", "fp32"]) == 0
    preds = [json.loads(x) for x in out.read_text().splitlines()]
    assert [p["id"] for p in preds] == [r["id"] for r in rows]
    by_hand = sum(p["label"] == r["label"] for p, r in zip(preds, rows)) / len(rows)
    assert report["accuracy"] == by_hand and report["n"] == len(rows)
    validated = [json.loads(x) for x in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert [v["pred"] for v in validated] == [p["label"] for p in preds]
    assert report["data"] == str(data) and report["skipped_unknown_labels"] == {}
    print(f"held-out rows {len(rows)}: validate accuracy {report['accuracy']:.4f}, predict by hand {by_hand:.4f}")


def test_unknown_labels_are_listed_or_skipped(tiny_run, tmp_path, capsys):
    rows = labeled_rows(tiny_run)[:6]
    extra = [{"question": "Stars and fate?", "label": "astrology"}] * 2 + [{"question": "Bake?", "label": "cooking"}]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": r["question"], "label": r["label"]}) + "\n" for r in rows + extra))
    assert main(["validate", "--model-path", str(tiny_run), "--data", str(data), "--precision", "fp32",
                 "--output-dir", str(tmp_path / "e1")]) == 2
    err = capsys.readouterr().err
    assert "3 of 9 rows have labels this run does not know: 'astrology' (2), 'cooking' (1)" in err
    assert "--skip-unknown-labels" in err and not (tmp_path / "e1").exists()
    assert main(["validate", "--model-path", str(tiny_run), "--data", str(data), "--precision", "fp32",
                 "--skip-unknown-labels", "--output-dir", str(tmp_path / "e2")]) == 0
    report = json.loads((tmp_path / "e2" / "eval.json").read_text())
    assert report["n"] == 6 and report["skipped_unknown_labels"] == {"astrology": 2, "cooking": 1}


def test_multiple_choice_refuses_more_choices_than_the_run_has(mc_run, tmp_path, capsys):
    letters = json.loads((mc_run / "label_mapping.json").read_text())["labels"]
    eight = json.dumps({"question": "Pick one.", "choices": [f"c{i}" for i in range(8)]})
    assert main(["test", "--model-path", str(mc_run), "--precision", "fp32", eight]) == 2
    err = capsys.readouterr().err
    assert f"answers 2 to {len(letters)} choices" in err and "1 row(s) with 8 choices" in err
    ok = json.dumps({"question": "Pick one.", "choices": ["yes", "no"]})
    assert main(["test", "--model-path", str(mc_run), "--precision", "fp32", ok]) == 0
    assert "(p=" in capsys.readouterr().out
    data = tmp_path / "mc.jsonl"
    data.write_text(json.dumps({"question": "q", "options": [f"c{i}" for i in range(8)], "answer": "A"}) + "\n")
    assert main(["validate", "--model-path", str(mc_run), "--data", str(data), "--precision", "fp32",
                 "--output-dir", str(tmp_path / "e")]) == 2
    assert "1 row(s) with 8 choices" in capsys.readouterr().err


def test_predict_formats_ids_and_top_k(tiny_run, tmp_path):
    src = tmp_path / "in.jsonl"
    write_texts(src, 40)
    frame = pd.read_json(src, lines=True)
    frame.to_csv(tmp_path / "in.csv", index=False)
    frame.to_parquet(tmp_path / "in.parquet")
    outs = {}
    for name in ("in.jsonl", "in.csv", "in.parquet"):
        out = tmp_path / f"out-{name}.jsonl"
        assert main(["predict", "--model-path", str(tiny_run), "--input", str(tmp_path / name), "--output", str(out),
                     "--top", "3", "--precision", "fp32", "--chunk-rows", "16"]) == 0
        outs[name] = out.read_bytes()
    assert outs["in.jsonl"] == outs["in.csv"] == outs["in.parquet"]
    preds = [json.loads(x) for x in outs["in.jsonl"].decode().splitlines()]
    labels = json.loads((tiny_run / "label_mapping.json").read_text())["labels"]
    assert [p["id"] for p in preds] == list(frame["id"])
    assert all(p["label"] in labels and len(p["top"]) == 3 and p["top"][0] == [p["label"], p["probability"]]
               for p in preds)
    for fmt in ("csv", "parquet"):
        out = tmp_path / f"out.{fmt}"
        assert main(["predict", "--model-path", str(tiny_run), "--input", str(src), "--output", str(out), "--top", "3",
                     "--precision", "fp32", "--chunk-rows", "16"]) == 0
        table = pd.read_csv(out, dtype=str) if fmt == "csv" else pd.read_parquet(out)
        assert list(table["id"]) == [p["id"] for p in preds] and list(table["label"]) == [p["label"] for p in preds]
        assert [float(x) for x in table["probability"]] == [p["probability"] for p in preds]
    assert not list(tmp_path.glob("*.partial*")) and not list(tmp_path.glob(".*tmp*"))


def test_predict_never_overwrites_and_resume_checks_its_settings(tiny_run, tmp_path, capsys):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_texts(src, 5)
    out.write_text("mine\n")
    base = ["predict", "--model-path", str(tiny_run), "--input", str(src), "--output", str(out), "--precision", "fp32"]
    assert main(base) == 2 and "already exists" in capsys.readouterr().err
    assert out.read_text() == "mine\n"
    assert main([*base, "--resume"]) == 2 and "no interrupted prediction" in capsys.readouterr().err
    partial = tmp_path / "out.jsonl.partial"
    partial.write_text("")
    (tmp_path / "out.jsonl.partial.json").write_text(json.dumps({"rows": 0, "bytes": 0, "settings": {}}))
    out.unlink()
    assert main(base) == 2 and "Pass --resume to continue it" in capsys.readouterr().err
    assert main([*base, "--resume"]) == 2 and "other settings than the interrupted run" in capsys.readouterr().err
    assert main(["predict", "--model-path", str(tiny_run), "--input", str(src), "--output", str(tmp_path / "o.txt")]) == 2
    assert "unknown format '.txt'" in capsys.readouterr().err


def kill_when(proc: subprocess.Popen, record: Path, rows: int, timeout: float = 600) -> int:
    """SIGKILL `proc` once its progress record shows at least `rows` finished rows; returns that count."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            done = json.loads(record.read_text())["rows"]
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            done = 0
        if done >= rows:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return done
        if proc.poll() is not None:
            raise AssertionError(f"predict ended (rc {proc.returncode}) before {rows} rows")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("predict did not reach the kill point in time")


def test_kill_9_then_resume_is_byte_identical(tiny_run, tmp_path):
    src = tmp_path / "in.jsonl"
    write_texts(src, 2400)
    full, cut = tmp_path / "full.jsonl", tmp_path / "cut.jsonl"
    flags = ("--chunk-rows", "200", "--top", "2")
    assert subprocess.run(predict_cmd(tiny_run, src, full, *flags), env=env(), capture_output=True).returncode == 0
    proc = subprocess.Popen(predict_cmd(tiny_run, src, cut, *flags), env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    done = kill_when(proc, tmp_path / "cut.jsonl.partial.json", 1000)
    assert not cut.exists() and (tmp_path / "cut.jsonl.partial").is_file()
    resumed = subprocess.run(predict_cmd(tiny_run, src, cut, *flags, "--resume"), env=env(), capture_output=True,
                             text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"({2400 - done} now)" in resumed.stdout  # the finished rows were not recomputed
    assert cut.read_bytes() == full.read_bytes()
    assert not (tmp_path / "cut.jsonl.partial").exists() and not (tmp_path / "cut.jsonl.partial.json").exists()


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident set so far (Linux VmHWM), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return psutil.Process(pid).memory_info().rss / 2**20


def watch(proc: subprocess.Popen, record: Path, marks: list[int]) -> dict[int, float]:
    """Peak RSS (MB) of `proc` when its record first shows each of `marks` finished rows (the last mark: at
    its last reading before it exited, after its final chunk)."""
    peak, seen = 0.0, {}
    while proc.poll() is None:
        try:
            peak = max(peak, peak_rss_mb(proc.pid))
            done = json.loads(record.read_text())["rows"]
        except (OSError, psutil.Error, json.JSONDecodeError, KeyError):
            done = 0
        for m in marks:
            if done >= m and m not in seen:
                seen[m] = peak
        time.sleep(0.1)
    return {m: seen.get(m, peak) for m in marks}


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_200k_rows_flat_memory_and_resume(tiny_run, tmp_path):
    """200,000 generated rows: peak RSS after 200k rows is that after 20k (streamed); kill -9 halfway and
    --resume give the uninterrupted file byte for byte. --batch-size 64 (the tiny model is cheap per row)."""
    n = 200_000
    src = tmp_path / "big.jsonl"
    write_texts(src, n, seed=1)
    full, cut = tmp_path / "full.jsonl", tmp_path / "cut.jsonl"
    flags = ("--batch-size", "64")
    t0 = time.time()
    proc = subprocess.Popen(predict_cmd(tiny_run, src, full, *flags), env=env(), stdout=subprocess.PIPE, text=True)
    peaks = watch(proc, tmp_path / "full.jsonl.partial.json", [20_000, n])
    summary = proc.stdout.read()
    assert proc.returncode == 0, summary
    print(f"\npeak RSS after 20k rows {peaks[20_000]:.0f} MB, after 200k rows {peaks[n]:.0f} MB; "
          f"{time.time() - t0:.0f} s; {summary.strip().splitlines()[-1]}")
    assert peaks[n] < peaks[20_000] * 1.10 + 20  # flat: no growth with the file
    proc = subprocess.Popen(predict_cmd(tiny_run, src, cut, *flags), env=env(), stdout=subprocess.DEVNULL)
    done = kill_when(proc, tmp_path / "cut.jsonl.partial.json", n // 2, timeout=3000)
    resumed = subprocess.run(predict_cmd(tiny_run, src, cut, *flags, "--resume"), env=env(), capture_output=True,
                             text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    print(f"killed at {done} rows; resumed: {resumed.stdout.strip().splitlines()[-1]}")
    assert cut.read_bytes() == full.read_bytes()


def test_resume_refuses_a_replaced_input_or_a_changed_model(tiny_run, tmp_path, capsys, monkeypatch):
    from qwen_ft.inference import labeling

    run = copy_run(tiny_run, tmp_path / "run")
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_texts(src, 6)
    original = src.read_bytes()
    base = ["predict", "--model-path", str(run), "--input", str(src), "--output", str(out), "--precision", "fp32",
            "--chunk-rows", "2"]

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(labeling, "convert", interrupted)
    assert main(base) != 0 and (tmp_path / "out.jsonl.partial").is_file()
    monkeypatch.undo()
    src.write_bytes(original.replace(b"0", b"9"))  # same name, same size, other rows
    assert main([*base, "--resume"]) == 2
    assert "the input file's contents" in capsys.readouterr().err
    src.write_bytes(original)
    (run / "label_mapping.json").write_text((run / "label_mapping.json").read_text() + " ")  # "retrained" in place
    assert main([*base, "--resume"]) == 2
    assert "the model folder's files" in capsys.readouterr().err
    shutil.copy2(tiny_run / "label_mapping.json", run / "label_mapping.json")
    assert main([*base, "--resume"]) == 0 and len(out.read_text().splitlines()) == 6
