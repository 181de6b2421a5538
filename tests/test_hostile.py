"""Hostile and careless inputs (issue 11): nothing lost, nothing executed, nothing silent.

Each test is one finding: the exit code (2), key words of the message, no traceback, and the files that
were there before byte for byte the same afterwards. The security tests build a real malicious model
folder (its `auto_map` code writes a marker file) and assert that the marker is never written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from qwen_ft.cli import main
from qwen_ft.errors import UserError
from tests.conftest import REPO, copy_run, shared_path, tiny_train_args

ENV = {**os.environ, "PYTHONPATH": str(REPO / "src"), "QWEN_FT_THREADS": "1"}


def fail(capsys, argv: list[str], code: int = 2) -> str:
    capsys.readouterr()
    assert main(argv) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    assert f"qwen-ft {argv[0]}: error:" in err, err
    return err


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` (and `folder` itself when it is a file) -> its sha256."""
    folder = Path(folder)
    files = [folder] if folder.is_file() else sorted(p for p in folder.rglob("*") if p.is_file())
    return {str(p.relative_to(folder.parent)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def write_jsonl(path: Path, rows: list[dict], prefix: bytes = b"") -> Path:
    path.write_bytes(prefix + "".join(json.dumps(r) + "\n" for r in rows).encode())
    return path


def category_rows(labels: dict[str, int], offset: int = 0) -> list[dict]:
    return [{"question": f"question {i + offset} about {lab}?", "category": lab}
            for lab, n in labels.items() for i in range(n)]


def mc_rows(n: int, n_choices: int = 4) -> list[dict]:
    letters = [chr(ord("A") + i) for i in range(n_choices)]
    return [{"question": f"q{i}?", "choices": {"label": letters, "text": [f"c{j}" for j in range(n_choices)]},
             "answerKey": "A"} for i in range(n)]


@pytest.fixture
def finished(tiny_run, tmp_path) -> Path:
    return copy_run(tiny_run, tmp_path / "run")


def evil_model(tmp_path: Path, tiny_qwen3: Path) -> tuple[Path, Path]:
    """A model folder whose config names its own Python code (auto_map); importing it writes `marker`."""
    folder = tmp_path / "evil-model"
    shutil.copytree(tiny_qwen3, folder)
    marker = tmp_path / "CODE_RAN"
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="evil_qwen", auto_map={"AutoConfig": "evil.EvilConfig",
                                                    "AutoModelForCausalLM": "evil.EvilModel"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "evil.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('the model folder ran its code')\n"
        "from transformers import Qwen3Config, Qwen3ForCausalLM\n"
        "class EvilConfig(Qwen3Config):\n    model_type = 'evil_qwen'\n"
        "class EvilModel(Qwen3ForCausalLM):\n    config_class = EvilConfig\n")
    return folder, marker


# ============================================================================ security

def test_evil_model_folder_is_really_evil(tiny_qwen3, tmp_path):
    """The malicious folder of the tests below runs its code when trusted (so their 'never' has teeth)."""
    folder, marker = evil_model(tmp_path, tiny_qwen3)
    code = ("import sys; from qwen_ft.models import load_config; "
            "load_config(sys.argv[1], trust_remote_code=True)")
    env = {**ENV, "HF_MODULES_CACHE": str(tmp_path / "modules")}
    subprocess.run([sys.executable, "-c", code, str(folder)], env=env, capture_output=True, timeout=240)
    assert marker.is_file()


def test_train_never_runs_model_folder_code(capsys, tiny_qwen3, tmp_path):
    folder, marker = evil_model(tmp_path, tiny_qwen3)
    out = tmp_path / "out"
    err = fail(capsys, tiny_train_args(folder, out))
    assert "--trust-remote-code" in err and "auto_map" in err
    assert not marker.exists() and not out.exists()


def test_a_run_folder_never_switches_on_remote_code(capsys, tiny_qwen3, finished, tmp_path):
    """A downloaded run whose config.yaml says trust_remote_code: true and points at a model folder with
    code: merge, validate and test refuse it without their own --trust-remote-code; no code runs."""
    import yaml

    folder, marker = evil_model(tmp_path, tiny_qwen3)
    cfg = yaml.safe_load((finished / "config.yaml").read_text())
    cfg["model"].update(model=str(folder), trust_remote_code=True)
    (finished / "config.yaml").write_text(yaml.safe_dump(cfg))
    before = snapshot(finished)
    merged = tmp_path / "merged"
    for argv in (["merge", "--model-path", str(finished), "--output-dir", str(merged)],
                 ["validate", "--model-path", str(finished)],
                 ["test", "--model-path", str(finished), "a question"]):
        err = fail(capsys, argv)
        assert "trust-remote-code" in err.replace("_", "-"), argv
    cfg["model"]["trust_remote_code"] = False  # recorded as untrusted: the folder's code is still never run
    (finished / "config.yaml").write_text(yaml.safe_dump(cfg))
    err = fail(capsys, ["merge", "--model-path", str(finished), "--output-dir", str(merged)])
    assert "--trust-remote-code" in err
    assert not marker.exists() and not merged.exists()
    unchanged = lambda snap: {k: v for k, v in snap.items() if not k.endswith("config.yaml")}  # noqa: E731
    assert unchanged(snapshot(finished)) == unchanged(before)


# ============================================================================ data loss

def test_overwrite_with_a_bad_late_flag_keeps_the_run(capsys, tiny_qwen3, finished):
    before = snapshot(finished)
    for bad in ("cosin", "bogus"):
        err = fail(capsys, tiny_train_args(tiny_qwen3, finished, "--overwrite", "--lr-scheduler", bad))
        assert f"--lr-scheduler '{bad}' is not a schedule" in err
    assert "did you mean 'cosine'" in fail(capsys, tiny_train_args(tiny_qwen3, finished, "--lr-scheduler", "cosin"))
    assert snapshot(finished) == before


def test_overwrite_refuses_folders_that_are_not_our_runs(capsys, tiny_qwen3, tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("my notes")
    (foreign / "run.json").write_text('{"something": "else"}')  # the name alone is not our marker
    before = snapshot(foreign)
    err = fail(capsys, tiny_train_args(tiny_qwen3, foreign, "--overwrite"))
    assert "is not a qwen-ft run" in err and "never other files" in err
    assert snapshot(foreign) == before


def test_overwrite_never_deletes_an_input(capsys, tiny_qwen3, finished, tmp_path):
    data = tmp_path / "DIR"
    data.mkdir()
    write_jsonl(data / "mydata.jsonl", category_rows({"a": 6, "b": 6}))
    before = snapshot(data)
    err = fail(capsys, [*tiny_train_args(tiny_qwen3, data, "--overwrite"), "--data", str(data / "mydata.jsonl")])
    assert "mydata.jsonl" in err and ("contains the input" in err or "not a qwen-ft run" in err)
    assert snapshot(data) == before
    run_before = snapshot(finished)  # a run folder that holds this command's data file
    err = fail(capsys, [*tiny_train_args(tiny_qwen3, finished, "--overwrite"),
                        "--data", str(finished / "split" / "train.jsonl")])
    assert "contains the input --data" in err
    err = fail(capsys, tiny_train_args(finished, finished / "inside", "--overwrite"))  # output inside the model
    assert "inside the input --model" in err
    assert snapshot(finished) == run_before


def test_output_is_never_root_home_or_the_current_folder(capsys, tiny_qwen3, tmp_path, monkeypatch):
    from qwen_ft.outputs import plan_output

    for target, words in (("/", "filesystem root"), (str(Path.home()), "home folder"),
                          (str(tmp_path), "current folder"), (str(tmp_path.parent), "contains the current")):
        monkeypatch.chdir(tmp_path)
        with pytest.raises(UserError, match=words):
            plan_output(target, overwrite=True)
    err = fail(capsys, tiny_train_args(tiny_qwen3, Path("."), "--overwrite"))
    assert "is the current folder" in err


def test_data_file_inside_the_output_is_refused_before_overwrite(tmp_path):
    from qwen_ft.outputs import plan_output

    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"written_by": "qwen-ft"}))
    (run / "COMPLETE").write_text("{}")
    (run / "data.jsonl").write_text("{}\n")
    with pytest.raises(UserError, match="contains the input --data"):
        plan_output(run, overwrite=True, inputs={"--data": run / "data.jsonl"})
    assert plan_output(run, overwrite=True, inputs={"--data": tmp_path / "elsewhere.jsonl"}).mode == "overwrite"


def test_merge_output_never_replaces_the_run_or_other_folders(capsys, finished, tmp_path):
    before = snapshot(tmp_path)
    (tmp_path / "afile").write_text("keep me")
    other = tmp_path / "other-run"  # a run folder is not a merged folder: --overwrite refuses it too
    other.mkdir()
    (other / "run.json").write_text((finished / "run.json").read_text())
    (other / "notes.txt").write_text("keep")
    before = snapshot(tmp_path)
    cases = {finished: "is the input --model-path", tmp_path: "contains the input --model-path",
             tmp_path / "afile": "exists and is a file", other: "is not a merged model folder"}
    for out, words in cases.items():
        err = fail(capsys, ["merge", "--model-path", str(finished), "--output-dir", str(out), "--overwrite"])
        assert words in err, (out, err)
    assert snapshot(tmp_path) == before


def test_merge_overwrite_replaces_only_a_merged_folder_whole(capsys, finished, tmp_path):
    out = tmp_path / "merged"
    assert main(["merge", "--model-path", str(finished), "--output-dir", str(out), "--verify-samples", "1"]) == 0
    assert json.loads((out / "merge.json").read_text())["written_by"] == "qwen-ft"
    err = fail(capsys, ["merge", "--model-path", str(finished), "--output-dir", str(out)])
    assert "already holds a merged model" in err and "--overwrite" in err
    (out / "stale.txt").write_text("from before")
    assert main(["merge", "--model-path", str(finished), "--output-dir", str(out), "--verify-samples", "1",
                 "--overwrite"]) == 0
    assert not (out / "stale.txt").exists() and (out / "merge.json").is_file()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".merged")]  # no staging, no lock


def test_merge_failure_keeps_the_previous_merged_folder(capsys, finished, tmp_path, monkeypatch):
    out = tmp_path / "merged"
    assert main(["merge", "--model-path", str(finished), "--output-dir", str(out), "--verify-samples", "1"]) == 0
    before = snapshot(out)
    import qwen_ft.merge as m

    monkeypatch.setattr(m, "_max_diff", lambda *a: float("inf"))  # verification fails after the merge
    err = fail(capsys, ["merge", "--model-path", str(finished), "--output-dir", str(out), "--overwrite"])
    assert "merged logits differ" in err
    assert snapshot(out) == before
    assert not (tmp_path / ".merged.staging").exists()


def test_second_writer_gets_the_holders_pid(tmp_path):
    from qwen_ft.outputs import OutputLock

    target = tmp_path / "out"
    with OutputLock(target):
        code = ("import sys; from qwen_ft.outputs import OutputLock; from qwen_ft.errors import UserError\n"
                "try:\n    OutputLock(sys.argv[1]).acquire()\nexcept UserError as e:\n    print(e.message)\n")
        res = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True, text=True, env=ENV,
                             timeout=120)
        assert f"being written by another qwen-ft process (pid {os.getpid()}" in res.stdout, res
    OutputLock(target).acquire().release()  # released with its holder


def test_stale_staging_folder_of_ours_is_cleaned_others_are_refused(tmp_path):
    from qwen_ft.outputs import claim_output, plan_output, staging_path

    target = tmp_path / "merged"
    staging = staging_path(target)
    staging.mkdir()
    (staging / "merge.json").write_text(json.dumps({"written_by": "qwen-ft"}))
    (staging / "half-written.safetensors").write_text("")
    plan = plan_output(target, marker="merge.json", stage_new=True)
    with claim_output(plan) as p:
        assert not staging.exists()  # ours: removed before the new output is built
        p.work.mkdir()
        (p.work / "merge.json").write_text(json.dumps({"written_by": "qwen-ft"}))
    assert (target / "merge.json").is_file() and not staging.exists()
    staging.mkdir()
    (staging / "precious.txt").write_text("not ours")
    with pytest.raises(UserError, match="in the way"):
        with claim_output(plan_output(target, marker="merge.json", overwrite=True)):
            pass
    assert (staging / "precious.txt").read_text() == "not ours"


# ============================================================================ silent wrong results

def test_mmlu_pro_three_per_category_splits_stratified_at_seed_42():
    from qwen_ft.config import DataArgs
    from qwen_ft.data.prepare import prepare

    data = shared_path("data", "mmlu_pro", "test.parquet")
    prepared = prepare(DataArgs(data=str(data), max_samples_per_category=3), 42)
    labels = set(prepared.task.labels)
    assert len(labels) == 14
    assert {r["label"] for r in prepared.splits["train"]} == labels  # every label is trained on
    for name in ("validation", "test"):
        split = prepared.splits[name]
        assert len(split) == 8 and len({r["label"] for r in split}) == 8  # at most one per label: stratified


def test_too_few_rows_for_the_split_fail_up_front_naming_the_minimum(capsys, tiny_qwen3, tmp_path):
    from qwen_ft.data.splits import split_rows

    rows = [{"label": lab, "question": f"{lab}{i}"} for lab in "abcd" for i in range(3)]
    with pytest.raises(UserError, match="at least 4 .one per label.") as e:
        split_rows(rows, 0.5, 0.3, 0)
    assert "Use at least" in e.value.message


def test_duplicate_rows_are_removed_before_splitting(tmp_path, caplog):
    from qwen_ft.config import DataArgs
    from qwen_ft.data.prepare import prepare

    rows = category_rows({"a": 10, "b": 10})
    data = write_jsonl(tmp_path / "dups.jsonl", rows + rows[:7] + rows[3:5])
    with caplog.at_level(logging.WARNING):
        prepared = prepare(DataArgs(data=str(data)), 42)
    assert prepared.duplicates == 9 and "removed 9 exact duplicate rows" in caplog.text
    questions = [[r["question"] for r in prepared.splits[s]] for s in ("train", "validation", "test")]
    assert sum(map(len, questions)) == 20 and len(set().union(*map(set, questions))) == 20  # nothing leaks


def test_validation_rows_also_in_training_data_are_removed(tmp_path, caplog):
    from qwen_ft.config import DataArgs
    from qwen_ft.data.prepare import prepare

    train = write_jsonl(tmp_path / "train.jsonl", category_rows({"a": 10, "b": 10}))
    val = write_jsonl(tmp_path / "val.jsonl", category_rows({"a": 2, "b": 2}))
    with caplog.at_level(logging.WARNING):
        prepared = prepare(DataArgs(data=str(train), validation_data=str(val)), 42)
    val_q = {r["question"] for r in prepared.splits["validation"]}
    assert not val_q & {r["question"] for r in prepared.splits["train"] + prepared.splits["test"]}
    assert "also in --validation-data" in caplog.text


def test_validation_data_equal_to_data_is_refused(capsys, tiny_qwen3, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", category_rows({"a": 6, "b": 6}))
    link = tmp_path / "same.jsonl"
    link.symlink_to(data)
    for val in (data, link):
        err = fail(capsys, [*tiny_train_args(tiny_qwen3, tmp_path / "out"), "--data", str(data),
                            "--validation-data", str(val)])
        assert "is the same data as --data" in err
    assert not (tmp_path / "out").exists()


def test_flags_that_do_not_apply_to_the_task_are_errors(capsys, tiny_qwen3, tmp_path):
    mc = write_jsonl(tmp_path / "mc.jsonl", mc_rows(12))
    out = tmp_path / "out"
    err = fail(capsys, [*tiny_train_args(tiny_qwen3, out), "--data", str(mc)])  # sets --max-samples-per-category
    assert "--max-samples-per-category applies to category data" in err and "multiple-choice" in err
    base = [a for a in tiny_train_args(tiny_qwen3, out) if a not in ("--max-samples-per-category", "5")]
    err = fail(capsys, [*base, "--data", str(mc), "--text-column", "question"])
    assert "--text-column applies to category data" in err
    err = fail(capsys, [*base, "--hub-split", "validation"])
    assert "--hub-split validation applies to hub data sets" in err
    err = fail(capsys, [*base, "--answer-format", "text"])
    assert "--answer-format text applies to multiple-choice data" in err
    assert not out.exists()


def test_labels_differing_in_case_or_spacing_are_warned_about(tmp_path, caplog):
    from qwen_ft.config import DataArgs
    from qwen_ft.data.prepare import prepare

    rows = category_rows({"Math": 6, "math": 4, "computer  science": 5, "Computer Science": 5, "law": 6})
    data = write_jsonl(tmp_path / "labels.jsonl", rows)
    with caplog.at_level(logging.WARNING):
        prepare(DataArgs(data=str(data)), 42)
    assert "differ only in case or spacing" in caplog.text
    assert "'Math' (6 rows) / 'math' (4 rows)" in caplog.text and "'computer  science'" in caplog.text


def test_edited_label_mapping_is_refused_not_scored_as_zero(capsys, finished, tmp_path):
    from qwen_ft.runs import RunDir

    mapping = json.loads((finished / "label_mapping.json").read_text())
    edited = {**mapping, "labels": [lab.upper() for lab in mapping["labels"]]}
    edited["label_to_id"] = edited["label2id"] = {lab: i for i, lab in enumerate(edited["labels"])}
    edited["id2label"] = {str(i): lab for i, lab in enumerate(edited["labels"])}
    (finished / "label_mapping.json").write_text(json.dumps(edited))
    refused = "not the ones the model was trained on"  # run.json's labels_sha256 is checked first
    with pytest.raises(UserError, match=refused):
        RunDir(finished).label_mapping()
    run_json = json.loads((finished / "run.json").read_text())
    (finished / "run.json").write_text(json.dumps({k: v for k, v in run_json.items() if k != "labels_sha256"}))
    with pytest.raises(UserError, match="disagrees with the run's split files"):
        RunDir(finished).label_mapping()
    for argv in (["merge", "--model-path", str(finished), "--output-dir", str(tmp_path / "m")],
                 ["validate", "--model-path", str(finished)]):
        err = fail(capsys, argv)
        assert "disagrees with the run's split files" in err and "restore the original" in err
    (finished / "label_mapping.json").write_text(json.dumps({**mapping, "labels": mapping["labels"][:-1]}))
    with pytest.raises(UserError, match="label_to_id"):
        RunDir(finished).label_mapping()


def test_thirty_choices_is_a_clear_error(capsys, tiny_qwen3, tmp_path):
    data = write_jsonl(tmp_path / "mc30.jsonl", mc_rows(10, n_choices=26) + [
        {"question": "too many?", "choices": {"label": [f"L{i}" for i in range(30)],
                                              "text": [f"t{i}" for i in range(30)]}, "answerKey": "L29"}])
    err = fail(capsys, [a for a in tiny_train_args(tiny_qwen3, tmp_path / "out")
                        if a not in ("--max-samples-per-category", "5")] + ["--data", str(data)])
    assert "row 10: 30 choices (at most 26" in err


# ============================================================================ tracebacks for user mistakes

@pytest.mark.parametrize("extra, env, words", [
    (("--gpu-id", "0"), {}, "--gpu-id 0: no CUDA GPU"),
    ((), {"USE_FLASH_ATTN": "1"}, "USE_FLASH_ATTN=1"),
    (("--attn-implementation", "bogus"), {}, "'bogus' is not an attention kernel"),
    (("--lr-scheduler", "bogus"), {}, "'bogus' is not a schedule"),
    (("--epochs", "0.5"), {}, "--epochs: expected a whole number"),
    (("--seed", "-1"), {}, "--seed must be in [0, 2**32)"),
    ((), {"TRAIN_BATCH_SIZE": "abc"}, "environment variable TRAIN_BATCH_SIZE: expected a number"),
    (("--learning-rate", "inf"), {}, "--learning-rate: expected a finite number"),
])
def test_train_flag_mistakes(capsys, tiny_qwen3, tmp_path, monkeypatch, extra, env, words):
    import torch

    if "gpu" in words or "FLASH" in words:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    out = tmp_path / "out"
    err = fail(capsys, tiny_train_args(tiny_qwen3, out, *extra))
    assert words in err, err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_epochs_fraction_points_at_max_steps(capsys, tiny_qwen3, tmp_path):
    assert "use --max-steps" in fail(capsys, tiny_train_args(tiny_qwen3, tmp_path / "o", "--epochs", "0.5"))


def test_no_flag_abbreviations(capsys):
    capsys.readouterr()
    assert main(["train", "--mode", "train"]) == 2  # --mode must not become --model
    err = capsys.readouterr().err
    assert "unrecognized arguments: --mode train" in err and "ft_qwen3_generative_lora.py" in err
    assert main(["train", "--learn", "1e-3"]) == 2


def test_seed_script_help_shows_the_guide_flags():
    res = subprocess.run([sys.executable, str(REPO / "ft_qwen3_generative_lora.py"), "--help"], capture_output=True,
                         text=True, env=ENV, timeout=120)
    assert res.returncode == 0
    for flag in ("--mode", "--model-path", "--num-val-samples", "--output-dir", "--learning-rate"):
        assert flag in res.stdout, flag


def test_truncated_safetensors_model_is_one_clear_error(capsys, tiny_qwen3, tmp_path):
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_qwen3, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    err = fail(capsys, tiny_train_args(broken, tmp_path / "out"))
    assert "model.safetensors is truncated" in err


def test_damaged_adapter_is_one_clear_error(capsys, finished, tmp_path):
    out = tmp_path / "m"
    adapter = finished / "adapter_model.safetensors"
    good = adapter.read_bytes()
    adapter.write_bytes(good[:-100])
    assert "adapter_model.safetensors is truncated" in fail(capsys, ["merge", "--model-path", str(finished),
                                                                     "--output-dir", str(out)])
    adapter.write_bytes(good)
    config = json.loads((finished / "adapter_config.json").read_text())
    (finished / "adapter_config.json").write_text(json.dumps({**config, "r": config["r"] * 2}))
    err = fail(capsys, ["merge", "--model-path", str(finished), "--output-dir", str(out)])
    assert f"says LoRA rank {config['r'] * 2}, but the saved weights have rank {config['r']}" in err
    (finished / "adapter_config.json").write_text("{not json")
    assert "adapter_config.json is not valid JSON" in fail(capsys, ["merge", "--model-path", str(finished),
                                                                    "--output-dir", str(out)])
    assert not out.exists()


def test_bad_json_in_label_mapping_is_one_clear_error(capsys, finished, tmp_path):
    (finished / "label_mapping.json").write_text('{"task": "category", "labels": [')
    err = fail(capsys, ["merge", "--model-path", str(finished), "--output-dir", str(tmp_path / "m")])
    assert "label_mapping.json is not valid JSON" in err


def test_output_dir_that_is_a_file(capsys, finished, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("keep")
    assert "exists and is a file" in fail(capsys, ["merge", "--model-path", str(finished), "--output-dir",
                                                   str(afile)])
    fail(capsys, ["validate", "--model-path", str(finished), "--output-dir", str(afile), "--num-val-samples", "2"])
    assert afile.read_text() == "keep"


def test_bom_in_jsonl_is_read(tmp_path):
    from qwen_ft.data.sources import read_records

    rows = category_rows({"a": 2})
    assert read_records(str(write_jsonl(tmp_path / "bom.jsonl", rows, prefix=b"\xef\xbb\xbf"))) == rows
    joined = tmp_path / "joined.jsonl"  # two BOM files joined with cat: a BOM in the middle too
    joined.write_bytes((tmp_path / "bom.jsonl").read_bytes() * 2)
    assert read_records(str(joined)) == rows * 2
    utf16 = tmp_path / "u16.jsonl"
    utf16.write_bytes("".join(json.dumps(r) + "\n" for r in rows).encode("utf-16"))
    with pytest.raises(UserError, match="encoded as UTF-16, not UTF-8"):
        read_records(str(utf16))


def test_fifo_as_data_is_refused_without_hanging(capsys, tiny_qwen3, tmp_path):
    fifo = tmp_path / "data.jsonl"
    os.mkfifo(fifo)
    previous = signal.signal(signal.SIGALRM, lambda *a: (_ for _ in ()).throw(TimeoutError("hung on the FIFO")))
    signal.alarm(60)
    try:
        err = fail(capsys, [*tiny_train_args(tiny_qwen3, tmp_path / "out"), "--data", str(fifo)])
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert "is a named pipe (FIFO)" in err
    for device in ("/dev/zero", "/dev/stdin"):
        if Path(device).exists():
            from qwen_ft.data.sources import check_regular_file

            with pytest.raises(UserError, match="regular files"):
                check_regular_file(Path(device))


def test_fifo_as_config_is_refused(capsys, tiny_qwen3, tmp_path):
    fifo = tmp_path / "c.yaml"
    os.mkfifo(fifo)
    err = fail(capsys, [*tiny_train_args(tiny_qwen3, tmp_path / "out"), "--config", str(fifo)])
    assert "is not a regular file" in err


def test_repeated_choices_with_text_answers_are_warned_about(tmp_path, caplog):
    from qwen_ft.config import DataArgs
    from qwen_ft.data.prepare import prepare

    rows = mc_rows(12)
    rows[3]["choices"]["text"][2] = rows[3]["choices"]["text"][0]
    rows[4]["choices"]["text"][0] = rows[4]["choices"]["text"][1]
    data = write_jsonl(tmp_path / "mc.jsonl", rows)
    with caplog.at_level(logging.WARNING):
        prepare(DataArgs(data=str(data), answer_format="text"), 42)
    assert "2 multiple-choice rows list the same choice twice" in caplog.text


def test_os_errors_are_user_errors(capsys, tiny_qwen3, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("")
    err = fail(capsys, tiny_train_args(tiny_qwen3, afile / "sub"))  # a path through a file
    assert f"{afile} is a file, not a folder" in err
    from qwen_ft.cli import user_error

    for e, words in ((OSError(28, "No space left on device", "/x/adapter.safetensors"), "disk is full"),
                     (OSError(30, "Read-only file system", "/x"), "read-only"),
                     (RuntimeError("wrapped"), None)):
        wrapped = RuntimeError("while saving")
        wrapped.__cause__ = e
        got = user_error(wrapped)
        assert (got is None) if words is None else (words in got.message and "/x" in got.message)


def test_internal_errors_say_so_with_a_traceback(capsys, monkeypatch):
    import qwen_ft.commands.merge as merge

    def bug(*a, **k):
        raise TypeError("a bug of ours")

    monkeypatch.setattr(merge, "run_merge", bug)
    capsys.readouterr()
    assert main(["merge", "--model-path", "x", "--output-dir", "y"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "internal error" in err and "a bug of ours" in err


# ============================================================================ runs that fail or compete

def test_overwrite_that_fails_midway_keeps_the_old_run(capsys, tiny_qwen3, finished, monkeypatch):
    from qwen_ft.training import batches

    before = snapshot(finished)
    real_loss, calls = batches.answer_loss, [0]

    def diverging(*a, **k):  # the new run diverges at its third step, after it has written checkpoints
        calls[0] += 1
        loss = real_loss(*a, **k)
        return loss * float("nan") if calls[0] >= 3 else loss

    monkeypatch.setattr(batches, "answer_loss", diverging)
    err = fail(capsys, tiny_train_args(tiny_qwen3, finished, "--overwrite", "--save-steps", "1"))
    assert "training diverged" in err
    assert snapshot(finished) == before  # the old run is untouched; the failed new one waits in staging
    staging = finished.parent / ".run.staging"
    assert (staging / "run.json").is_file() and not (staging / "COMPLETE").exists()
    monkeypatch.setattr(batches, "answer_loss", real_loss)
    assert main(tiny_train_args(tiny_qwen3, finished, "--overwrite", "--max-steps", "2")) == 0  # cleans staging
    assert (finished / "COMPLETE").is_file() and snapshot(finished) != before
    assert sorted(p.name for p in finished.parent.iterdir()) == ["run"]


def test_interrupted_overwrite_resumes_in_staging(capsys, tiny_qwen3, finished, monkeypatch):
    from qwen_ft.training import batches

    before = snapshot(finished)
    real_loss, calls = batches.answer_loss, [0]

    def interrupted(*a, **k):
        calls[0] += 1
        if calls[0] == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # CheckpointTriggers saves a checkpoint, then stops
        return real_loss(*a, **k)

    monkeypatch.setattr(batches, "answer_loss", interrupted)
    args = tiny_train_args(tiny_qwen3, finished, "--overwrite", "--epochs", "2")
    err = fail(capsys, args)
    assert "interrupted" in err and "--resume" in err
    assert snapshot(finished) == before
    monkeypatch.setattr(batches, "answer_loss", real_loss)
    assert main([*args, "--resume"]) == 0
    assert (finished / "COMPLETE").is_file() and snapshot(finished) != before
    assert sorted(p.name for p in finished.parent.iterdir()) == ["run"]


def test_config_file_inside_the_output_is_not_deleted(capsys, tiny_qwen3, finished):
    (finished / "my-config.yaml").write_text("train:\n  max_steps: 1\n")
    before = snapshot(finished)
    err = fail(capsys, [*tiny_train_args(tiny_qwen3, finished, "--overwrite"),
                        "--config", str(finished / "my-config.yaml")])
    assert "contains the input --config" in err
    assert snapshot(finished) == before


HOLD_IN_MODEL_LOAD = """
import importlib, os, sys, time, pathlib
t = importlib.import_module("qwen_ft.training.train")  # the module (qwen_ft.training.train is the function)
real = t.load_model
def held(*a, **k):  # the output folder is claimed by now; wait here until the test says go
    pathlib.Path(os.environ["HELD"]).write_text(str(os.getpid()))
    while not pathlib.Path(os.environ["GO"]).exists():
        time.sleep(0.05)
    return real(*a, **k)
t.load_model = held
from qwen_ft.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_two_trainings_into_one_folder_exactly_one_proceeds(capsys, tiny_qwen3, tmp_path):
    import time

    out = tmp_path / "out"
    held, go = tmp_path / "held", tmp_path / "go"
    first = subprocess.Popen([sys.executable, "-c", HOLD_IN_MODEL_LOAD, *tiny_train_args(tiny_qwen3, out)],
                             env={**ENV, "HELD": str(held), "GO": str(go)}, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not held.exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert held.exists(), first.communicate()
        err = fail(capsys, tiny_train_args(tiny_qwen3, out))  # the same folder, while the first holds it
        assert f"is being written by another qwen-ft process (pid {first.pid}" in err
        assert not out.exists()  # the second wrote nothing
    finally:
        go.write_text("")
        stdout, stderr = first.communicate(timeout=240)
    assert first.returncode == 0, stderr
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["type"] for m in metrics].count("final") == 1 and (out / "COMPLETE").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["go", "held", "out"]  # the lock went with its holder


# A size-limited tmpfs, mounted inside a user+mount namespace (no privileges needed, nothing left mounted):
# the run's files fit, and one checkpoint, but not a second one.
DISK_FULL = r"""
set -u
mount -t tmpfs -o size=$SIZE tmpfs "$MNT"
"$PY" -m qwen_ft "$@" > "$OUT/fail.out" 2> "$OUT/fail.err"; echo $? > "$OUT/fail.rc"
cp -a "$MNT/run" "$OUT/after-fail"
mount -o remount,size=64m "$MNT"  # space freed: resume
"$PY" -m qwen_ft "$@" --resume > "$OUT/resume.out" 2> "$OUT/resume.err"; echo $? > "$OUT/resume.rc"
cp -a "$MNT/run" "$OUT/final"
mount -t tmpfs -o ro,size=1m tmpfs "$RO"
"$PY" -m qwen_ft "$@" --output-dir "$RO/run" > /dev/null 2> "$OUT/ro.err"; echo $? > "$OUT/ro.rc"
"""


def _namespaces_work() -> bool:
    try:
        return subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True,
                              timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@pytest.mark.skipif(not _namespaces_work(), reason="needs unshare --user --mount (a tmpfs of a chosen size)")
def test_disk_full_during_checkpointing_then_resume(tiny_qwen3, tmp_path):
    """Disk full at the second checkpoint (a 420 KiB tmpfs; a checkpoint of the tiny run is ~250 KiB): one
    clear error, the last complete checkpoint kept, the torn one gone; after space is freed, --resume gives
    the adapter of an uninterrupted run, bit for bit. Also a read-only output folder: one clear error."""
    from safetensors.torch import load_file

    extra = ("--epochs", "2", "--save-steps", "4", "--lora-dropout", "0.1", "--learning-rate", "5e-3", "--seed", "7")
    mnt, ro, out = tmp_path / "mnt", tmp_path / "ro", tmp_path / "out"
    for d in (mnt, ro, out):
        d.mkdir()
    reference = tmp_path / "reference"
    # the reference trains in a fresh process with the same thread count as the runs below (the thread count
    # changes the last bits of the weights; this test process may have another)
    same = {**ENV, "QWEN_FT_THREADS": "1"}
    ref = subprocess.run([sys.executable, "-m", "qwen_ft", *tiny_train_args(tiny_qwen3, reference, *extra)],
                         env=same, capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-2000:]
    args = tiny_train_args(tiny_qwen3, mnt / "run", *extra)
    env = {**same, "SIZE": "420k", "MNT": str(mnt), "RO": str(ro), "OUT": str(out), "PY": sys.executable}
    subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "bash", "-c", DISK_FULL, "bash", *args],
                   env=env, timeout=600, check=False)
    err = (out / "fail.err").read_text()
    assert (out / "fail.rc").read_text().strip() == "2", err
    assert "Traceback" not in err and "could not write the checkpoint" in err and "--resume" in err
    assert "the disk is full" in err
    assert "The last complete checkpoint, checkpoint-4, is kept" in err
    kept = sorted(p.name for p in (out / "after-fail" / "checkpoints").iterdir())
    assert kept == ["checkpoint-4"] and not (out / "after-fail" / "COMPLETE").exists()
    assert (out / "resume.rc").read_text().strip() == "0", (out / "resume.err").read_text()
    want = load_file(reference / "adapter_model.safetensors")
    got = load_file(out / "final" / "adapter_model.safetensors")
    assert want.keys() == got.keys() and all((want[k] == got[k]).all() for k in want)
    ro_err = (out / "ro.err").read_text()
    assert (out / "ro.rc").read_text().strip() == "2" and "Traceback" not in ro_err
    assert "Read-only file system" in ro_err and "writable folder" in ro_err
