"""Core invariants on a tiny random Qwen3 with the ChatML fixture tokenizer (and the real Qwen3 one)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from qwen_ft.config import PRESETS, TrainConfig, preset_for
from qwen_ft.data.prepare import prepare
from qwen_ft.encoding import IGNORE, PromptEncoder
from qwen_ft.inference.engine import Classifier
from qwen_ft.models import load_model
from qwen_ft.tasks import CategoryTask, MultipleChoiceTask
from qwen_ft.training.batches import LeftPadCollator, answer_loss


def category_task():
    return CategoryTask.create(["biology", "computer science", "law", "math"])


# the prompt ends with the assistant's turn opened; Qwen3's own template adds an empty think block
PROMPT_ENDS = {"qwen_tok": "<|im_start|>assistant\n",
               "real_qwen3_tok": "<|im_start|>assistant\n<think>\n\n</think>\n\n"}


@pytest.mark.parametrize("tok_fixture", list(PROMPT_ENDS))
def test_loss_mask_is_answer_plus_end_of_turn(request, tok_fixture):
    qwen_tok = request.getfixturevalue(tok_fixture)
    enc = PromptEncoder(qwen_tok, category_task(), max_length=256)
    row = {"question": "Which data structure gives O(1) average lookup by key?", "label": "computer science"}
    ex = enc.train_example(row)
    answer = qwen_tok("computer science", add_special_tokens=False)["input_ids"]
    im_end = qwen_tok.convert_tokens_to_ids("<|im_end|>")
    n = len(answer) + 1
    assert ex["labels"][-n:] == answer + [im_end]
    assert all(v == IGNORE for v in ex["labels"][:-n])
    assert ex["input_ids"][-n:] == answer + [im_end]
    # the prompt part is exactly the inference prompt, rendered with thinking disabled
    prompt = enc.prompt_ids(row)
    assert ex["input_ids"][: len(prompt)] == prompt
    text = qwen_tok.decode(prompt)
    assert text.endswith(PROMPT_ENDS[tok_fixture]) and text.count("<|im_start|>assistant") == 1
    assert "computer science" in text and row["question"] in text  # labels listed in the instruction


def test_collator_keeps_mask_and_left_pads(qwen_tok):
    enc = PromptEncoder(qwen_tok, category_task(), max_length=256)
    rows = [{"question": "Define osmosis.", "label": "biology"},
            {"question": "A much longer question about the limits of a sequence defined by a recurrence?",
             "label": "computer science"}]
    feats = [enc.train_example(r) for r in rows]
    batch = LeftPadCollator(qwen_tok.pad_token_id)(feats)
    width = batch["input_ids"].size(1)
    for i, f in enumerate(feats):
        n = len(f["input_ids"])
        assert batch["attention_mask"][i, : width - n].sum() == 0
        assert batch["labels"][i, width - n:].tolist() == f["labels"]
        assert batch["labels"][i, : width - n].eq(IGNORE).all()
    spans = [sum(v != IGNORE for v in f["labels"]) for f in feats]
    assert batch["logits_to_keep"] == max(spans) + 1


def test_answer_loss_matches_full_logits_loss(tiny_qwen3, qwen_tok):
    model = load_model(str(tiny_qwen3))
    enc = PromptEncoder(qwen_tok, category_task(), max_length=256)
    feats = [enc.train_example({"question": q, "label": lab}) for q, lab in
             [("What is a tort?", "law"), ("Integrate x dx from 0 to 1.", "math"), ("What do ribosomes do?", "biology")]]
    batch = LeftPadCollator(qwen_tok.pad_token_id)(feats)
    labels = batch.pop("labels")
    keep = batch.pop("logits_to_keep")
    short = answer_loss(model(**batch, logits_to_keep=keep), labels)
    full = model(**batch).logits
    ref = torch.nn.functional.cross_entropy(full[:, :-1].reshape(-1, full.size(-1)), labels[:, 1:].reshape(-1),
                                            ignore_index=IGNORE)
    torch.testing.assert_close(short, ref, rtol=1e-4, atol=1e-5)


def test_constrained_scoring_valid_and_exact(tiny_qwen3, qwen_tok):
    """Untrained model: every prediction is a label; the exact distribution sums to 1 (tests/test_engine.py
    checks both modes against full-sequence brute force)."""
    model = load_model(str(tiny_qwen3)).eval()
    task = category_task()
    enc = PromptEncoder(qwen_tok, task, max_length=256)
    rows = [{"question": q} for q in ["Why is the sky blue?", "What is a contract?", "x", "Define entropy " * 5]]
    clf = Classifier(model, enc)
    for decode in ("constrained", "exact"):
        results, _ = clf.classify(rows, decode=decode, batch_size=3, top_k=len(task.labels))
        assert all(r["pred"] in task.labels and r["valid"] for r in results)
    assert all(abs(sum(p for _, p in r["top"]) - 1) < 1e-4 for r in results)


def test_multiple_choice_prompt_and_letters(qwen_tok, tiny_qwen3):
    from tests.conftest import ForcedAnswer, full_logprobs

    rows = [{"question": "Where do you keep milk cold?", "choices": ["oven", "fridge", "drawer", "car", "roof"],
             "label": "B"},
            {"question": "Pick the odd one out.", "choices": ["red", "blue", "seven"], "label": "C"}]
    task = MultipleChoiceTask.create(rows)
    enc = PromptEncoder(qwen_tok, task, max_length=256)
    text = qwen_tok.decode(enc.prompt_ids(rows[0]))
    for letter, choice in zip("ABCDE", rows[0]["choices"]):
        assert f"{letter}. {choice}" in text
    model = load_model(str(tiny_qwen3)).eval()
    clf = Classifier(model, enc)

    def likeliest(row) -> set[str]:  # by hand: the row's letters whose answer (letter + end of turn) is likeliest
        labels, seqs = enc.answer_options(row)
        prompt = enc.prompt_ids(row)
        scores = [sum(float(full_logprobs(model, prompt + seq)[len(prompt) - 1 + k, t]) for k, t in enumerate(seq))
                  for seq in seqs]
        return {lab for lab, s in zip(labels, scores) if s >= max(scores) - 1e-4}  # a float tie: either

    for row, res in zip(rows, clf.classify(rows, decode="exact")[0]):
        assert res["pred"] in likeliest(row)
    # the model made to answer D, neither the first letter nor the row's label: exact scoring says D where
    # the row has a D, and the likeliest of its own letters where it has only A-C
    after = enc.prompt_ids(rows[0])[-1]  # every prompt ends with the assistant turn opened
    assert enc.prompt_ids(rows[1])[-1] == after
    with ForcedAnswer(model, after, enc.answer_ids("D")):
        forced, _ = clf.classify(rows, decode="exact")
        assert forced[0]["pred"] == "D" and forced[0]["probability"] > 0.99
        assert forced[1]["pred"] in likeliest(rows[1]) and forced[1]["pred"] in ("A", "B", "C")


def test_presets_by_parameter_count():
    assert preset_for(135_000_000).name.startswith("tiny")
    assert preset_for(600_000_000).name.startswith("0.6B")
    assert preset_for(2_000_000_000).name.startswith("1.7B")
    assert preset_for(8_000_000_000).name.startswith("7B")
    assert [p.values["optim.learning_rate"] for p in PRESETS[1:]] == [3e-4, 2e-4, 1e-4]  # the guide's table


def test_precedence_preset_yaml_cli(tiny_qwen3, tmp_path, monkeypatch):
    from qwen_ft.cli import build_parser
    from qwen_ft.config_flags import user_layers
    from qwen_ft.training import resolve_config

    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("lora:\n  rank: 4\n  alpha: 8\ntrain:\n  epochs: 2\n  batch_size: 3\n")
    monkeypatch.setenv("TRAIN_BATCH_SIZE", "5")
    args = build_parser().parse_args(["train", "--model", str(tiny_qwen3), "--config", str(cfg_file),
                                      "--epochs", "7"])
    r = resolve_config(user_layers(args))
    assert r.preset.startswith("tiny")
    assert r.config.lora.rank == 4 and r.config.lora.alpha == 8  # YAML over preset
    assert r.config.train.batch_size == 5  # env over YAML
    assert r.config.train.epochs == 7  # CLI over everything
    assert r.config.lora.dropout == 0.0 and r.config.optim.learning_rate == 5e-4  # from the tiny preset


def test_run_folder_layout_and_config_round_trip(tiny_run):
    for name in ["adapter_config.json", "adapter_model.safetensors", "config.yaml", "run.json", "label_mapping.json",
                 "metrics.jsonl", "split/train.jsonl", "split/validation.jsonl", "split/test.jsonl", "COMPLETE",
                 "tokenizer_config.json"]:
        assert (tiny_run / name).is_file(), name
    assert not (tiny_run / "checkpoints").exists()
    assert not list(tiny_run.glob("*.bin")) and not list(tiny_run.glob("*.pt"))
    cfg = TrainConfig.from_dict(yaml.safe_load((tiny_run / "config.yaml").read_text()))
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.to_dict() == yaml.safe_load((tiny_run / "config.yaml").read_text())
    mapping = json.loads((tiny_run / "label_mapping.json").read_text())
    assert len(mapping["labels"]) == 14 and "{labels}" in mapping["instruction"]
    info = json.loads((tiny_run / "run.json").read_text())
    assert info["versions"]["torch"] and "git_commit" in info
    lines = [json.loads(x) for x in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    epochs = [x for x in lines if x["type"] == "epoch"]
    assert epochs and {"train_loss", "val_loss", "grad_norm", "lr"} <= set(epochs[0])


def test_lora_trains_adapter_not_base(tiny_qwen3, tmp_path):
    from qwen_ft.commands.train import run_train
    from tests.conftest import tiny_train_args  # noqa: F401  (same data slice as tiny_run)

    captured = {}

    def hook(model):
        captured["model"] = model
        captured["base"] = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
        captured["lora_B"] = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
        return model

    user = {"model.model": str(tiny_qwen3), "data.data": "demo", "data.max_samples_per_category": 5,
            "train.epochs": 1, "train.batch_size": 8, "model.precision": "fp32", "model.max_length": 256,
            "optim.learning_rate": 1e-2, "train.output_dir": str(tmp_path / "run")}
    run_train(user, model_hook=hook)
    params = dict(captured["model"].named_parameters())
    for n, before in captured["base"].items():
        assert torch.equal(params[n].detach(), before), f"base weight {n} changed"
        assert not params[n].requires_grad
    assert captured["lora_B"] and all(not torch.equal(params[n].detach(), b) for n, b in captured["lora_B"].items())


def test_prepare_demo_split_is_stratified_and_seeded():
    from qwen_ft.config import DataArgs

    a = prepare(DataArgs(data="demo", max_samples_per_category=10), seed=42)
    b = prepare(DataArgs(data="demo", max_samples_per_category=10), seed=42)
    assert a.splits == b.splits
    assert len(a.task.labels) == 14
    assert [len(a.splits[k]) for k in ("train", "validation", "test")] == [84, 28, 28]
    from collections import Counter

    assert set(Counter(r["label"] for r in a.splits["validation"]).values()) == {2}
