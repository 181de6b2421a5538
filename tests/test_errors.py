"""Bad input: one clear message, exit code 2, no traceback, and no output folder left behind.

Most cases call `qwen_ft.cli.main` in-process (the same code path as the command, without paying the
interpreter start-up per case); two run `python -m qwen_ft` to show the real exit code and stderr.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qwen_ft.cli import main
from tests.conftest import REPO, copy_run, tiny_train_args


def fail(capsys, argv: list[str]) -> str:
    """Run the CLI, assert the user-error exit code, return the message (no traceback in it)."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"qwen-ft {argv[0]}: error:" in err, err
    return err


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def category_rows(labels: dict[str, int]) -> list[dict]:
    return [{"question": f"question {i} about {lab}?", "category": lab}
            for lab, n in labels.items() for i in range(n)]


def mc_row(i: int, n_choices: int = 4, answer: str = "A") -> dict:
    letters = "ABCDEFGH"[:n_choices]
    return {"question": f"q{i}?", "choices": {"label": list(letters), "text": [f"c{j}" for j in range(n_choices)]},
            "answerKey": answer}


@pytest.fixture
def train(tiny_qwen3, tmp_path, capsys):
    """Run `train` with the tiny model and expect a clean rejection; check that no run folder appeared."""
    out = tmp_path / "out"

    def run(*extra: str, output_dir: Path = out, keep: bool = False) -> str:
        before = sorted(p.name for p in tmp_path.iterdir())
        err = fail(capsys, tiny_train_args(tiny_qwen3, output_dir, *extra))
        if not keep:
            assert not output_dir.exists(), f"{output_dir} was left behind"
        assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing else either (no temp folders)
        return err

    return run


# ----------------------------------------------------------------------------- data

def test_missing_data_file(train, tmp_path):
    err = train("--data", str(tmp_path / "nope.jsonl"))
    assert "data file not found" in err and "nope.jsonl" in err


def test_data_path_is_a_folder(train, tmp_path):
    (tmp_path / "dir.jsonl").mkdir()
    assert "is a folder" in train("--data", str(tmp_path / "dir.jsonl"))


def test_unreadable_data_files(train, tmp_path):
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"question": "ok", "category": "a"}\n{"question": broken\n')
    err = train("--data", str(bad_json))
    assert "line 2 is not valid JSON" in err
    bad_parquet = tmp_path / "bad.parquet"
    bad_parquet.write_bytes(b"not a parquet file at all")
    err = train("--data", str(bad_parquet))
    assert "cannot read" in err and "as parquet" in err
    binary = tmp_path / "binary.csv"
    binary.write_bytes(bytes(range(256)) * 4)
    assert "cannot read" in train("--data", str(binary))


def test_unknown_format(train, tmp_path):
    (tmp_path / "data.txt").write_text("a,b\n")
    err = train("--data", str(tmp_path / "data.txt"))
    assert "unknown data format '.txt'" in err and ".jsonl" in err


def test_missing_columns_name_the_columns_found(train, tmp_path):
    data = write_jsonl(tmp_path / "cols.jsonl", [{"body": "x", "tag": "y", "n": 1}] * 6)
    err = train("--data", str(data))
    assert "2 problems found" in err
    assert "no text column found" in err and "no label column found" in err
    assert "columns found: body, tag, n" in err and "--label-column" in err
    err = train("--data", str(data), "--text-column", "body", "--label-column", "labl")
    assert "label column 'labl' not found" in err and "body, tag, n" in err


def test_empty_data_set_after_filtering(train, tmp_path):
    data = write_jsonl(tmp_path / "blank.jsonl", [{"question": "  ", "category": "a"}, {"question": "q", "category": None}])
    err = train("--data", str(data))
    assert "empty after dropping 2 rows" in err
    (tmp_path / "empty.jsonl").write_text("\n")
    assert "is empty" in train("--data", str(tmp_path / "empty.jsonl"))


def test_category_too_small_for_a_stratified_split(train, tmp_path):
    data = write_jsonl(tmp_path / "small.jsonl", category_rows({"law": 6, "math": 2, "art": 1}))
    err = train("--data", str(data))
    assert "too few rows for a stratified split" in err and "'art' has 1" in err and "'math' has 2" in err


def test_validation_labels_not_seen_in_training(train, tmp_path):
    tr = write_jsonl(tmp_path / "train.jsonl", category_rows({"law": 5, "math": 5}))
    va = write_jsonl(tmp_path / "val.jsonl", category_rows({"law": 2, "poetry": 2, "chess": 1}))
    err = train("--data", str(tr), "--validation-data", str(va))
    assert "not seen in training: chess, poetry" in err


def test_multiple_choice_rows_with_wrong_choices_or_answer(train, tmp_path):
    rows = [mc_row(i) for i in range(10)]
    rows[2] = mc_row(2, answer="Z")  # answer not among the choices
    rows[5] = {"question": "q5?", "choices": {"label": ["A"], "text": ["only"]}, "answerKey": "A"}  # 1 choice
    err = train("--data", str(write_jsonl(tmp_path / "mc.jsonl", rows)))
    assert "row 2: answerKey 'Z' is not among the choice labels" in err
    assert "row 5: 1 choices (need 2 to 26)" in err
    rows = [mc_row(i) for i in range(9)] + [mc_row(9, n_choices=5)]
    err = train("--data", str(write_jsonl(tmp_path / "mc2.jsonl", rows)))
    assert "different numbers of choices" in err and "rows [9] differ" in err


def test_data_problems_of_both_sources_reported_together(train, tmp_path):
    err = train("--data", str(tmp_path / "a.jsonl"), "--validation-data", str(tmp_path / "b.csv"))
    assert "2 problems found" in err and "a.jsonl" in err and "b.csv" in err


# ----------------------------------------------------------------------------- config

def test_unknown_yaml_keys_suggest_the_closest(train, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lora:\n  rnak: 4\ntrain:\n  learning_rate: 1e-3\nepochs: 2\nmodle: {}\n")
    err = train("--config", str(cfg))
    assert "4 problems found" in err
    assert "unknown key 'rnak' (did you mean 'rank'?)" in err
    assert "unknown key 'learning_rate' (it belongs in the 'optim' section)" in err
    assert "unknown key 'epochs' (did you mean 'train.epochs'?)" in err
    assert "unknown key 'modle' (did you mean 'model'?)" in err


def test_invalid_values_all_reported_at_once(train):
    err = train("--lora-rank", "0", "--learning-rate", "0", "--lora-dropout", "1", "--epochs", "0",
                "--batch-size", "-2")
    assert "5 problems found" in err
    for flag in ("--lora-rank must be > 0", "--learning-rate must be > 0", "--lora-dropout must be in [0, 1)",
                 "--epochs must be > 0", "--batch-size must be > 0"):
        assert flag in err
    assert "must be in [0, 1)" in train("--lora-dropout", "-0.1")
    assert "expected a number" in train("--lora-rank", "four")


def test_every_kind_of_problem_in_one_report(train, tmp_path, tiny_run):
    """Flag values, model, data and output folder are checked together, before anything loads."""
    finished = copy_run(tiny_run, tmp_path / "finished")
    err = train("--lora-rank", "-1", "--model", str(tmp_path / "no-model"), "--data", str(tmp_path / "x.csv"),
                output_dir=finished, keep=True)
    assert "4 problems found" in err
    assert "--lora-rank" in err and "model not found" in err and "data file not found" in err
    assert "already holds a finished run" in err and "--overwrite" in err


# ----------------------------------------------------------------------------- models

def test_model_path_that_does_not_exist(train, tmp_path):
    err = train("--model", str(tmp_path / "missing-model"))
    assert "model not found" in err and "missing-model" in err


def test_model_errors_come_before_a_hub_download(train, tmp_path, monkeypatch):
    import qwen_ft.data.sources as sources

    def no_download(*a, **k):
        raise AssertionError("the hub data set was fetched although the model was already wrong")

    monkeypatch.setattr(sources, "_read_hub", no_download)
    err = train("--model", str(tmp_path / "missing-model"), "--data", "someone/some-dataset")
    assert "model not found" in err and "problems found" not in err


def test_model_folder_that_is_not_a_model(train, tmp_path, tiny_qwen3, tiny_run):
    (tmp_path / "empty-model").mkdir()
    assert "has no config.json, so it is not a model" in train("--model", str(tmp_path / "empty-model"))
    err = train("--model", str(tiny_run))
    assert "not a model" in err and "pass it as --model-path" in err
    pickled = tmp_path / "pickled"  # config + tokenizer, weights only as pickle: refused, never unpickled
    shutil.copytree(tiny_qwen3, pickled, ignore=shutil.ignore_patterns("*.safetensors"))
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")
    err = train("--model", str(pickled))
    assert "no .safetensors weights" in err and "pytorch_model.bin" in err
    vit = tmp_path / "vit"  # a real config of a model that cannot generate text
    vit.mkdir()
    (vit / "config.json").write_text(json.dumps({"model_type": "vit", "hidden_size": 32, "num_hidden_layers": 1,
                                                  "num_attention_heads": 2, "intermediate_size": 64}))
    (vit / "model.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")  # a valid, empty file
    assert "is not a causal language model" in train("--model", str(vit))


def test_lora_targets_missing_leave_no_folder(train):
    err = train("--lora-target-modules", "q_proj,not_a_layer")
    assert "LoRA target modules not found in the model: not_a_layer" in err


def test_prompt_budget_too_small(train):
    err = train("--max-length", "40")
    assert "--max-length 40 is too small" in err


def test_model_path_without_adapter(capsys, tiny_qwen3, tmp_path):
    err = fail(capsys, ["validate", "--model-path", str(tiny_qwen3)])
    assert "holds a model but no LoRA adapter" in err
    err = fail(capsys, ["test", "--model-path", str(tmp_path / "nothing"), "some text"])
    assert "run folder not found" in err


def test_adapter_on_a_different_base_model(capsys, tiny_run, tmp_path, chatml_tokenizer_dir):
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    other = tmp_path / "other-base"
    tok = AutoTokenizer.from_pretrained(chatml_tokenizer_dir)
    Qwen3ForCausalLM(Qwen3Config(vocab_size=len(tok), hidden_size=48, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=8)).save_pretrained(other)
    tok.save_pretrained(other)
    err = fail(capsys, ["validate", "--model-path", str(tiny_run), "--base-model", str(other)])
    assert "trained on a different base model" in err and "hidden_size 32 vs 48" in err
    assert "num_hidden_layers 2 vs 1" in err


def test_incomplete_run_refused_by_every_reader(capsys, tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "run")
    (run / "COMPLETE").unlink()
    for argv in (["validate", "--model-path", str(run)], ["test", "--model-path", str(run), "a question"],
                 ["merge", "--model-path", str(run), "--output-dir", str(tmp_path / "merged")]):
        err = fail(capsys, argv)
        assert "incomplete" in err and "--resume" in err, argv
    assert not (tmp_path / "merged").exists() and not (run / "eval").exists()


def test_pickled_adapter_refused(capsys, tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "run")
    (run / "adapter_model.safetensors").rename(run / "adapter_model.bin")
    err = fail(capsys, ["validate", "--model-path", str(run)])
    assert "no adapter_model.safetensors" in err


# ----------------------------------------------------------------------------- output folder

def test_finished_run_refused_without_overwrite(train, tmp_path, tiny_run):
    run = copy_run(tiny_run, tmp_path / "run")
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    err = train(output_dir=run, keep=True)
    assert "already holds a finished run" in err and "--overwrite" in err
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before  # untouched
    err = train("--resume", output_dir=run, keep=True)
    assert "already holds a finished run" in err


def test_other_output_folders_refused(train, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert "is not a qwen-ft run" in train(output_dir=foreign, keep=True)
    assert (foreign / "notes.txt").read_text() == "mine"
    assert "nothing to resume" in train("--resume")
    (tmp_path / "file").write_text("")
    assert "exists and is a file" in train(output_dir=tmp_path / "file", keep=True)


# ----------------------------------------------------------------------------- the real command line

def test_command_line_exit_code_and_no_traceback(tiny_qwen3, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "qwen_ft", *tiny_train_args(tiny_qwen3, out, "--data", str(tmp_path / "no.jsonl"))]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 2
    assert res.stderr.startswith("qwen-ft train: error: data file not found") and "Traceback" not in res.stderr
    assert not out.exists()
    res = subprocess.run([*cmd, "--debug"], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode != 0 and "Traceback" in res.stderr and "UserError" in res.stderr


def test_validate_reports_flag_and_folder_problems_together(capsys, tmp_path):
    err = fail(capsys, ["validate", "--model-path", str(tmp_path / "none"), "--batch-size", "0",
                        "--num-val-samples", "-1"])
    assert "3 problems found" in err and "--batch-size" in err and "--num-val-samples" in err
    assert "run folder not found" in err


def test_resume_with_other_flags_refused(train, tmp_path, tiny_run):
    run = copy_run(tiny_run, tmp_path / "run")
    (run / "COMPLETE").unlink()
    err = train("--learning-rate", "0.5", "--resume", output_dir=run, keep=True)
    assert "the config differs from the unfinished run" in err and "config.yaml" in err


# ----------------------------------------------------------------------------- safety

def test_no_remote_code_no_pickle_in_the_package():
    import re

    from qwen_ft.config import TrainConfig

    assert TrainConfig().model.trust_remote_code is False
    for path in (REPO / "src" / "qwen_ft").rglob("*.py"):
        text = path.read_text()
        assert "trust_remote_code=True" not in text, path
        assert not re.search(r"^\s*(import|from)\s+(c?pickle|dill|joblib)\b", text, re.M), path
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, (path, call)


def test_finished_run_holds_no_pickle(tiny_run):
    pickled = [p for p in tiny_run.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".pickle")]
    assert not pickled and (tiny_run / "adapter_model.safetensors").is_file()


def test_overwrite_replaces_a_finished_run_whole(tiny_qwen3, tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "run")
    (run / "eval").mkdir(exist_ok=True)
    (run / "eval" / "stale.json").write_text("{}")
    old_config = (run / "config.hash").read_text()
    assert main(tiny_train_args(tiny_qwen3, run, "--max-steps", "1", "--overwrite")) == 0
    assert (run / "COMPLETE").is_file() and not (run / "eval").exists()  # nothing of the old run is mixed in
    assert (run / "config.hash").read_text() != old_config
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no staging folders left beside it
