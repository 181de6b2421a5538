"""Real-model tier: the embedded SmolLM2-135M on a small real MMLU-Pro split (minutes on a CPU)."""

from __future__ import annotations

import json

import pytest

from qwen_ft.cli import main
from tests.conftest import shared_path

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


def test_smollm2_training_raises_accuracy_on_real_mmlu_pro(tmp_path):
    data = shared_path("data", "mmlu_pro", "test.parquet")
    run = tmp_path / "run"
    assert main(["train", "--model", "smollm2-135m", "--data", str(data), "--max-samples-per-category", "15",
                 "--epochs", "2", "--output-dir", str(run)]) == 0
    assert main(["validate", "--model-path", str(run)]) == 0
    assert main(["validate", "--model-path", str(run), "--baseline"]) == 0
    tuned = json.loads((run / "eval" / "eval.json").read_text())
    base = json.loads((run / "eval-baseline" / "eval.json").read_text())
    assert tuned["valid_pct"] == 100.0 and base["valid_pct"] == 100.0
    assert tuned["n"] == base["n"] == 42
    assert tuned["accuracy"] > base["accuracy"] + 0.1, (tuned["accuracy"], base["accuracy"])
    assert tuned["macro_f1"] > base["macro_f1"]
