"""Held-out groups (--split-by), seeded typo noise (validate --perturb) and typo augmentation (--augment)."""

from __future__ import annotations

import json
import random
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from qwen_ft.cli import main
from qwen_ft.config import DataArgs, TrainConfig
from qwen_ft.data.prepare import prepare
from qwen_ft.errors import UserError
from qwen_ft.perturb import Perturbation, parse_perturbation, perturb_rows, typos
from qwen_ft.runs import RunDir, read_jsonl

DEMO = Path(__file__).resolve().parents[1] / "src" / "qwen_ft" / "data" / "demo_category.jsonl"


def grouped_file(path: Path, n_groups: int = 12, per_group: int = 10, rare_in: str | None = None) -> Path:
    """Synthetic category rows with a `src` column; each group holds rows of several labels. `rare_in`: a
    label 'rare' whose only rows (4) are in that group."""
    labels = ["alpha", "beta", "gamma", "delta"]
    recs = [{"question": f"question {g}-{i} about {labels[(g + i) % 4]} things", "category": labels[(g + i) % 4],
             "src": f"src-{g}"} for g in range(n_groups) for i in range(per_group)]
    if rare_in:
        recs += [{"question": f"rare question {i}", "category": "rare", "src": rare_in} for i in range(4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def demo_grouped_file(path: Path, per_label: int = 6) -> Path:
    """Demo questions (the fixture tokenizer knows their words), `per_label` per label, group src-j for the
    j-th row of each label: every group holds one row of every label."""
    by_label = defaultdict(list)
    for line in DEMO.read_text().splitlines():
        rec = json.loads(line)
        by_label[rec["category"]].append(rec)
    recs = [{**r, "src": f"src-{j}"} for lab in sorted(by_label) for j, r in enumerate(by_label[lab][:per_label])]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


# ----------------------------------------------------------------------------- --split-by

def test_split_by_holds_whole_groups_out_of_training(tmp_path):
    data = DataArgs(data=str(grouped_file(tmp_path / "g.jsonl")), split_by="src", test_fraction=0.25)
    prepared = prepare(data, seed=3)
    s = prepared.splits
    train_groups = {r["group"] for r in s["train"]}
    test_groups = {r["group"] for r in s["test"]}
    assert test_groups and not train_groups & test_groups  # no group on both sides
    assert {r["group"] for r in s["validation"]} <= train_groups  # validation: in-distribution rows only
    assert len(s["test"]) == 30  # 3 of the 12 groups of 10 rows: 25%
    assert {r["label"] for r in s["train"]} == {"alpha", "beta", "gamma", "delta"}
    assert set(Counter(r["label"] for r in s["validation"]).values()) <= {6, 7}  # stratified: 24 rows, 4 labels
    assert prepared.groups == {"column": "src", "test": sorted(test_groups),
                               "train": sorted(train_groups | {r["group"] for r in s["validation"]})}
    assert sum(len(v) for v in s.values()) == 120 and len({r["id"] for v in s.values() for r in v}) == 120
    assert "test holds 3 of 12 groups of src" in prepared.summary()

    again = prepare(data, seed=3)
    assert again.splits == s and again.groups == prepared.groups  # seeded
    drawn = {tuple(prepare(data, seed=k).groups["test"]) for k in range(6)}
    assert len(drawn) > 1  # another seed, other groups


def test_split_by_never_takes_a_labels_training_rows(tmp_path):
    """A label whose only rows are in one group: that group is passed over in every draw."""
    data = DataArgs(data=str(grouped_file(tmp_path / "g.jsonl", rare_in="src-5")), split_by="src",
                    test_fraction=0.3)
    for seed in range(8):
        prepared = prepare(data, seed)
        assert "src-5" not in prepared.groups["test"]
        assert {r["label"] for r in prepared.splits["train"]} == set(prepared.task.labels)
        assert "rare" in prepared.task.labels


def test_split_by_errors(tiny_qwen3, tmp_path, capsys):
    path = grouped_file(tmp_path / "g.jsonl")
    with pytest.raises(UserError) as e:
        prepare(DataArgs(data=str(path), split_by="source"), 0)
    assert "--split-by column 'source' not found" in str(e.value) and "columns found: question, category, src" \
        in str(e.value)
    with pytest.raises(UserError, match="needs --test-fraction > 0"):
        TrainConfig(data=DataArgs(data=str(path), split_by="src", test_fraction=0.0)).validate()
    with pytest.raises(UserError, match="--test-fraction is 0"):
        prepare(DataArgs(data=str(path), split_by="src", test_fraction=0.0), 0)
    one = tmp_path / "one.jsonl"
    one.write_text("".join(json.dumps({"question": f"q{i}", "category": "ab"[i % 2], "src": "x"}) + "\n"
                           for i in range(12)))
    with pytest.raises(UserError, match="needs at least 2"):
        prepare(DataArgs(data=str(one), split_by="src"), 0)
    capsys.readouterr()
    assert main(["train", "--model", str(tiny_qwen3), "--data", str(path), "--split-by", "nope",
                 "--output-dir", str(tmp_path / "r")]) == 2
    assert "columns found: question, category, src" in capsys.readouterr().err


# ----------------------------------------------------------------------------- typo noise

def long_text(n: int = 20000) -> str:
    rng = random.Random(7)
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz     ") for _ in range(n))


def test_typos_are_seeded_and_change_the_stated_fraction():
    rows = [{"id": "r1", "question": long_text(), "label": "x"}]
    for rate in (0.05, 0.10):
        noisy, stats = perturb_rows(rows, Perturbation("typos", rate), seed=0)
        assert perturb_rows(rows, Perturbation("typos", rate), seed=0) == (noisy, stats)  # same seed, same noise
        assert perturb_rows(rows, Perturbation("typos", rate), seed=1)[0] != noisy  # another seed, other noise
        assert abs(stats["chars_changed_fraction"] - rate) < 0.15 * rate, stats
        assert stats == {"kind": "typos", "rate": rate, "seed": 0,
                         "chars_changed_fraction": stats["chars_changed_fraction"]}
        _, edits = typos(rows[0]["question"], rate, random.Random("any"))
        assert abs(edits / len(rows[0]["question"]) - rate) < 0.15 * rate
        n_edits = round(stats["chars_changed_fraction"] * len(rows[0]["question"]))
        assert abs(len(noisy[0]["question"]) - len(rows[0]["question"])) <= n_edits  # one character per edit at most
    assert rows[0]["question"] == long_text()  # the rows given are not modified


def test_typos_rate_zero_is_identity_and_labels_choices_untouched():
    rows = [{"id": f"r{i}", "question": f"What is the answer to question number {i}?", "label": "ABCD"[i % 4],
             "choices": ["one", "two", "three", "four"]} for i in range(40)]
    same, stats = perturb_rows(rows, Perturbation("typos", 0.0), seed=5)
    assert same == rows and stats["chars_changed_fraction"] == 0.0
    noisy, stats = perturb_rows(rows, Perturbation("typos", 0.2), seed=5)
    assert [r["label"] for r in noisy] == [r["label"] for r in rows]
    assert [r["choices"] for r in noisy] == [r["choices"] for r in rows]
    assert [r["id"] for r in noisy] == [r["id"] for r in rows]
    assert sum(a["question"] != b["question"] for a, b in zip(noisy, rows)) > 30
    # per row: the same noise whatever the order or the batch the row comes in
    assert perturb_rows(rows[::-1], Perturbation("typos", 0.2), seed=5)[0] == noisy[::-1]
    assert perturb_rows(rows[7:9], Perturbation("typos", 0.2), seed=5)[0] == noisy[7:9]


@pytest.mark.parametrize("spec", ["typos", "typos:", "typos:x", "typos:1.5", "typos:-0.1", "noise:0.1", "typos:nan"])
def test_bad_perturbation_spec_names_the_form(spec):
    with pytest.raises(UserError) as e:
        parse_perturbation(spec)
    assert "typos:RATE" in str(e.value)


def test_perturbation_spec_parses():
    assert parse_perturbation("typos:0.05") == Perturbation("typos", 0.05)
    assert parse_perturbation(" typos:1 ").rate == 1.0


# ----------------------------------------------------------------------------- --augment

def test_augment_doubles_the_training_split_only():
    plain = prepare(DataArgs(data="demo", max_samples_per_category=10), seed=42)
    aug = prepare(DataArgs(data="demo", max_samples_per_category=10, augment="typos:0.1"), seed=42)
    n = len(plain.splits["train"])
    assert len(aug.splits["train"]) == 2 * n
    assert aug.splits["train"][:n] == plain.splits["train"]
    assert aug.splits["validation"] == plain.splits["validation"] and aug.splits["test"] == plain.splits["test"]
    copies = aug.splits["train"][n:]
    assert [c["id"] for c in copies] == [f"{r['id']}-aug" for r in plain.splits["train"]]
    assert [c["label"] for c in copies] == [r["label"] for r in plain.splits["train"]]
    assert sum(c["question"] != r["question"] for c, r in zip(copies, plain.splits["train"])) > 0.8 * n
    assert prepare(DataArgs(data="demo", max_samples_per_category=10, augment="typos:0.1"), seed=42).splits == \
        aug.splits  # seeded with the run seed
    assert aug.task.labels == plain.task.labels
    with pytest.raises(UserError, match="typos:RATE"):
        TrainConfig(data=DataArgs(augment="typos:2")).validate()


# ----------------------------------------------------------------------------- through the commands

def test_validate_perturb_records_the_noise_in_eval_json(tiny_run, tmp_path, capsys):
    base = ["validate", "--model-path", str(tiny_run), "--precision", "fp32", "--batch-size", "8"]
    assert main([*base, "--output-dir", str(tmp_path / "clean")]) == 0
    assert main([*base, "--perturb", "typos:0.05", "--output-dir", str(tmp_path / "noisy")]) == 0
    assert main([*base, "--perturb", "typos:0", "--perturb-seed", "3", "--output-dir", str(tmp_path / "zero")]) == 0
    clean, noisy, zero = (json.loads((tmp_path / d / "eval.json").read_text()) for d in ("clean", "noisy", "zero"))
    assert "perturb" not in clean
    expected = perturb_rows(RunDir(tiny_run).split("validation"), Perturbation("typos", 0.05), 0)[1]
    assert noisy["perturb"] == expected and expected["chars_changed_fraction"] > 0
    assert zero["perturb"] == {"kind": "typos", "rate": 0.0, "seed": 3, "chars_changed_fraction": 0.0}
    preds = {d: read_jsonl(tmp_path / d / "predictions.jsonl") for d in ("clean", "zero")}
    assert preds["zero"] == preds["clean"]  # rate 0 is the clean evaluation
    assert noisy["n"] == clean["n"]
    capsys.readouterr()
    assert main([*base, "--perturb", "typo:0.05", "--output-dir", str(tmp_path / "bad")]) == 2
    assert "typos:RATE" in capsys.readouterr().err
    assert main([*base, "--perturb-seed", "1", "--output-dir", str(tmp_path / "bad")]) == 2
    assert "--perturb-seed applies to --perturb" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_run_with_split_by_and_augment_keeps_groups_in_its_files(tiny_qwen3, tmp_path):
    from tests.conftest import tiny_train_args

    data = demo_grouped_file(tmp_path / "grouped.jsonl")
    out = tmp_path / "run"
    args = tiny_train_args(tiny_qwen3, out, "--split-by", "src", "--augment", "typos:0.1")
    args[args.index("--data") + 1] = str(data)
    args.remove("--max-samples-per-category")
    args.remove("5")
    assert main(args) == 0
    run = RunDir(out)
    splits = {name: run.split(name) for name in ("train", "validation", "test")}
    assert all("group" in r for rows in splits.values() for r in rows)
    held = json.loads((out / "run.json").read_text())["split_groups"]
    assert held["column"] == "src" and set(held["test"]) == {r["group"] for r in splits["test"]}
    assert not set(held["test"]) & {r["group"] for r in splits["train"] + splits["validation"]}
    originals = [r for r in splits["train"] if not r["id"].endswith("-aug")]
    assert len(splits["train"]) == 2 * len(originals)
    assert not any(r["id"].endswith("-aug") for r in splits["validation"] + splits["test"])
    run.label_mapping()  # the mapping agrees with the split files (extra keys and all)
    assert main(["validate", "--model-path", str(out), "--split", "test", "--precision", "fp32",
                 "--perturb", "typos:0.05", "--output-dir", str(tmp_path / "eval")]) == 0
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert report["split"] == "test" and report["n"] == len(splits["test"]) and report["perturb"]["rate"] == 0.05


# ----------------------------------------------------------------------------- hashes and the study

def test_later_data_fields_off_keep_the_config_hash():
    """Runs and study phases written before --split-by/--augment existed still resume and stay up to date."""
    from qwen_ft.config import config_hash

    cfg = TrainConfig()
    older = cfg.to_dict()
    del older["data"]["split_by"], older["data"]["augment"]
    assert config_hash(cfg) == config_hash(older)
    assert config_hash(TrainConfig(data=DataArgs(augment="typos:0.1"))) != config_hash(cfg)
    assert config_hash(TrainConfig(data=DataArgs(split_by="src"))) != config_hash(cfg)


def test_study_applies_split_by_and_augment_once_in_its_data_phase(tiny_qwen3, tmp_path):
    from qwen_ft.study.config import load_study_config
    from qwen_ft.study.phases import Study, run_study
    from qwen_ft.study.trials import run_config

    data = demo_grouped_file(tmp_path / "grouped.jsonl")
    path = tmp_path / "study.yaml"
    path.write_text(f"""
model: {{model: {tiny_qwen3}, precision: fp32, max_length: 192}}
data: {{data: {data}, split_by: src, augment: "typos:0.1"}}
train: {{batch_size: 8}}
protocol: {{trials: 1, final_seeds: [1], tune_rows: 14, trial_max_steps: 2, final_max_steps: 2, eval_steps: 2,
           curve_rows: 8, target: 0.3}}
optimizers:
  adamw: {{search: {{learning_rate: [1.0e-3, 1.0e-2]}}}}
output_dir: {tmp_path / "s"}
""")
    cfg = load_study_config([path])
    study = run_study(cfg, phases=["data"])
    folder = tmp_path / "s" / "data"
    splits = {name: read_jsonl(folder / f"{name}.jsonl") for name in ("train", "tune", "validation", "test")}
    train_ids = [r["id"] for r in splits["train"]]
    assert len(train_ids) == 2 * sum(not i.endswith("-aug") for i in train_ids)
    assert not any(r["id"].endswith("-aug") for name in ("tune", "validation", "test") for r in splits[name])
    assert {f"{r['id']}-aug" for r in splits["tune"]}.isdisjoint(train_ids)  # a row and its copy: one side
    assert len(splits["test"]) == 14  # one whole group of the six
    run = run_config(Study(cfg), cfg.optimizers["adamw"], {"learning_rate": 1e-3}, 1, 2, tmp_path / "r")
    assert run.data.split_by is None and run.data.augment is None  # the cached splits have them already
    assert study.outcomes[-1]["status"] == "done"
