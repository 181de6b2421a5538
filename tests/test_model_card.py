"""The run folder's model card (issue 27): Hugging Face metadata, the measured figures of its eval folders with
their split and n, refreshed by validate, and never written over a README the user put there."""

from __future__ import annotations

import json

import yaml

from qwen_ft.cli import main
from qwen_ft.model_card import MARKER
from tests.conftest import copy_run


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_train_writes_a_card_and_validate_refreshes_it_with_the_figures(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "run")
    card = (run / "README.md").read_text()
    meta = front_matter(card)
    mapping = json.loads((run / "label_mapping.json").read_text())
    info = json.loads((run / "run.json").read_text())
    assert meta["library_name"] == "peft" and meta["pipeline_tag"] == "text-classification"
    assert meta["base_model"] == info["base_model_path"] and meta["labels"] == mapping["labels"]
    assert MARKER in card  # the shared fixture may have been validated already: then its figures are there
    assert ("Nothing measured yet" in card) == (not any(run.glob("eval*/eval.json")))
    assert main(["validate", "--model-path", str(run), "--precision", "fp32"]) == 0
    report = json.loads((run / "eval" / "eval.json").read_text())
    card = (run / "README.md").read_text()
    row = next(line for line in card.splitlines() if line.startswith("| `eval/`"))
    assert f"| {report['n']} |" in row and f"{100 * report['accuracy']:.1f} %" in row
    assert "the validation split" in row and "Nothing measured yet" not in card


def test_a_readme_the_user_wrote_is_never_replaced(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "run")
    (run / "README.md").write_text("my notes\n")
    assert main(["validate", "--model-path", str(run), "--precision", "fp32"]) == 0
    assert (run / "README.md").read_text() == "my notes\n"
