"""Evaluation off the training distribution: balanced accuracy, slices, risk-coverage and the fitted abstention
threshold, the near-duplicate screen, cross-validation folds by group, class-balanced sampling and the
adapter scale (WiSE-FT interpolation toward the base)."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from qwen_ft import selective
from qwen_ft.cli import main
from qwen_ft.data import dedup
from qwen_ft.data.splits import group_folds, oversample
from qwen_ft.inference.engine import Classifier
from qwen_ft.metrics import balanced_accuracy, classification_report, length_band, slice_report
from qwen_ft.runs import RunDir
from tests.conftest import copy_run

# ----------------------------------------------------------------------------- metrics by hand

CONF = [0.9, 0.8, 0.8, 0.7, 0.6, 0.5, 0.5, 0.5, 0.3, 0.2]
HIT = [1, 1, 0, 1, 0, 1, 1, 0, 0, 0]
# k most confident rows, ties shared as a block: [0.8, 0.8] is one block (acc 1/2), [0.5 x3] another (2/3)
BY_HAND = [1, (1 + 0.5) / 2, 2 / 3, 3 / 4, 3 / 5, (3 + 2 / 3) / 6, (3 + 4 / 3) / 7, 5 / 8, 5 / 9, 5 / 10]


def test_constant_predictor_gets_balanced_accuracy_one_over_k_and_aurc_its_error():
    golds = ["a"] * 70 + ["b"] * 20 + ["c"] * 10
    preds = ["a"] * 100
    report = classification_report(golds, preds, ["a", "b", "c"])
    assert report["accuracy"] == 0.7 and report["balanced_accuracy"] == pytest.approx(1 / 3)
    # a constant confidence orders nothing: every coverage has the plain accuracy, whatever the row order
    shuffled = np.random.default_rng(0).permutation([g == p for g, p in zip(golds, preds)])
    rc = selective.risk_coverage([0.42] * 100, shuffled)
    assert rc["aurc"] == pytest.approx(1 - 0.7)
    assert all(point["accuracy"] == pytest.approx(0.7) for point in rc["curve"])


def test_risk_coverage_of_ten_rows_equals_the_hand_computed_curve():
    assert selective.accuracy_by_coverage(CONF, HIT) == pytest.approx(BY_HAND)
    # the row order does not matter, only the confidences
    order = [9, 3, 0, 7, 1, 5, 2, 8, 4, 6]
    assert selective.accuracy_by_coverage([CONF[i] for i in order], [HIT[i] for i in order]) == pytest.approx(BY_HAND)
    rc = selective.risk_coverage(CONF, HIT)
    assert rc["aurc"] == pytest.approx(np.mean([1 - a for a in BY_HAND]), abs=1e-6)
    assert rc["accuracy_at_coverage"] == pytest.approx({"0.8": 5 / 8, "0.9": 5 / 9, "0.95": 5 / 10}, abs=1e-6)
    assert len(rc["curve"]) == 100 and rc["curve"][9]["coverage"] == 0.1 and rc["curve"][9]["accuracy"] == 1.0
    assert rc["curve"][-1]["accuracy"] == 0.5


def test_the_fitted_threshold_gives_exactly_the_stated_coverage_on_its_rows():
    fit = selective.fit_threshold(CONF, HIT, 0.7)
    # >= 0.9 covers 1 row (acc 1), >= 0.8 3 (2/3), >= 0.7 4 (3/4: the lowest that reaches 0.7), >= 0.6 5 (3/5)
    assert (fit["threshold"], fit["coverage"], fit["covered_accuracy"]) == (0.7, 0.4, 0.75)
    rng = np.random.default_rng(1)
    conf = np.round(rng.uniform(0.2, 1, 500), 6)
    hit = rng.uniform(0, 1, 500) < conf
    for target in (0.6, 0.8, 0.95):
        fit = selective.fit_threshold(conf, hit, target)
        keep = selective.covered(conf, fit["threshold"])
        assert keep.mean() == pytest.approx(fit["coverage"]) and hit[keep].mean() >= target
        lower = conf[conf < fit["threshold"]]
        if len(lower):  # every lower threshold misses the target
            assert all(hit[conf >= t].mean() < target for t in np.unique(lower))
    assert selective.fit_threshold([0.5, 0.4], [False, False], 0.9)["threshold"] is None


def test_slices_and_length_bands():
    assert [length_band(n) for n in (0, 31, 32, 63, 64, 127, 128, 5000)] == \
        ["<32", "<32", "32-64", "32-64", "64-128", "64-128", ">=128", ">=128"]
    table = slice_report(["s1", "s2", "s1", "s1"], ["a", "b", "a", "b"], ["a", "a", "b", "b"])
    assert list(table) == ["s1", "s2"] and table["s1"]["n"] == 3 and table["s1"]["accuracy"] == pytest.approx(2 / 3)
    assert table["s1"]["balanced_accuracy"] == pytest.approx((1 / 2 + 1) / 2) and table["s2"]["accuracy"] == 0
    lo, hi = table["s1"]["accuracy_ci95"]
    assert lo < 2 / 3 < hi
    assert balanced_accuracy(["a", "a", "b"], ["a", "a", "a"]) == 0.5


# ----------------------------------------------------------------------------- the near-duplicate screen

QUESTION = ("Which of the following best describes the role of ribosomes in the synthesis of proteins inside "
            "eukaryotic cells during the translation of messenger RNA?")


def test_a_row_and_its_near_copy_are_found_and_a_distinct_question_is_not():
    copy = {"question": QUESTION.replace("eukaryotic", "prokaryotic")}  # one word changed
    same = {"question": "  " + QUESTION.upper().replace("?", " ?") + " "}
    other = {"question": "Which of the following best describes the time complexity of heapsort in the worst case?"}
    index = dedup.Index([{"question": QUESTION}])
    assert index.match(copy) == "near" and index.match(same) == "exact" and index.match(other) is None
    splits = {"train": [{"question": QUESTION, "label": "x"}], "validation": [copy, other, same],
              "test": [other, {"question": "Name the capital of France and the river that crosses it."}]}
    counts, matches = dedup.screen(splits)
    assert counts["validation"] == {"n": 3, "exact": 1, "near": 1, "against": ["train"]}
    assert counts["test"]["exact"] == 1  # `other` is in validation: the test split is screened against it too
    kept = dedup.drop(splits, matches, "near")
    assert kept["validation"] == [other] and len(kept["test"]) == 1 and kept["train"] == splits["train"]
    assert dedup.drop(splits, matches, "exact")["validation"] == [copy, other]


# ----------------------------------------------------------------------------- folds, balance

def test_cross_validation_folds_hold_out_whole_groups_and_cover_every_group_once():
    rng = np.random.default_rng(0)
    rows = [{"group": f"g{int(g)}", "label": "x"} for g in rng.zipf(1.5, 2000) % 37]
    folds = group_folds(rows, 4, seed=3)
    every = [g for f in folds for g in f]
    assert sorted(every) == sorted({r["group"] for r in rows}) and len(every) == len(set(every))
    sizes = Counter(r["group"] for r in rows)
    loads = [sum(sizes[g] for g in f) for f in folds]
    assert max(loads) - min(loads) <= max(sizes.values())
    assert folds == group_folds(rows, 4, seed=3)


def test_oversampling_gives_every_label_as_many_rows_as_the_largest():
    rows = [{"id": f"r{i}", "label": lab, "question": str(i)} for i, lab in enumerate("a" * 10 + "b" * 3 + "c" * 7)]
    out = oversample(rows, seed=0)
    assert Counter(r["label"] for r in out) == {"a": 10, "b": 10, "c": 10}
    assert out[:20] == rows and len({r["id"] for r in out}) == 30
    b_questions = Counter(r["question"] for r in out if r["label"] == "b")
    assert sorted(b_questions.values()) == [3, 3, 4]  # three whole passes, then one more row


# ----------------------------------------------------------------------------- on a run

def test_adapter_scale_zero_is_the_base_model_and_one_the_run_bit_for_bit(tiny_run):
    rows = RunDir(tiny_run).split("validation")
    base, _ = Classifier.load(tiny_run, precision="fp32", adapter=False).classify(rows, decode="exact", top_k=3)
    trained, _ = Classifier.load(tiny_run, precision="fp32").classify(rows, decode="exact", top_k=3)
    zero, _ = Classifier.load(tiny_run, precision="fp32", adapter_scale=0.0).classify(rows, decode="exact", top_k=3)
    one, _ = Classifier.load(tiny_run, precision="fp32", adapter_scale=1.0).classify(rows, decode="exact", top_k=3)
    half, _ = Classifier.load(tiny_run, precision="fp32", adapter_scale=0.5).classify(rows, decode="exact", top_k=3)
    assert [r["scores"] for r in zero] == [r["scores"] for r in base]
    assert [r["scores"] for r in one] == [r["scores"] for r in trained]
    assert [r["scores"] for r in base] != [r["scores"] for r in trained]
    assert [r["scores"] for r in half] not in ([r["scores"] for r in base], [r["scores"] for r in trained])


def test_validate_slices_threshold_then_predict_abstains_as_eval_json_predicted(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "run")
    rows = RunDir(run).split("validation") + RunDir(run).split("test")
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"question": r["question"], "category": r["label"], "id": r["id"],
                                        "src": f"s{i % 3}"}) + "\n" for i, r in enumerate(rows)))
    args = ["validate", "--model-path", str(run), "--data", str(data), "--precision", "fp32", "--output-dir",
            str(tmp_path / "eval"), "--slice-by", "src"]
    assert main(args) == 0
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    predictions = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").open()]
    # a target between the full-coverage accuracy and that of the most confident rows
    target = round((report["accuracy"] + max(report["selective"]["curve"][0]["accuracy"], report["accuracy"])) / 2, 3)
    target = min(max(target, report["accuracy"] + 1e-3), 1.0)
    assert main([*args, "--fit-threshold", "--target-accuracy", str(target)]) == 0
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert set(report["slices"]) == {"question_tokens", "src"} and sum(s["n"] for s in report["slices"]["src"].values()) == len(rows)
    assert report["balanced_accuracy"] == pytest.approx(balanced_accuracy([p["label"] for p in predictions],
                                                                          [p["pred"] for p in predictions]))
    fitted = json.loads((run / "threshold.json").read_text())
    assert fitted["threshold"] is not None and fitted == {"written_by": "qwen-ft", **report["threshold"]}

    out = tmp_path / "labels.jsonl"
    assert main(["predict", "--model-path", str(run), "--input", str(data), "--output", str(out),
                 "--precision", "fp32", "--id-column", "id"]) == 0
    got = [json.loads(line) for line in out.open()]
    gold = {r["id"]: r["label"] for r in rows}
    covered = [g for g in got if not g["abstained"]]
    assert 1 - len(covered) / len(got) == pytest.approx(1 - fitted["coverage"], abs=1e-6)
    assert sum(g["label"] == gold[g["id"]] for g in covered) / len(covered) == pytest.approx(fitted["covered_accuracy"],
                                                                                          abs=1e-6)
    fallback = selective.fallback_label(Classifier.load(run, precision="fp32").labels)
    assert all(g["label"] == fallback and g["model_label"] != "" for g in got if g["abstained"])
    # --min-confidence overrides the file: 0 never abstains
    out0 = tmp_path / "labels0.jsonl"
    assert main(["predict", "--model-path", str(run), "--input", str(data), "--output", str(out0),
                 "--precision", "fp32", "--min-confidence", "0"]) == 0
    assert not any(json.loads(line)["abstained"] for line in out0.open())


def test_abstention_refusals(tiny_run, tmp_path, capsys):
    run = copy_run(tiny_run, tmp_path / "run")
    assert main(["validate", "--model-path", str(run), "--fit-threshold"]) == 2
    assert "--target-accuracy" in capsys.readouterr().err
    assert main(["validate", "--model-path", str(run), "--adapter-scale", "1.5"]) == 2
    assert "--adapter-scale must be a number in [0, 1]" in capsys.readouterr().err
    (run / "threshold.json").write_text(json.dumps({"threshold": float("nan"), "decode": "exact", "normalize": "none"}))
    assert main(["test", "--model-path", str(run), "hello"]) == 2
    assert "threshold must be a probability" in capsys.readouterr().err
