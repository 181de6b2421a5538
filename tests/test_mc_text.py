"""Multiple choice with `answer_format: text`: the model writes the correct choice's text; predictions map
back to letters. Prompts, training targets, constrained decoding and exact scoring per row's own options."""

from __future__ import annotations

import pytest
import torch

from qwen_ft.cli import main
from qwen_ft.config import DataArgs
from qwen_ft.data.prepare import prepare
from qwen_ft.encoding import IGNORE, PromptEncoder
from qwen_ft.errors import UserError
from qwen_ft.inference.engine import Classifier
from qwen_ft.inference.kernels import Counts, match_answer, option_logprobs
from qwen_ft.tasks import MultipleChoiceTask, Task
from tests.conftest import full_logprobs

ROWS = [
    {"question": "Where do you keep milk cold?", "choices": ["oven", "fridge", "kitchen drawer", "car", "roof"],
     "label": "B"},
    {"question": "What do bees make?", "choices": ["honey", "silk", "wax paper", "honey cake", "milk"],
     "label": "A"},
    {"question": "Pick the colour of grass.", "choices": ["green", "blue", "red", "green", "pink"], "label": "A"},
    {"question": "Which is a prime?", "choices": ["4", "6", "7", "8", "9"], "label": "C"},
]


@pytest.fixture(scope="module")
def enc(qwen_tok):
    return PromptEncoder(qwen_tok, MultipleChoiceTask.create(ROWS, answer_format="text"), max_length=256)


def test_prompt_lists_choices_and_target_is_the_choice_text(enc, qwen_tok):
    row = ROWS[0]
    prompt = qwen_tok.decode(enc.prompt_ids(row))
    for letter, choice in zip("ABCDE", row["choices"]):
        assert f"{letter}. {choice}" in prompt
    assert "text of the correct choice" in prompt
    ex = enc.train_example(row)
    answer = [t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab != IGNORE]
    assert answer == enc.answer_ids("fridge") and answer[-1] == enc.eot_id
    assert qwen_tok.decode(answer[:-1]) == "fridge"


def test_duplicate_choice_texts_keep_the_first(enc):
    labels, seqs = enc.answer_options(ROWS[2])
    assert labels == ["A", "B", "C", "E"]  # D reads "green" like A
    assert len({tuple(s) for s in seqs}) == len(seqs)


def test_exact_score_equals_full_sequence_logprobs_of_each_rows_choices(enc, tiny_model):
    prompts = [enc.prompt_ids(r) for r in ROWS]
    options = [enc.answer_options(r)[1] for r in ROWS]
    cached = option_logprobs(tiny_model, prompts, options, 0, None, enc.tok.pad_token_id, "cpu", Counts())
    for b, (prompt, seqs) in enumerate(zip(prompts, options)):
        for j, seq in enumerate(seqs):
            logp = full_logprobs(tiny_model, prompt + seq)
            ref = sum(float(logp[len(prompt) - 1 + k, t]) for k, t in enumerate(seq))
            assert abs(ref - float(cached[b, j])) < 1e-3
        assert torch.isinf(cached[b, len(seqs):]).all()  # padding options never win
    for row, res in zip(ROWS, Classifier(tiny_model, enc).classify(ROWS, decode="exact", top_k=5)[0]):
        assert res["pred"] in enc.answer_options(row)[0]
        assert abs(sum(p for _, p in res["top"]) - 1) < 1e-4


def test_fast_decode_is_greedy_over_each_rows_choice_trie(enc, tiny_model):
    fast, _ = Classifier(tiny_model, enc).classify(ROWS, batch_size=3)
    for row, res in zip(ROWS, fast):
        labels, seqs = enc.answer_options(row)
        prompt, cands, done = enc.prompt_ids(row), list(range(len(seqs))), []
        while len(cands) > 1:  # brute force: uncached full-sequence forwards
            logp = full_logprobs(tiny_model, prompt + done)[-1]
            k = len(done)
            tok = max({seqs[j][k] for j in cands}, key=lambda t: float(logp[t]))
            cands = [j for j in cands if seqs[j][k] == tok]
            done.append(tok)
        assert res["valid"] and res["pred"] == labels[cands[0]]


def test_free_output_maps_back_to_the_letter():
    answers = {"A": "oven", "B": "fridge"}
    assert match_answer(" Fridge.", answers) == "B"
    assert match_answer("B", answers) is None


def test_answer_format_survives_the_run_mapping():
    task = MultipleChoiceTask.create(ROWS, answer_format="text")
    again = Task.from_mapping(task.to_mapping())
    assert again.per_row_answers and again.answer(ROWS[0], "B") == "fridge"
    assert not MultipleChoiceTask.create(ROWS).per_row_answers


def test_answer_format_text_on_category_data_is_a_clear_error():
    with pytest.raises(UserError, match="answer-format text applies to multiple-choice"):
        prepare(DataArgs(data="demo", answer_format="text"), 42)


def test_train_and_validate_with_text_answers(tiny_qwen3, tmp_path):
    import json
    import math

    from qwen_ft.runs import RunDir

    out = tmp_path / "run"
    assert main(["train", "--model", str(tiny_qwen3), "--data", "demo-mc", "--max-samples", "24",
                 "--answer-format", "text", "--epochs", "1", "--batch-size", "8", "--precision", "fp32",
                 "--output-dir", str(out)]) == 0
    run = RunDir(out)
    assert run.complete and run.config().data.answer_format == "text"
    task = Task.from_mapping(run.label_mapping())
    assert task.name == "multiple_choice" and task.per_row_answers
    epochs = [m for m in run.metrics() if m.get("type") == "epoch"]
    assert epochs and all(math.isfinite(m["train_loss"]) and m["train_loss"] > 0 for m in epochs)
    val = run.split("validation")
    assert val and all(r["label"] in task.row_labels(r) for r in val)

    assert main(["validate", "--model-path", str(out)]) == 0
    report = json.loads((out / "eval" / "eval.json").read_text())
    preds = [json.loads(x) for x in (out / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert report["n"] == len(preds) == len(val) and report["decode"] == "constrained"
    assert report["valid_pct"] == 100.0 and [p["label"] for p in preds] == [r["label"] for r in val]
    for row, p in zip(val, preds):  # each row's own letters; "correct" is the comparison with its label
        assert p["valid"] and p["pred"] in task.row_labels(row) and p["correct"] == (p["pred"] == row["label"])
    assert report["accuracy"] == pytest.approx(sum(p["correct"] for p in preds) / len(preds))
    # the run loads as a text-answer classifier: it scores each choice's text, and gives validate's letters
    clf = Classifier.load(out)
    assert clf.task.per_row_answers
    labels, seqs = clf.encoder.answer_options(val[0])
    texts = [val[0]["choices"][ord(lab) - ord("A")] for lab in labels]
    assert seqs == [clf.encoder.tok(t, add_special_tokens=False)["input_ids"] + [clf.encoder.eot_id] for t in texts]
    assert [r["pred"] for r in clf.classify(val, batch_size=16)[0]] == [p["pred"] for p in preds]
