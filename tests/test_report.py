"""The report on a hand-made study folder with the documented layout (no training)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from qwen_ft.study.plots import PLOTS
from qwen_ft.study.report import write_cross_workload, write_report

N_Q = 50
SEEDS = (0, 1)
# optimizer -> seed -> number of leading questions answered right
RIGHT = {"adamw": {0: 30, 1: 28}, "adabound": {0: 25, 1: 20}}
LRS = {"adamw": [1e-4, 1e-3, 1e-2], "adabound": [3e-4, 3e-3, 3e-2]}
SCORES = {"adamw": [0.40, 0.55, 0.30], "adabound": [0.35, 0.50, 0.45]}


def _write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def make_study(root: Path, demo: bool = True, source: str = "commonsense_qa", scale: float = 1.0) -> Path:
    _write(
        root / "study.json",
        {
            "model": "tiny",
            "task": "multiple_choice",
            "source": source,
            "seed": 0,
            "labels": list("ABCDE"),
            "n_params": 1000,
            "demo": demo,
            "protocol": {
                "trials": 3,
                "sampler": "qmc",
                "final_seeds": list(SEEDS),
                "trial_budget": "20 steps",
                "final_budget": "60 steps",
                "target": 0.5,
                "equivalence_margin": 0.02,
                "tune_rows": 40,
                "curve_every": 10,
                "curve_rows": 20,
            },
            "optimizers": {
                "adamw": {
                    "optimizer": "AdamW",
                    "search": {"learning_rate": {"low": 1e-5, "high": 1e-1, "log": True}},
                    "fixed": {"weight_decay": 0.0},
                },
                "adabound": {
                    "optimizer": "AdaBound",
                    "fixed": {},
                    "search": {
                        "learning_rate": {"low": 1e-5, "high": 1e-1, "log": True},
                        "gamma": {"low": 1e-3, "high": 1e-1, "log": True},
                    },
                },
            },
            "eval": {"split": "validation", "decode": "constrained", "normalize": "none"},
        },
    )
    _write(
        root / "data" / "summary.json",
        {
            "task": "multiple_choice",
            "labels": list("ABCDE"),
            "chance": 0.2,
            "sizes": {"train": 400, "tune": 40, "validation": N_Q, "test": 0},
        },
    )
    for name, acc in (("untrained", 0.30), ("untrained_loglik_token", 0.28)):
        _write(
            root / "baselines" / name / "eval.json",
            {
                "accuracy": acc,
                "accuracy_ci95": [acc - 0.1, acc + 0.1],
                "n": N_Q,
                "chance": 0.2,
                "decode": "loglik" if "loglik" in name else "constrained",
                "normalize": "token",
                "description": name,
            },
        )
    for opt in RIGHT:
        for k, (lr, score) in enumerate(zip(LRS[opt], SCORES[opt])):
            params = {"learning_rate": lr} | ({"gamma": 0.01} if opt == "adabound" else {})
            _write(
                root / "trials" / opt / f"trial-{k}" / "trial.json",
                {
                    "optimizer": opt,
                    "k": k,
                    "params": params,
                    "score": score,
                    "tune_loss": 1.0 - score,
                    "best_step": 20,
                    "steps": 20,
                    "train_seconds": 5.0,
                    "state": "complete",
                },
            )
        for seed in SEEDS:
            run = root / "finals" / opt / f"seed-{seed}"
            right = RIGHT[opt][seed]
            result = {
                "optimizer": opt,
                "seed": seed,
                "params": {"learning_rate": LRS[opt][1]},
                "accuracy": scale * right / N_Q,
                "n": N_Q,
                "best_step": 40 + 10 * seed,
                "steps": 60,
                "train_seconds": 30.0,
                "step_time_s": 0.5 if opt == "adamw" else 0.4,
                "optimizer_state_bytes": 2 * 4 * 300_000 if opt == "adamw" else 3 * 4 * 300_000,
                "eval_seconds": 3.0,
                "samples_per_s": 16.0,
            }
            if opt == "adabound":
                result["adabound_bounds"] = {
                    "lower": 0.01,
                    "upper": 0.012 if seed == 0 else 0.03,
                    "ratio": 1.2 if seed == 0 else 3.0,
                }
            _write(run / "result.json", result)
            preds = [
                {
                    "id": f"q{i}",
                    "label": "A",
                    "pred": "A" if i < right else "B",
                    "correct": i < right,
                    "probability": 0.6,
                }
                for i in range(N_Q)
            ]
            (run / "eval").mkdir(parents=True)
            (run / "eval" / "predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in preds))
            lines = [
                {
                    "type": "step",
                    "step": s,
                    "epoch": s / 60,
                    "loss": 2.0 - s / 60 - 0.1 * seed,
                    "grad_norm": 1.0,
                    "lr": 1e-3,
                }
                for s in range(1, 61)
            ]
            top = 0.55 if opt == "adamw" else 0.45  # adamw reaches the 0.5 target at step 30, adabound never
            lines += [
                {
                    "type": "curve",
                    "step": s,
                    "seconds": s * 0.5,
                    "accuracy": min(top, 0.2 + s / 100 + 0.01 * seed),
                    "n": 20,
                }
                for s in range(10, 61, 10)
            ]
            text = "".join(json.dumps(r) + "\n" for r in lines)
            (run / "metrics.jsonl").write_text(text + ('{"type": "curve", "st' if seed == 1 else ""))
    return root


def _csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = make_study(tmp_path_factory.mktemp("study"))
    return root, write_report(root)


def test_every_file_is_written(study):
    root, out = study
    res = root / "results"
    for name in ("trials.csv", "results.csv", "summary.csv", "pairwise.csv", "report.md", *PLOTS):
        assert (res / name).is_file(), name
    assert sorted(out["files"]) == sorted(
        ["trials.csv", "results.csv", "summary.csv", "pairwise.csv", "report.md", *PLOTS]
    )
    for name in PLOTS:
        data = (res / name).read_bytes()
        assert data[:4] == b"\x89PNG" and len(data) > 5_000, name
        assert f"]({name})" in (res / "report.md").read_text()
    assert (root / "notebooks" / "analysis.ipynb").is_file()


def test_tables(study):
    root, _ = study
    res = root / "results"
    trials = _csv(res / "trials.csv")
    assert len(trials) == 6 and {r["optimizer"] for r in trials} == {"adamw", "adabound"}
    assert [float(r["learning_rate"]) for r in trials[:3]] == LRS["adamw"]
    rows = _csv(res / "results.csv")
    assert [(r["optimizer"], int(r["seed"])) for r in rows] == [
        ("adamw", 0),
        ("adamw", 1),
        ("adabound", 0),
        ("adabound", 1),
    ]
    assert [float(r["accuracy"]) for r in rows] == [0.6, 0.56, 0.5, 0.4]
    assert [r["ttt_step"] for r in rows] == [
        "30",
        "30",
        "",
        "",
    ]  # 0.2 + 30 / 100 = 0.5 >= target; adabound never
    assert [float(r["best_step"]) for r in rows] == [40, 50, 40, 50]
    summary = {r["optimizer"]: r for r in _csv(res / "summary.csv")}
    assert float(summary["adamw"]["mean"]) == pytest.approx(0.58)
    assert float(summary["adamw"]["sd"]) == pytest.approx(np.std([0.6, 0.56], ddof=1), abs=1e-6)
    assert float(summary["adamw"]["acc_seed_1"]) == 0.56 and summary["adabound"]["reached"] == "0/2"
    lo, hi = float(summary["adamw"]["ci_low"]), float(summary["adamw"]["ci_high"])
    assert lo < 0.58 < hi
    pairs = _csv(res / "pairwise.csv")
    assert len(pairs) == 1 and (pairs[0]["a"], pairs[0]["b"]) == ("adamw", "adabound")
    # per-question seed means: adamw 1 (q < 28), .5 (28, 29); adabound 1 (q < 20), .5 (20..24)
    # d_q: 5 x .5 + 3 x 1 + 2 x .5 = 6.5 over 50 questions = 13 points (= 58 % - 45 %)
    assert float(pairs[0]["diff_points"]) == pytest.approx(13.0)
    assert float(pairs[0]["p_holm"]) == float(pairs[0]["p"])  # one pair: Holm changes nothing


def test_report_text(study):
    root, _ = study
    md = (root / "results" / "report.md").read_text()
    verdict = _csv(root / "results" / "pairwise.csv")[0]["verdict"]
    assert verdict.startswith("adamw vs adabound: +13.0 points, 95 % CI ") and verdict.endswith(
        "adamw better"
    )
    assert f"- {verdict}" in md
    assert "too small for a verdict" in md and "**This is the demo study" in md
    assert "**did not close**" in md and "ratio 3" in md  # seed 1 ends at ratio 3
    assert "3 trials each" in md and "adamw 3 (3 complete), adabound 3 (3 complete)" in md
    assert "seed 0 step 40/60" in md and "tuning split" in md
    assert "untrained, log-likelihood / token" in md and "| chance | 20.0 %" in md
    assert "indistinguishable" not in md


def test_no_demo_warning_and_closed_bounds(tmp_path):
    root = make_study(tmp_path, demo=False)
    for seed in SEEDS:
        path = root / "finals" / "adabound" / f"seed-{seed}" / "result.json"
        r = json.loads(path.read_text())
        r["adabound_bounds"] = {"lower": 0.01, "upper": 0.011, "ratio": 1.1}
        path.write_text(json.dumps(r))
    write_report(root, n_boot=200)
    md = (root / "results" / "report.md").read_text()
    assert "too small for a verdict" not in md and "**closed**" in md


def test_verdict_matches_stats(study):
    """pairwise.csv against figures worked out by hand from RIGHT (50 questions, 2 seeds each).

    Per question, the seed-averaged difference d_q (adamw - adabound) is 0 for q < 20, 0.5 for 20..24,
    1 for 25..27, 0.5 for 28, 29 and 0 from 30 on: mean 6.5 / 50 = 0.13, sum of squares 7 x 0.25 + 3 = 4.75,
    sample variance (4.75 - 50 x 0.13^2) / 49 = 0.079694, standard error sqrt(0.079694 / 50) = 0.039923.
    Paired t = 0.13 / 0.039923 = 3.2562 on 49 degrees of freedom: two-sided p = 0.0020518. TOST within
    +-0.02: t = 0.15 / se = 3.757 (p 0.00023) and t = 0.11 / se = 2.755 (p 0.99590, the larger). One pair:
    Holm leaves both. McNemar on seed 0: adamw alone right on q 25..29 (5), adabound alone on none:
    p = 2 x 0.5^5 = 0.0625. Verdict: adjusted p 0.0021 < 0.05, adamw better; TOST p 0.996 adds no margin
    clause. The bootstrap CI is not worked out by hand (an independent resampling gives about 3..26): it must
    hold 13 points, exclude 0, and be wider than the question-only normal interval (2 x 1.96 x 3.95 = 15.5
    points), since the seeds are resampled too.
    """
    import re

    root, _ = study
    (pair,) = _csv(root / "results" / "pairwise.csv")
    assert (pair["a"], pair["b"], int(pair["n_questions"])) == ("adamw", "adabound", 50)
    assert float(pair["diff_points"]) == pytest.approx(13.0)
    # the CSV holds 6 decimals
    assert float(pair["p"]) == pytest.approx(0.0020518, abs=1e-6)
    assert float(pair["p_holm"]) == pytest.approx(0.0020518, abs=1e-6)
    assert float(pair["tost_p"]) == pytest.approx(0.9958951, abs=1e-6)
    assert float(pair["tost_p_holm"]) == pytest.approx(0.9958951, abs=1e-6)
    assert float(pair["mcnemar_p"]) == pytest.approx(0.0625)
    assert (int(pair["a_right_b_wrong"]), int(pair["b_right_a_wrong"])) == (5, 0)
    lo, hi = float(pair["ci_low_points"]), float(pair["ci_high_points"])
    assert 0 < lo < 13 < hi < 30 and 15.5 < hi - lo < 35
    match = re.fullmatch(r"adamw vs adabound: \+13\.0 points, 95 % CI (-?\d+\.\d)\.\.(-?\d+\.\d), "
                         r"adjusted p = 0\.0021: adamw better", pair["verdict"])
    assert match, pair["verdict"]
    assert abs(float(match[1]) - lo) <= 0.05 + 1e-6 and abs(float(match[2]) - hi) <= 0.05 + 1e-6


def test_finals_on_other_questions_are_an_error(tmp_path):
    root = make_study(tmp_path)
    path = root / "finals" / "adabound" / "seed-1" / "eval" / "predictions.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(reversed(lines)) + "\n")
    with pytest.raises(ValueError, match="same rows"):
        write_report(root, n_boot=100)


def test_cross_workload(tmp_path):
    a = make_study(tmp_path / "csqa")
    b = make_study(tmp_path / "mmlu", source="mmlu_pro", scale=0.5)
    path = b / "finals" / "adabound" / "seed-0" / "result.json"
    r = json.loads(path.read_text())
    r["accuracy"] = 0.9  # adabound wins this workload: mean (0.9 + 0.2) / 2 = 0.55 vs adamw 0.29
    path.write_text(json.dumps(r))
    out = write_cross_workload([a, b], tmp_path / "cross")
    assert out["workloads"] == ["commonsense_qa (multiple_choice)", "mmlu_pro (multiple_choice)"]
    assert dict(out["profile"]["adamw"])[0.0] == 0.5 and dict(out["profile"]["adabound"])[0.0] == 0.5
    assert len(_csv(tmp_path / "cross" / "cross_workload.csv")) == 4
    assert (tmp_path / "cross" / "performance_profile.png").stat().st_size > 5_000
    assert "performance_profile.png" in (tmp_path / "cross" / "cross_workload.md").read_text()


def test_notebook_executes(study):
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    import nbformat

    root, _ = study
    nb = nbformat.read(root / "notebooks" / "analysis.ipynb", as_version=4)
    nbclient.NotebookClient(
        nb, timeout=120, resources={"metadata": {"path": str(root / "notebooks")}}
    ).execute()
    images = [
        o
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if "image/png" in o.get("data", {})
    ]
    assert len(images) == len(PLOTS)
    assert any(
        "adamw better" in "".join(o.get("text", ""))
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
    )
