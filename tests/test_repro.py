"""Same seed + same config -> the same losses and the same adapter on CPU; a prompt over --max-length is
truncated in its question only, and the run counts and reports how many were."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from qwen_ft.cli import main
from qwen_ft.encoding import IGNORE, PromptEncoder
from qwen_ft.models import load_tokenizer
from qwen_ft.tasks import CategoryTask
from tests.conftest import tiny_train_args

# dropout on, so that the RNG stream matters too; --max-length 96 truncates a few demo questions
EXTRA = ("--lora-dropout", "0.1", "--learning-rate", "5e-3", "--max-length", "96", "--seed", "3")


def step_losses(run) -> list[tuple]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["type"], r["step"], r.get("loss"), r.get("grad_norm"), r.get("lr"), r.get("val_loss"))
            for r in rows if r["type"] in ("step", "epoch")]


def test_same_seed_same_losses_and_adapter(tiny_qwen3, tmp_path, capsys):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert main(tiny_train_args(tiny_qwen3, a, *EXTRA)) == 0
    log_a = capsys.readouterr().out
    assert main(tiny_train_args(tiny_qwen3, b, *EXTRA)) == 0
    assert len(step_losses(a)) > 5 and step_losses(a) == step_losses(b)
    wa, wb = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)

    # the check has teeth: another seed gives another data order and LoRA init
    assert main(tiny_train_args(tiny_qwen3, c, *EXTRA, "--seed", "4", "--max-steps", "2")) == 0
    assert step_losses(c)[:2] != step_losses(a)[:2]

    truncated = json.loads((a / "run.json").read_text())["truncated_prompts"]
    assert truncated > 0
    assert f"{truncated} of " in log_a and "longer than --max-length 96" in log_a


def test_truncation_cuts_the_question_never_the_instruction_or_answer(chatml_tokenizer_dir):
    tok = load_tokenizer(str(chatml_tokenizer_dir))
    task = CategoryTask.create(["biology", "computer science", "law"])
    enc = PromptEncoder(tok, task, max_length=96)
    short = {"question": "What is osmosis?", "label": "biology"}
    long = {"question": "Describe the cell. " + "It has many parts and functions. " * 60, "label": "computer science"}
    full, short_cut = enc.example(short)
    ex, long_cut = enc.example(long)
    assert (short_cut, long_cut) == (False, True) and len(full["input_ids"]) <= 96 and len(ex["input_ids"]) <= 96
    text = tok.decode(ex["input_ids"])
    assert task.system_message() in text  # the instruction, whole
    assert text.rstrip().endswith("computer science<|im_end|>")  # the answer, whole
    assert "<|im_start|>assistant" in text and "Describe the cell." in text and " ..." in text
    answer = enc.label_ids["computer science"]
    assert ex["labels"][-len(answer):] == answer and all(v == IGNORE for v in ex["labels"][:-len(answer)])


def test_validate_counts_truncated_prompts(tiny_run, tmp_path, capsys):
    import yaml

    from tests.conftest import copy_run

    run = copy_run(tiny_run, tmp_path / "run")
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["model"]["max_length"] = 86
    (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    assert main(["validate", "--model-path", str(run), "--precision", "fp32"]) == 0
    report = json.loads((run / "eval" / "eval.json").read_text())
    assert 0 < report["truncated_prompts"] <= report["n"]
    assert f"{report['truncated_prompts']} of {report['n']} prompts were longer" in capsys.readouterr().out
