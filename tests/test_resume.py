"""Interrupted training resumes to the same adapter and losses as an uninterrupted run (tiny model, CPU).

The training subprocess kills itself with a real SIGKILL (or SIGTERM) at a fixed forward pass, so the
test does not depend on timing: the kill lands mid-epoch, after a --save-steps checkpoint and after
metrics.jsonl has lines beyond it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qwen_ft.cli import main
from tests.conftest import REPO, tiny_train_args

# Runs `qwen-ft` (the same main as `python -m qwen_ft`) with the loss wrapped to send `sig` to itself on
# forward call `at` (training steps and validation batches both count).
KILLER = """
import os, sys
import qwen_ft.training.batches as t
sig, at = int(os.environ["KILL_SIGNAL"]), int(os.environ["KILL_AT"])
calls, orig = [0], t.answer_loss
def loss(*a, **k):
    calls[0] += 1
    if calls[0] == at:
        os.kill(os.getpid(), sig)
    return orig(*a, **k)
t.answer_loss = loss
import qwen_ft.commands.train as c
c.answer_loss = loss
from qwen_ft.cli import main
sys.exit(main(sys.argv[1:]))
"""

# 42 train rows / batch 8 = 6 steps per epoch, 1 validation batch; checkpoints at steps 4, 6, 8, 12.
EXTRA = ("--epochs", "2", "--save-steps", "4", "--lora-dropout", "0.1", "--learning-rate", "5e-3", "--seed", "7")


def qwen_ft(args: list[str], env: dict | None = None, code: str | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "qwen_ft", *args]
    full_env = {**os.environ, "PYTHONPATH": str(REPO / "src"), **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=240)


def losses(run: Path) -> list[tuple]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["type"], r["step"], r.get("loss"), r.get("grad_norm"), r.get("train_loss"), r.get("val_loss"))
            for r in rows if r["type"] in ("step", "epoch")]


def final(run: Path) -> dict:
    rec = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert rec["type"] == "final"
    return {k: rec[k] for k in ("step", "epochs_run", "best_val_loss", "train_loss")}


def assert_same_run(a: Path, b: Path) -> None:
    assert losses(a) == losses(b)
    assert final(a) == final(b)
    ta, tb = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert ta.keys() == tb.keys()
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], rtol=0, atol=0, msg=k)


@pytest.fixture(scope="module")
def reference(tiny_qwen3, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("resume") / "reference"
    assert main(tiny_train_args(tiny_qwen3, out, *EXTRA)) == 0
    return out


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
def test_killed_run_resumes_to_the_same_adapter_and_losses(reference, tiny_qwen3, tmp_path, capsys, monkeypatch,
                                                          sig):
    out = tmp_path / "run"
    args = tiny_train_args(tiny_qwen3, out, *EXTRA)
    # call 11 = step 10's forward: mid epoch 2 (steps 7-12, validation batch = call 7), after checkpoint-8
    res = qwen_ft(args, {"KILL_SIGNAL": str(int(sig)), "KILL_AT": "11"}, KILLER)
    if sig == signal.SIGKILL:
        assert res.returncode == -signal.SIGKILL, res.stderr[-3000:]
    else:  # SIGTERM: a checkpoint after the current step, then a clear message
        assert res.returncode == 2, res.stderr[-3000:]
        assert "interrupted at step 10" in res.stderr and "--resume" in res.stderr
    assert not (out / "COMPLETE").exists()
    steps = [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]
    assert max(steps) >= 9

    # readers refuse the unfinished folder; train without --resume refuses to start over silently
    assert main(["validate", "--model-path", str(out)]) == 2
    err = capsys.readouterr().err
    assert "incomplete" in err and "--resume" in err
    assert main(args) == 2
    assert "unfinished run" in capsys.readouterr().err

    if sig == signal.SIGKILL:  # what a kill can leave: a checkpoint cut short, a torn metrics line
        torn = out / "checkpoints" / "checkpoint-9"
        torn.mkdir()
        (torn / "adapter_model.safetensors").write_bytes(b"\0" * 10)
        with open(out / "metrics.jsonl", "a") as f:
            f.write('{"type": "step", "step": 9, "lo')

    real_load, loaded = torch.load, []

    def safe_load(*a, **k):  # the checkpoint's optimizer/scheduler/RNG files: never unpickled with code
        assert k.get("weights_only") is True, a
        loaded.append(Path(a[0]).name)
        return real_load(*a, **k)

    monkeypatch.setattr(torch, "load", safe_load)
    assert main([*args, "--resume"]) == 0
    assert "optimizer.pt" in loaded  # the check above did see the resume's loads
    if sig == signal.SIGKILL:
        assert not (out / "checkpoints" / "checkpoint-9").exists()
    assert (out / "COMPLETE").is_file() and not (out / "checkpoints").exists()
    assert_same_run(reference, out)


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tiny_qwen3, tmp_path, capsys,
                                                                           monkeypatch):
    from qwen_ft.commands.train import run_train
    from qwen_ft.errors import TrainingDiverged

    def poison_after(n: int):
        def hook(model):
            forward, calls = model.forward, [0]

            def nan_forward(*args, **kwargs):
                out = forward(*args, **kwargs)
                if model.training:
                    calls[0] += 1
                    if calls[0] >= n:
                        out.logits = out.logits * float("nan")
                return out

            model.forward = nan_forward
            return model
        return hook

    out = tmp_path / "run"
    user = {"model.model": str(tiny_qwen3), "data.data": "demo", "data.max_samples_per_category": 5,
            "train.epochs": 2, "train.batch_size": 8, "train.save_steps": 2, "model.precision": "fp32",
            "model.max_length": 256, "train.output_dir": str(out)}
    with pytest.raises(TrainingDiverged) as exc:
        run_train(user, model_hook=poison_after(5))  # the 5th training step's loss is NaN
    msg = exc.value.message
    assert "training diverged" in msg and "at step 5" in msg and "before the optimizer applied it" in msg
    assert "checkpoint-4" in msg and "--learning-rate" in msg and "fp32" in msg and "--max-grad-norm" in msg
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    weights = load_file(out / "checkpoints" / "checkpoint-4" / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in records) == 4 and not (out / "COMPLETE").exists()

    # through the command line, resumed from checkpoint-4: exit code 2, the message, no traceback
    import qwen_ft.commands.train as train_cmd

    real = train_cmd.run_train
    monkeypatch.setattr(train_cmd, "run_train", lambda user, resume=False, overwrite=False, **kw:
                        real(user, resume, overwrite, model_hook=poison_after(1), **kw))
    capsys.readouterr()
    args = tiny_train_args(tiny_qwen3, out, "--epochs", "2", "--save-steps", "2", "--resume")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "qwen-ft train: error: training diverged" in err and "at step 5" in err and "Traceback" not in err
