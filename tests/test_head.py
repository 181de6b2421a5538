"""`--head classification`: the sequence-classification baseline on the same base (tiny random models, CPU).

The main run uses a tiny Llama whose tokenizer has pad == eos == <|im_end|>, as SmolLM2's does: every prompt
holds that token inside it (the end of the system and user turns), which is what a head pooled on "the last
token that is not the pad id" must not be fooled by.
"""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import TrainerCallback

from qwen_ft.cli import main
from qwen_ft.encoding import PromptEncoder, check_head_prompt
from qwen_ft.errors import UserError
from qwen_ft.inference.engine import Classifier
from qwen_ft.models import load_model, load_tokenizer
from qwen_ft.runs import RunDir
from qwen_ft.tasks import CategoryTask
from qwen_ft.training import train
from tests.conftest import tiny_train_args

EXTRA = ("--epochs", "2", "--save-steps", "3", "--learning-rate", "5e-3", "--seed", "7", "--head", "classification")


@pytest.fixture(scope="module")
def eos_pad_llama(tmp_path_factory, chatml_tokenizer_dir):
    """A 2-layer random Llama with the ChatML tokenizer, its pad set to its eos (<|im_end|>), like SmolLM2."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama-eos-pad")
    tok = AutoTokenizer.from_pretrained(chatml_tokenizer_dir)
    tok.pad_token = tok.eos_token
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def head_layers(model, out) -> dict:
    """The flat config layers that `tiny_train_args(model, out, *EXTRA)` gives on the command line."""
    return {"model.model": str(model), "data.data": "demo", "data.max_samples_per_category": 5, "train.epochs": 2,
            "train.batch_size": 8, "model.precision": "fp32", "model.max_length": 256, "train.output_dir": str(out),
            "train.save_steps": 3, "optim.learning_rate": 5e-3, "train.seed": 7, "model.head": "classification"}


@pytest.fixture(scope="module")
def head_run(tmp_path_factory, eos_pad_llama):
    """(run folder, every trainable and frozen parameter as it was before training, the RunResult)."""
    out = tmp_path_factory.mktemp("head") / "run"
    before = {}

    def snapshot(model):
        before.update({n: p.detach().clone() for n, p in model.named_parameters()})
        return model

    result = train(head_layers(eos_pad_llama, out), model_hook=snapshot)
    return out, before, result


def test_head_trains_lora_and_score_with_the_base_frozen(head_run):
    out, before, result = head_run
    assert (out / "COMPLETE").is_file() and not (out / "checkpoints").exists()
    for name in ("config.yaml", "label_mapping.json", "metrics.jsonl", "adapter_config.json",
                 "adapter_model.safetensors", "run.json", "split/train.jsonl", "split/validation.jsonl"):
        assert (out / name).is_file(), name
    assert yaml.safe_load((out / "config.yaml").read_text())["model"]["head"] == "classification"
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["task_type"] == "SEQ_CLS" and "score" in adapter["modules_to_save"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["type"] == "final" and records[-1]["best_val_loss"] is not None
    assert [r["type"] for r in records].count("epoch") == 2  # checkpoint selection by validation loss ran

    labels = json.loads((out / "label_mapping.json").read_text())["labels"]
    model = result.model
    assert model.config.num_labels == len(labels) and model.config.id2label == dict(enumerate(labels))
    after = dict(model.named_parameters())
    assert set(after) == set(before)
    trainable = {n for n, p in after.items() if p.requires_grad}
    assert trainable and all(".lora_" in n or "modules_to_save" in n for n in trainable)
    for name, p in after.items():
        if name in trainable:
            continue
        torch.testing.assert_close(p, before[name], rtol=0, atol=0, msg=f"frozen {name} changed")
    lora_b = [n for n in trainable if ".lora_B." in n]
    assert lora_b and all(not torch.equal(after[n], before[n]) for n in lora_b)
    score = [n for n in trainable if "modules_to_save" in n and "score" in n]
    assert score and all(not torch.equal(after[n], before[n]) for n in score)
    saved = load_file(out / "adapter_model.safetensors")
    assert any("score" in k for k in saved) and any("lora_B" in k for k in saved)


def test_pooling_reads_the_last_prompt_token_with_pad_equal_to_eos(eos_pad_llama):
    tok = load_tokenizer(str(eos_pad_llama))
    assert tok.pad_token_id == tok.eos_token_id
    task = CategoryTask.create(["biology", "law", "math"])
    enc = PromptEncoder(tok, task, 256)
    prompts = [enc.prompt_ids({"question": q}) for q in ("What is a tort?", "Integrate x dx from 0 to 1 please.")]
    assert all(tok.pad_token_id in p[:-1] and p[-1] != tok.pad_token_id for p in prompts)  # eos inside, not last
    torch.manual_seed(0)
    model = load_model(str(eos_pad_llama), labels=task.labels, pad_token_id=tok.pad_token_id).eval()
    with torch.no_grad():
        # the reference: the head on each prompt's own last hidden state, one prompt at a time, no padding
        ref = torch.stack([model.score(model.model(torch.tensor([p])).last_hidden_state[0, -1]) for p in prompts])
        width = max(map(len, prompts))
        for side in ("left", "right"):
            ids = torch.full((2, width), tok.pad_token_id)
            mask = torch.zeros((2, width), dtype=torch.long)
            for i, p in enumerate(prompts):
                cols = slice(width - len(p), width) if side == "left" else slice(0, len(p))
                ids[i, cols], mask[i, cols] = torch.tensor(p), 1
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            got = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5, msg=side)
    with pytest.raises(UserError, match="ends with the padding token"):
        check_head_prompt([*prompts[0], tok.pad_token_id], tok.pad_token_id)


def test_engine_and_the_validate_test_predict_serve_commands_on_a_head_run(head_run, tiny_run, capsys, tmp_path):
    out, _, result = head_run
    clf = Classifier.load(out, precision="fp32")
    assert clf.head and clf.scoring() == ("head", "none")
    rows = RunDir(out).split("validation")
    results, stats = clf.classify(rows, top_k=len(clf.labels), batch_size=3)
    assert len(results) == len(rows) and stats["decode"] == "head"
    for res in results:
        assert res["valid"] and res["pred"] in clf.labels and res["pred"] == res["top"][0][0]
        assert sorted(lab for lab, _ in res["top"]) == sorted(clf.labels)
        assert sum(p for _, p in res["top"]) == pytest.approx(1, abs=1e-4)
        assert res["probability"] == res["top"][0][1]
    # batching (length-planned, left-padded) does not change a row's answer; the in-memory model agrees
    one_by_one, _ = clf.classify(rows, top_k=len(clf.labels), batch_size=1)
    assert [r["pred"] for r in one_by_one] == [r["pred"] for r in results]
    for a, b in zip(one_by_one, results):
        assert a["probability"] == pytest.approx(b["probability"], abs=1e-5)
    memory = Classifier(result.model, result.encoder)
    assert [r["pred"] for r in memory.classify(rows)[0]] == [r["pred"] for r in results]

    for decode in ("constrained", "exact", "free"):
        with pytest.raises(UserError, match=f"--decode {decode} .*classification head"):
            clf.classify(rows, decode=decode)
    with pytest.raises(UserError, match="--decode head applies to runs trained with --head classification"):
        Classifier.load(tiny_run, precision="fp32").classify(rows[:1], decode="head")
    with pytest.raises(UserError, match="head starts random"):
        Classifier.load(out, precision="fp32", adapter=False)

    assert main(["validate", "--model-path", str(out), "--precision", "fp32"]) == 0
    assert main(["validate", "--model-path", str(tiny_run), "--precision", "fp32"]) == 0
    head_eval = json.loads((out / "eval" / "eval.json").read_text())
    gen_eval = json.loads((tiny_run / "eval" / "eval.json").read_text())
    assert set(head_eval) == set(gen_eval)
    assert head_eval["decode"] == "head" and head_eval["n"] == len(rows)
    for key in ("accuracy", "macro_f1", "samples_per_s"):
        assert head_eval[key] is not None, key

    capsys.readouterr()
    assert main(["test", "--model-path", str(out), "--precision", "fp32", "--top", "2", "What is a tort?"]) == 0
    assert "(p=" in capsys.readouterr().out
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps({"id": r["id"], "text": r["question"]}) + "\n" for r in rows))
    assert main(["predict", "--model-path", str(out), "--precision", "fp32", "--input", str(src),
                 "--output", str(dst)]) == 0
    written = [json.loads(line) for line in dst.read_text().splitlines()]
    assert [w["id"] for w in written] == [r["id"] for r in rows]
    assert [w["label"] for w in written] == [r["pred"] for r in results]

    import httpx

    from tests.test_serve import running, wait_ready

    with running(lambda: clf) as url:
        wait_ready(url)
        served = httpx.post(f"{url}/v1/classify", json={"texts": [r["question"] for r in rows[:4]], "top_k": 2},
                            timeout=60).json()["results"]
    assert [s["label"] for s in served] == [r["pred"] for r in results[:4]]
    assert all(len(s["top"]) == 2 for s in served)


def test_reload_merge_and_resume_give_identical_predictions(head_run, eos_pad_llama, tmp_path):
    from qwen_ft.merge import merge_run

    out, _, _ = head_run
    rows = RunDir(out).split("validation")
    first, _ = Classifier.load(out, precision="fp32").classify(rows, top_k=3)
    again, _ = Classifier.load(out, precision="fp32").classify(rows, top_k=3)
    assert again == first

    merged_dir = tmp_path / "merged"
    report = merge_run(out, merged_dir, dtype="fp32")
    assert report["saved_vs_adapter_max_abs_diff"] <= report["tolerance"]
    merged, _ = Classifier.load(merged_dir, precision="fp32").classify(rows, top_k=3)
    assert [r["pred"] for r in merged] == [r["pred"] for r in first]
    for a, b in zip(merged, first):
        assert a["probability"] == pytest.approx(b["probability"], abs=1e-4)

    class Interrupt(TrainerCallback):  # SIGTERM after step 4: a checkpoint at step 5, then a clear stop
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 4:
                os.kill(os.getpid(), signal.SIGTERM)

    resumed = tmp_path / "resumed"
    with pytest.raises(UserError, match="interrupted at step 5"):
        train(head_layers(eos_pad_llama, resumed), callbacks=(Interrupt(),))
    assert not (resumed / "COMPLETE").exists()
    assert main([*tiny_train_args(eos_pad_llama, resumed, *EXTRA), "--resume"]) == 0  # the same config by flags
    steps = [r["step"] for r in map(json.loads, (resumed / "metrics.jsonl").read_text().splitlines())
             if r["type"] == "step"]
    assert steps == list(range(1, 13))  # steps 1-5 once: it continued from checkpoint-5, not from the start
    a, b = load_file(out / "adapter_model.safetensors"), load_file(resumed / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    assert Classifier.load(resumed, precision="fp32").classify(rows, top_k=3)[0] == first


def test_head_refuses_multiple_choice_and_the_study(tiny_qwen3, tmp_path, capsys):
    from qwen_ft.study.config import load_study_config

    out = tmp_path / "mc"
    assert main(["train", "--model", str(tiny_qwen3), "--data", "demo-mc", "--head", "classification",
                 "--output-dir", str(out)]) == 2
    assert "category tasks only (this data is multiple_choice)" in capsys.readouterr().err
    assert not out.exists()
    assert main(["train", "--model", str(tiny_qwen3), "--head", "regression", "--output-dir", str(out)]) == 2
    assert "invalid choice" in capsys.readouterr().err

    study = tmp_path / "study.yaml"
    study.write_text(f"model: {{model: {tiny_qwen3}, head: classification}}\noutput_dir: {tmp_path / 's'}\n")
    with pytest.raises(UserError, match="model.head classification: a study trains and compares generative"):
        load_study_config([study])


def test_default_head_keeps_the_config_hash():
    """Runs and study phases written before --head existed still resume and stay up to date."""
    from qwen_ft.config import ModelArgs, TrainConfig, config_hash

    older = TrainConfig().to_dict()
    del older["model"]["head"]
    assert config_hash(TrainConfig()) == config_hash(older)
    assert config_hash(TrainConfig(model=ModelArgs(head="classification"))) != config_hash(older)
