"""Fuzzing the command line: random values, of the right and of wrong types, for the flags of train,
validate, test, merge and study. Whatever the values, the command exits 0, or 2 with one message;
never a traceback.

Fast by design: the model load is replaced by a stop (a UserError), so every example runs the parsing and
all the validation of a real command and stops where the heavy work would begin. Paths and model or data
names come from a fixed list (a hub id would be a download); everything else is drawn freely.
"""

from __future__ import annotations

import argparse

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qwen_ft.cli import build_parser, main
from qwen_ft.errors import UserError
from tests.conftest import copy_run

STOP = "fuzz: stopped where the model would load"

TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12)
NUMBERS = st.one_of(st.integers(-2**40, 2**40), st.floats(allow_nan=True, allow_infinity=True)).map(str)
WORDS = st.sampled_from(["0", "1", "-1", "2", "", " ", "1e3", "0.5", "1e-3", "nan", "inf", "-inf", "true", "no",
                         "auto", "none", "cosine", "cosin", "sdpa", "flash_attention_2", "fp16", "bf16", "q_proj",
                         "letter", "text", "category", "multiple_choice", "adamw", "sgd", "a,b", "--", "-x"])
VALUES = st.one_of(WORDS, NUMBERS, TEXT)
PATHS = ["missing", "missing.jsonl", ".", "..", "/", "~", "adir", "afile", "sub/new", "afile/below"]
SETTINGS = settings(max_examples=25, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def flags_of(command: str) -> dict[str, argparse.Action]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {a.option_strings[0]: a for a in sub.choices[command]._actions
            if a.option_strings and a.option_strings[0] not in ("-h", "--help")}


def argv_for(command: str, fixed: dict[str, list[str]], protected: set[str]):
    """A strategy for argument lists: a few of `command`'s flags, each with a drawn value."""
    flags = flags_of(command)
    free = sorted(f for f in flags if f not in protected)

    @st.composite
    def draw(data):
        args = []
        for flag in data(st.lists(st.sampled_from(free), max_size=4, unique=True)):
            action = flags[flag]
            if action.nargs == 0:
                args.append(flag)
            elif flag in fixed:
                args += [flag, data(st.sampled_from(fixed[flag]))]
            else:
                args += [flag, data(VALUES)]
        for flag, choices in fixed.items():  # the protected flags: only from their list
            if flag in protected and data(st.booleans()):
                args += [flag, data(st.sampled_from(choices))]
        return args

    return draw()


@pytest.fixture
def sandbox(tmp_path, monkeypatch, tiny_run):
    """The current folder is an empty scratch folder (relative paths land there); the model never loads."""
    import sys

    import qwen_ft.merge  # noqa: F401  (imports the loaders by name: patched below too)
    import qwen_ft.models as models
    import qwen_ft.training  # noqa: F401

    def stop(*a, **k):
        raise UserError(STOP)

    for name in ("load_model", "load_tokenizer"):
        real = getattr(models, name)
        for module in [m for n, m in sys.modules.items() if n.startswith("qwen_ft")]:
            if getattr(module, name, None) is real:
                monkeypatch.setattr(module, name, stop)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("not data\n")
    run = copy_run(tiny_run, tmp_path / "run")
    return tmp_path, run


def check(capsys, argv: list[str]) -> None:
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err and "internal error" not in err, (argv, err)
    assert code in (0, 2), (argv, code, err)
    if code == 2:
        assert "error:" in err, (argv, err)


def test_fuzz_train(capsys, sandbox, tiny_qwen3):
    tmp, run = sandbox
    fixed = {"--model": [str(tiny_qwen3), "missing", str(run), "afile", "adir"],
             "--data": ["demo", "demo-mc", *PATHS, str(run / "split" / "train.jsonl")],
             "--validation-data": ["demo", *PATHS, str(run / "split" / "validation.jsonl")],
             "--config": [*PATHS, str(run / "config.yaml")], "--output-dir": [*PATHS, str(run), "out"],
             "--hub-split": ["train", "test", ""]}
    base = ["train", "--model", str(tiny_qwen3), "--data", "demo", "--max-length", "256", "--output-dir", "out"]

    @SETTINGS
    @given(argv_for("train", fixed, set(fixed)))
    def run_one(extra):
        check(capsys, base + extra)

    run_one()


def test_fuzz_validate_and_test(capsys, sandbox, tiny_qwen3):
    tmp, run = sandbox
    fixed = {"--model-path": [str(run), *PATHS], "--data": ["demo", "demo-mc", *PATHS],
             "--base-model": [str(tiny_qwen3), "missing", "adir"], "--output-dir": [*PATHS, "out"],
             "--hub-split": ["train", ""]}
    for command in ("validate", "test"):
        known = {k: v for k, v in fixed.items() if k in flags_of(command)}
        fuzz_reader(capsys, command, run, argv_for(command, known, set(known)))


def fuzz_reader(capsys, command: str, run, strategy) -> None:
    @SETTINGS
    @given(strategy, st.lists(TEXT, max_size=2))
    def run_one(extra, texts):
        check(capsys, [command, "--model-path", str(run), *extra, *(texts if command == "test" else [])])

    run_one()


def test_fuzz_merge(capsys, sandbox):
    tmp, run = sandbox
    fixed = {"--model-path": [str(run), *PATHS], "--output-dir": [*PATHS, str(run), str(tmp), "merged"]}

    @SETTINGS
    @given(argv_for("merge", fixed, set(fixed)))
    def run_one(extra):
        check(capsys, ["merge", "--model-path", str(run), "--output-dir", "merged", *extra])
        assert (run / "COMPLETE").is_file()  # whatever the flags, the run is never touched

    run_one()


def test_fuzz_study(capsys, sandbox, monkeypatch, tiny_qwen3):
    import qwen_ft.training as training

    tmp, run = sandbox
    (tmp / "tiny.yaml").write_text(f"output_dir: study\nmodel: {{model: {tiny_qwen3}}}\n")

    def stop(*a, **k):
        raise UserError(STOP)

    monkeypatch.setattr(training, "train", stop)
    (tmp / "bad.yaml").write_text("output_dir: [1, 2\n")
    (tmp / "odd.yaml").write_text("seed: -3\noptimizers: [adamw]\nnot_a_key: 1\n")
    fixed = {"--config": ["demo", *PATHS, "bad.yaml", "odd.yaml"], "--output-dir": [*PATHS, "study"]}

    @SETTINGS
    @given(argv_for("study", fixed, set(fixed)))
    def run_one(extra):
        check(capsys, ["study", "--config", "demo", "--config", "tiny.yaml", *extra])

    run_one()
