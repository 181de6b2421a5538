"""The optimizer registry: each optimizer trains, AdaBound follows the paper, bad input is an error."""

from __future__ import annotations

import math

import pytest
import torch

from qwen_ft import optimizers
from qwen_ft.errors import UserError


@pytest.fixture
def registry(monkeypatch):
    """A copy of the registry, so that optimizers registered by a test vanish after it."""
    monkeypatch.setattr(optimizers, "REGISTRY", dict(optimizers.REGISTRY))
    return optimizers.REGISTRY


@pytest.fixture(scope="module")
def lora_batch(tiny_qwen3):
    """A LoRA-wrapped tiny Qwen3 state and one fixed batch of multiple-choice training examples."""
    from qwen_ft.config import LoraArgs
    from qwen_ft.encoding import PromptEncoder
    from qwen_ft.models import load_tokenizer
    from qwen_ft.tasks import MultipleChoiceTask
    from qwen_ft.training import LeftPadCollator

    tok = load_tokenizer(str(tiny_qwen3))
    rows = [{"question": q, "choices": ["red", "blue", "green"], "label": lab}
            for q, lab in [("Colour of the sky?", "B"), ("Colour of grass?", "C"), ("Colour of blood?", "A"),
                           ("Colour of the sea?", "B")]]
    enc = PromptEncoder(tok, MultipleChoiceTask.create(rows), max_length=128)
    batch = LeftPadCollator(tok.pad_token_id)([enc.train_example(r) for r in rows])
    return str(tiny_qwen3), LoraArgs(rank=4, alpha=8, dropout=0.0), batch


def _train_losses(lora_batch, name: str, steps: int = 12, lr: float | None = None, kwargs=None) -> list[float]:
    from qwen_ft.models import apply_lora, load_model
    from qwen_ft.training import answer_loss

    path, lora, batch = lora_batch
    torch.manual_seed(0)
    model = apply_lora(load_model(path), lora)
    params = [p for p in model.parameters() if p.requires_grad]
    cls, kw = optimizers.resolve(name, lr or optimizers.get(name).default_lr, 0.0, kwargs)
    opt = cls(params, **kw)
    batch = dict(batch)
    labels, keep = batch.pop("labels"), batch.pop("logits_to_keep")
    losses = []
    for _ in range(steps):
        loss = answer_loss(model(**batch, logits_to_keep=keep), labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)  # as the Trainer does (max_grad_norm 1.0)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name", ["adamw", "sgd", "adabound"])
def test_each_optimizer_reduces_loss_at_its_default_lr(lora_batch, name):
    losses = _train_losses(lora_batch, name)
    assert all(math.isfinite(v) for v in losses)
    # a fixed batch; a random tiny model moves slowly at Adam's 2e-4, momentum SGD may overshoot a step
    assert losses[-1] < losses[0] - 0.02, f"{name}: {losses}"
    assert sum(b > a for a, b in zip(losses, losses[1:])) <= 2, f"{name}: {losses}"


def test_adabound_step_bounds_follow_luo_et_al_2019():
    """First step, hand-computed. Paper (reference implementation): with m_t, v_t Adam's moments,
    eta = clip(lr * sqrt(1 - b2^t) / (1 - b1^t) / (sqrt(v_t) + eps), lower(t), upper(t)), theta -= eta * m_t,
    lower(t) = final_lr * (1 - 1 / (gamma t + 1)), upper(t) = final_lr * (1 + 1 / (gamma t))."""
    from pytorch_optimizer import AdaBound

    lr, final_lr, gamma, b1, b2 = 1e-3, 0.1, 1e-3, 0.9, 0.999
    lower, upper = final_lr * (1 - 1 / (gamma + 1)), final_lr * (1 + 1 / gamma)  # t = 1: ~1e-4 and 100.1

    def first_step(g: float) -> float:
        p = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
        opt = AdaBound([p], lr=lr, final_lr=final_lr, gamma=gamma, betas=(b1, b2), weight_decay=0.0, eps=0.0)
        p.grad = torch.tensor([g], dtype=torch.float64)
        opt.step()
        return float(p)

    m1 = lambda g: (1 - b1) * g  # noqa: E731
    # moderate gradient: the Adam step lr/(1-b1)/|g| = 0.01 lies inside [lower, upper]: plain Adam, -lr * sign(g)
    assert first_step(1.0) == pytest.approx(-lr, rel=1e-9)
    # tiny gradient: Adam's step 1e4 exceeds upper(1) = 100.1, so the step is upper * m_1
    assert first_step(1e-6) == pytest.approx(-upper * m1(1e-6), rel=1e-9)
    # huge gradient: Adam's step 1e-8 is below lower(1) ~ 1e-4, so the step is lower * m_1
    assert first_step(1e6) == pytest.approx(-lower * m1(1e6), rel=1e-9)


def test_adabound_converges_to_sgd_with_final_lr():
    """As t grows both bounds tend to final_lr: AdaBound becomes SGD (on the momentum m_t) with lr final_lr,
    whatever the gradient scale. gamma = 1e3 makes the bounds [0.0999, 0.1001] from step 1."""
    from pytorch_optimizer import AdaBound

    for g in (1e-4, 1.0, 1e3):
        p = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
        opt = AdaBound([p], lr=1e-3, final_lr=0.1, gamma=1e3, weight_decay=0.0)
        m, theta, prev = 0.0, 0.0, 0.0
        for t in range(1, 6):
            p.grad = torch.tensor([g], dtype=torch.float64)
            opt.step()
            m = 0.9 * m + 0.1 * g
            lower, upper = 0.1 * (1 - 1 / (1e3 * t + 1)), 0.1 * (1 + 1 / (1e3 * t))
            moved, prev = prev - float(p), float(p)
            assert lower * m * (1 - 1e-9) <= moved <= upper * m * (1 + 1e-9)
            theta -= 0.1 * m
        assert float(p) == pytest.approx(theta, rel=2e-3)


def test_unknown_kwargs_are_an_error_with_a_suggestion():
    with pytest.raises(UserError, match=r"'momentun' \(did you mean 'momentum'\?\)"):
        optimizers.resolve("sgd", 0.1, 0.0, {"momentun": 0.9})
    with pytest.raises(UserError, match="unknown optimizer 'adamm'.*did you mean 'adamw'"):
        optimizers.get("adamm")
    cls, kw = optimizers.resolve("sgd", 0.1, 0.0, {"nesterov": True})
    assert cls is torch.optim.SGD and kw["momentum"] == 0.9 and kw["nesterov"] is True


def test_yaml_registered_optimizer_trains_and_is_checked(registry, lora_batch):
    from qwen_ft.study.config import StudyConfig

    cfg = StudyConfig(optimizers={"adagrad": {"target": "torch.optim.Adagrad", "lr": 0.05,
                                              "kwargs": {"lr_decay": 0.0}}})
    user = cfg.optimizer_user("adagrad")
    assert user["optim.optimizer"] == "adagrad" and user["optim.learning_rate"] == 0.05
    cfg.validate()
    losses = _train_losses(lora_batch, "adagrad")
    assert losses[-1] < losses[0] - 0.02
    with pytest.raises(UserError, match="lr_decai"):
        optimizers.from_yaml("bad", {"target": "torch.optim.Adagrad", "lr": 0.1, "kwargs": {"lr_decai": 0.0}})
    with pytest.raises(UserError, match="cannot import torch.optim.NoSuchOpt"):
        optimizers.from_yaml("bad2", {"target": "torch.optim.NoSuchOpt", "lr": 0.1})
    with pytest.raises(UserError, match="unknown key 'learning_rat'"):
        StudyConfig(optimizers={"sgd": {"learning_rat": 0.1}}).validate()


def test_train_accepts_optimizer_flag(tiny_qwen3):
    from qwen_ft.cli import build_parser, user_layers
    from qwen_ft.commands.train import resolve_config

    args = build_parser().parse_args(["train", "--model", str(tiny_qwen3), "--optimizer", "sgd"])
    cfg = resolve_config(user_layers(args)).config
    assert cfg.optim.optimizer == "sgd" and cfg.optim.learning_rate == optimizers.get("sgd").default_lr
