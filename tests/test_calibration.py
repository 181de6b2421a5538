"""Calibration: ECE and reliability bins by hand and on synthetic sets, temperature scaling (lower NLL, same
argmax), and `validate --calibrate` -> calibration.json -> calibrated probabilities in every consumer."""

from __future__ import annotations

import json
import math
import re
import time

import numpy as np
import pytest

from qwen_ft.cli import main
from qwen_ft.inference import calibration as calib
from qwen_ft.inference.decoding import _calibrated, _ranked
from qwen_ft.inference.engine import Classifier
from qwen_ft.run_checks import check_calibration
from qwen_ft.runs import RunDir
from tests.conftest import copy_run


def synthetic(n: int = 3000, k: int = 4, sharpen: float = 5.0, seed: int = 0):
    """Rows whose gold label is drawn from softmax(z): z is calibrated, `sharpen` * z overconfident."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.0, size=(n, k))
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    gold = np.array([rng.choice(k, p=row) for row in p])
    labels = [f"l{j}" for j in range(k)]
    scores = [{"labels": labels, "values": (sharpen * row).tolist(), "groups": list(range(k))} for row in z]
    golds = [labels[g] for g in gold]
    correct = [int(np.argmax(row)) == g for row, g in zip(z, gold)]
    return scores, golds, correct


def test_ece_by_hand():
    # 0.9, 0.9 fall in (13/15, 14/15], 0.3 in (4/15, 5/15], 0 in the first bin
    ece, bins = calib.reliability([0.9, 0.9, 0.3, 0.0], [True, False, False, False])
    assert ece == pytest.approx(2 / 4 * abs(0.5 - 0.9) + 1 / 4 * 0.3 + 1 / 4 * 0.0)
    assert len(bins) == 15 and sum(b["count"] for b in bins) == 4
    assert bins[13]["count"] == 2 and bins[13]["accuracy"] == 0.5 and bins[13]["confidence"] == 0.9
    assert bins[4]["count"] == 1 and bins[0]["count"] == 1 and bins[1]["accuracy"] is None
    assert bins[0]["lower"] == 0 and bins[-1]["upper"] == 1


def test_ece_of_a_calibrated_set_is_near_zero_and_of_an_overconfident_one_larger():
    rng = np.random.default_rng(1)
    conf = rng.uniform(0.25, 1.0, 50_000)
    calibrated = rng.uniform(size=conf.size) < conf
    overconfident = rng.uniform(size=conf.size) < conf - 0.2
    ece_ok, ece_over = calib.ece(conf, calibrated), calib.ece(conf, overconfident)
    assert ece_ok < 0.01 and ece_over == pytest.approx(0.2, abs=0.02)
    print(f"ECE calibrated {ece_ok:.4f}, overconfident by 0.2 {ece_over:.4f}")


def test_temperature_scaling_lowers_the_nll_and_never_changes_the_argmax():
    scores, golds, correct = synthetic(sharpen=5.0)
    fit = calib.fit(scores, golds, correct)
    assert fit["temperature"] == pytest.approx(5.0, rel=0.15)  # recovers the sharpening
    assert fit["nll_after"] < fit["nll_before"] and fit["ece_after"] < fit["ece_before"]
    assert fit["ece_cross_fitted"] < fit["ece_before"] and len(fit["cross_fit_temperatures"]) == 2
    true = calib.nll(*calib.score_matrix([{**s, "values": [v / 5 for v in s["values"]]} for s in scores], golds))
    assert fit["nll_after"] == pytest.approx(true, abs=0.01)
    for s in scores:
        for t in (fit["temperature"], 0.05, 50.0):
            assert np.argmax(calib.probabilities(s, t)) == np.argmax(s["values"])
    # an underconfident model gets T < 1
    under = calib.fit(*synthetic(sharpen=0.3, n=1500))
    assert under["temperature"] < 1 and under["nll_after"] < under["nll_before"]
    print(f"T {fit['temperature']:.3f}: NLL {fit['nll_before']:.4f} -> {fit['nll_after']:.4f} (true {true:.4f}), "
          f"ECE {fit['ece_before']:.4f} -> {fit['ece_after']:.4f}, cross-fitted {fit['ece_cross_fitted']:.4f}")


def test_shared_first_tokens_share_one_softmax_term_and_the_forced_prediction_stays():
    # constrained decoding: "computer science" and "computer vision" start with one token (group 7)
    scores = {"labels": ["cs", "cv", "law"], "values": [2.0, 2.0, 0.0], "groups": [7, 7, 3]}
    p = calib.probabilities(scores, 1.0)
    assert p[0] == p[1] == pytest.approx(1 / (1 + math.exp(-2))) and p[2] == pytest.approx(1 - p[0])
    values, gold = calib.score_matrix([scores, scores], ["cv", "law"])
    assert values.shape == (2, 2) and gold.tolist() == [0, 1]
    assert calib.nll(values, gold) == pytest.approx(-(math.log(p[1]) + math.log(p[2])) / 2)
    # the trie chose "cv" (second of the tied pair): calibration keeps it first
    res = {**_ranked(scores["labels"], p, 3, first=1), "scores": scores}
    cal = _calibrated(res, 3.0, 3)
    assert res["pred"] == cal["pred"] == "cv" and cal["top"][0][0] == "cv"
    assert cal["raw_probability"] == res["probability"] and cal["probability"] < res["probability"]


def test_calibration_json_is_checked():
    for bad in (-1, 0, 5e-324, 1e-300, 0.049, 20.5, float("nan"), float("inf"), True, "1.0"):
        with pytest.raises(Exception, match=r"temperature must be a number in \[0.05, 20\]"):
            check_calibration({"temperature": bad, "decode": "exact", "normalize": "none"}, "calibration.json")
    for fine in (0.05, 1.0, 20):
        check_calibration({"temperature": fine, "decode": "exact", "normalize": "none"}, "calibration.json")
    with pytest.raises(Exception, match="decode must be"):
        check_calibration({"temperature": 1.5, "decode": "free", "normalize": "none"}, "calibration.json")


def test_validate_calibrate_then_every_consumer_reports_calibrated_probabilities(tiny_run, tmp_path, capsys):
    run = copy_run(tiny_run, tmp_path / "run")
    rows = RunDir(run).split("validation") + RunDir(run).split("test")
    raw, raw_stats = Classifier.load(run, precision="fp32").classify(rows, decode="exact", top_k=3)
    assert raw_stats["temperature"] is None and all(r["raw_probability"] == r["probability"] for r in raw)

    assert main(["validate", "--model-path", str(run), "--calibrate", "--decode", "exact", "--precision", "fp32",
                 "--output-dir", str(tmp_path / "eval")]) == 0
    cal = json.loads((run / "calibration.json").read_text())
    assert set(cal) == {"written_by", "temperature", "fitted_on", "n", "decode", "normalize", "precision",
                        "nll_before", "nll_after", "ece_before", "ece_after", "ece_cross_fitted",
                        "cross_fit_temperatures", "n_bins", "adapter_scale"}
    assert cal["fitted_on"] == "split:validation" and cal["n"] == len(RunDir(run).split("validation"))
    assert (cal["decode"], cal["normalize"]) == ("exact", "none") and cal["nll_after"] <= cal["nll_before"]
    t = cal["temperature"]
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    section = report["calibration"]
    assert section["temperature"] == t and section["fitted_on_these_rows"] and section["fit"]["temperature"] == t
    assert section["ece_raw"] == cal["ece_before"] and section["ece"] == cal["ece_after"]
    assert len(section["bins"]) == 15 and sum(b["count"] for b in section["bins"]) == cal["n"]
    assert (tmp_path / "eval" / "reliability.png").stat().st_size > 0
    print(f"tiny run: T {t:.4f} on {cal['n']} rows, NLL {cal['nll_before']:.4f} -> {cal['nll_after']:.4f}, "
          f"ECE {cal['ece_before']:.4f} -> {cal['ece_after']:.4f} (cross-fitted {cal['ece_cross_fitted']})")

    # the engine: calibrated probability and top, the same predictions, raw_probability = the old probability
    clf = Classifier.load(run, precision="fp32")
    assert clf.calibration["temperature"] == t
    got, stats = clf.classify(rows, decode="exact", top_k=3)
    assert stats["temperature"] == t
    assert [r["pred"] for r in got] == [r["pred"] for r in raw]
    assert [r["raw_probability"] for r in got] == [r["probability"] for r in raw]
    for g in got:
        expected = calib.probabilities(g["scores"], t)
        assert g["probability"] == round(max(expected), 6) and g["top"][0] == [g["pred"], g["probability"]]
        assert g["top"][0][0] == g["pred"]
    assert any(g["probability"] != r["probability"] for g, r in zip(got, raw))
    # another scoring than the one fitted: raw probabilities
    other, other_stats = clf.classify(rows, decode="constrained")
    assert other_stats["temperature"] is None and all(r["probability"] == r["raw_probability"] for r in other)

    # validate (not fitting) applies it and records it; eval.json's ECE raw vs calibrated
    assert main(["validate", "--model-path", str(run), "--split", "test", "--decode", "exact", "--precision", "fp32",
                 "--output-dir", str(tmp_path / "eval-test")]) == 0
    section = json.loads((tmp_path / "eval-test" / "eval.json").read_text())["calibration"]
    assert section["temperature"] == t and not section["fitted_on_these_rows"] and "bins_raw" in section
    assert {"ece", "ece_raw", "nll", "nll_raw"} <= set(section)

    # test (decode exact): the calibrated value printed, the raw one beside it
    capsys.readouterr()
    assert main(["test", "--model-path", str(run), "--precision", "fp32", rows[0]["question"]]) == 0
    printed = re.search(r"\(p=([0-9.]+), raw ([0-9.]+)\)", capsys.readouterr().out)
    assert printed, "test prints the calibrated probability and the raw one"
    assert float(printed[1]) == pytest.approx(got[0]["probability"], abs=2e-3)
    assert float(printed[2]) == pytest.approx(raw[0]["probability"], abs=2e-3)

    # predict: a raw_probability column
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps({"text": r["question"]}) + "\n" for r in rows))
    assert main(["predict", "--model-path", str(run), "--input", str(src), "--output", str(out), "--decode", "exact",
                 "--precision", "fp32", "--batch-size", "16"]) == 0
    preds = [json.loads(x) for x in out.read_text().splitlines()]
    assert [p["label"] for p in preds] == [g["pred"] for g in got]
    for p, g, r in zip(preds, got, raw):
        assert p["probability"] == pytest.approx(g["probability"], abs=1e-4)
        assert p["raw_probability"] == pytest.approx(r["probability"], abs=1e-4)

    # serve: the response carries both
    from fastapi.testclient import TestClient

    from qwen_ft.inference.serve import Limits, create_app

    with TestClient(create_app(lambda: clf, limits=Limits(decode="exact", max_wait_ms=1))) as client:
        for _ in range(600):
            if client.get("/health").status_code == 200:
                break
            time.sleep(0.05)
        body = client.post("/v1/classify", json={"texts": [r["question"] for r in rows[:3]], "top_k": 2}).json()
    for served, g, r in zip(body["results"], got, raw):
        assert served["label"] == g["pred"]
        assert served["probability"] == pytest.approx(g["probability"], abs=1e-4)
        assert served["raw_probability"] == pytest.approx(r["probability"], abs=1e-4)

    # merge copies it: the merged folder reports the same calibrated probabilities
    from qwen_ft.merge import merge_run

    merge_run(run, tmp_path / "merged", dtype="fp32")
    merged, _ = Classifier.load(tmp_path / "merged", precision="fp32").classify(rows, decode="exact")
    assert [m["pred"] for m in merged] == [g["pred"] for g in got]
    for m, g in zip(merged, got):
        assert m["probability"] == pytest.approx(g["probability"], abs=1e-4)

    # a second --calibrate replaces its own file
    assert main(["validate", "--model-path", str(run), "--calibrate", "--precision", "fp32",
                 "--output-dir", str(tmp_path / "eval2")]) == 0
    assert json.loads((run / "calibration.json").read_text())["decode"] == "constrained"


def test_calibrate_refusals(tiny_run, tmp_path, capsys):
    run = copy_run(tiny_run, tmp_path / "run")
    base = ["validate", "--model-path", str(run), "--calibrate", "--precision", "fp32",
            "--output-dir", str(tmp_path / "eval")]
    assert main([*base, "--decode", "free"]) == 2
    assert "--calibrate needs probabilities, and --decode free gives none" in capsys.readouterr().err
    assert main([*base, "--baseline"]) == 2
    assert "not the --baseline" in capsys.readouterr().err
    assert not (run / "calibration.json").exists() and not (tmp_path / "eval").exists()
    (run / "calibration.json").write_text('{"temperature": 2.0, "note": "mine"}\n')
    assert main(base) == 2
    assert "was not written by `qwen-ft validate --calibrate`" in capsys.readouterr().err
    assert json.loads((run / "calibration.json").read_text())["note"] == "mine"
