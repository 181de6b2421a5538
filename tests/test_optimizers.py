"""Optimizers by name: each shipped one trains, the special ones build what they promise, names are safe."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from qwen_ft import optimizers
from qwen_ft.errors import UserError

# The tiny LoRA model below, counted by hand: rank 4 on q,k,v,o (in 32 -> out 32, 16, 16, 32) and gate, up
# (32 -> 64), down (64 -> 32); A is r x in, B is out x r. Per layer 256 + 192 + 192 + 256 + 384 + 384 + 384.
LORA_NUMEL = 2 * 2048
LORA_TENSORS = 2 * 7 * 2  # layers x modules x (A, B)


def tiny_lora_model():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from qwen_ft.config import LoraArgs
    from qwen_ft.models import apply_lora

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
    return apply_lora(Qwen3ForCausalLM(config), LoraArgs(rank=4, alpha=8, dropout=0.0))


BATCH = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))


def train(model, opt, steps: int) -> list[float]:
    params = [p for p in model.parameters() if p.requires_grad]
    losses = []
    for _ in range(steps):
        loss = model(input_ids=BATCH, labels=BATCH).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)  # as the Trainer does (max_grad_norm 1.0)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name", list(optimizers.SHIPPED))
def test_each_shipped_optimizer_reduces_loss_at_its_default_lr(name):
    model = tiny_lora_model()
    lr = optimizers.default_lr(name, None)
    opt = optimizers.build(name, model, lr, 0.01, {})
    assert opt.param_groups[0]["lr"] == lr
    losses = train(model, opt, 30)
    assert all(math.isfinite(v) for v in losses)
    # a fixed batch at small default rates (Lion and Muon move ~0.2x AdamW's per element): a steady descent
    assert losses[-1] < losses[0] - 0.005, f"{name}: {losses}"
    assert sum(b < a for a, b in zip(losses, losses[1:])) >= 27, f"{name}: {losses}"


def _names_of(model) -> dict[int, str]:
    return {id(p): n for n, p in model.named_parameters()}


def test_loraplus_gives_b_matrices_lr_times_ratio():
    model = tiny_lora_model()
    opt = optimizers.build("loraplus", model, 1e-4, 0.05, {"loraplus_lr_ratio": 8})
    names = _names_of(model)
    seen = {}
    for g in opt.param_groups:
        for p in g["params"]:
            seen[names[id(p)]] = (g["lr"], g["weight_decay"])
    assert len(seen) == LORA_TENSORS  # every trainable tensor, once
    for n, (lr, wd) in seen.items():
        assert lr == pytest.approx(8e-4 if "lora_B" in n else 1e-4), n
        assert wd == 0.05, n  # peft takes decay as loraplus_weight_decay: build passes ours
    assert optimizers.get("loraplus").defaults["loraplus_lr_ratio"] == 16
    with pytest.raises(UserError, match="loraplus_lr_ratio must be a number >= 1"):
        optimizers.check("loraplus", {"loraplus_lr_ratio": 0.5})
    with pytest.raises(UserError, match="use learning_rate / weight_decay"):
        optimizers.check("loraplus", {"loraplus_weight_decay": 0.1})
    with pytest.raises(UserError, match="no trainable lora_B"):
        optimizers.build("loraplus", torch.nn.Linear(3, 3), 1e-4, 0.0, {})


def test_muon_orthogonalizes_only_2d_tensors_and_adamw_takes_the_rest():
    model = tiny_lora_model()
    norm = model.base_model.model.model.norm.weight.requires_grad_(True)  # a trainable 1-D tensor
    opt = optimizers.build("muon", model, 2e-4, 0.01, {"adamw_lr": 1e-3})
    muon = [g for g in opt.param_groups if g["use_muon"]]
    adamw = [g for g in opt.param_groups if not g["use_muon"]]
    assert muon and all(p.ndim == 2 for g in muon for p in g["params"])
    assert sum(p.numel() for g in muon for p in g["params"]) == LORA_NUMEL
    assert [p for g in adamw for p in g["params"]] == [norm]
    assert adamw[0]["lr"] == 1e-3 and adamw[0]["weight_decay"] == 0.0  # no decay on a norm gain
    before = norm.detach().clone()
    train(model, opt, 2)
    assert not torch.equal(norm, before)
    assert opt.state[norm].keys() >= {"exp_avg", "exp_avg_sq"}


def _schedule_free(steps: int):
    model = tiny_lora_model()
    opt = optimizers.build("schedulefree_adamw", model, 1e-3, 0.0, {})
    train(model, opt, steps)
    return model, opt


def test_schedule_free_eval_mode_holds_the_averaged_weights():
    model, opt = _schedule_free(5)
    beta1 = opt.param_groups[0]["betas"][0]
    params = [p for p in model.parameters() if p.requires_grad]
    y = [p.detach().clone() for p in params]  # train mode: the interpolated point y
    with optimizers.eval_mode(opt):
        assert all(not g["train_mode"] for g in opt.param_groups)
        for p, yp in zip(params, y):
            z = opt.state[p]["z"]
            # y = (1 - beta1) z + beta1 x, so the average x = (y - (1 - beta1) z) / beta1
            torch.testing.assert_close(p.detach(), (yp - (1 - beta1) * z) / beta1)
        assert max((p - yp).abs().max().item() for p, yp in zip(params, y)) > 1e-5
        with optimizers.eval_mode(opt):  # nested: already in eval mode, left as it is
            pass
        assert all(not g["train_mode"] for g in opt.param_groups)
    assert all(g["train_mode"] for g in opt.param_groups)
    for p, yp in zip(params, y):
        torch.testing.assert_close(p.detach(), yp)
    adamw = optimizers.build("adamw", model, 1e-3, 0.0, {})
    with optimizers.eval_mode(adamw) as same:  # no-op for the others
        assert same is adamw


def test_callback_switches_to_eval_for_evaluation_and_saving_and_back():
    from transformers import TrainerControl, TrainingArguments

    _, opt = _schedule_free(2)
    cb, args = optimizers.OptimizerModeCallback(), TrainingArguments(output_dir="unused", report_to="none")
    mode = lambda: opt.param_groups[0]["train_mode"]  # noqa: E731

    control = TrainerControl(should_evaluate=True)
    cb.on_step_end(args, None, control, optimizer=opt)
    assert not mode()  # evaluation is about to run
    cb.on_evaluate(args, None, control, optimizer=opt)
    assert mode()  # no save follows: train again
    control = TrainerControl(should_evaluate=True, should_save=True)
    cb.on_epoch_end(args, None, control, optimizer=opt)
    cb.on_evaluate(args, None, control, optimizer=opt)
    assert not mode()  # the checkpoint is saved with the averaged weights
    cb.on_save(args, None, control, optimizer=opt)
    assert mode()
    adamw = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
    cb.on_step_end(args, None, control, optimizer=adamw)  # other optimizers: nothing happens


def test_callback_in_a_real_trainer_evaluates_and_saves_in_eval_mode(tmp_path):
    from transformers import Trainer, TrainerCallback, TrainingArguments

    model = tiny_lora_model()
    opt = optimizers.build("schedulefree_adamw", model, 1e-3, 0.0, {})
    seen = []

    class Spy(TrainerCallback):
        def on_prediction_step(self, args, state, control, optimizer=None, **kw):
            seen.append(("eval", optimizers._train_mode(optimizer)))

        def on_save(self, args, state, control, optimizer=None, **kw):  # runs before the mode callback's
            seen.append(("save", optimizers._train_mode(optimizer)))

        def on_step_begin(self, args, state, control, optimizer=None, **kw):
            seen.append(("step", None))

    rows = [{"input_ids": BATCH[i], "labels": BATCH[i]} for i in range(4)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2,
                             eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=3,
                             report_to="none", use_cpu=True, disable_tqdm=True, lr_scheduler_type="constant")
    trainer = Trainer(model=model, args=args, train_dataset=rows, eval_dataset=rows[:2], optimizers=(opt, None),
                      callbacks=[Spy(), optimizers.OptimizerModeCallback()])
    trainer.train()
    evals = [m for k, m in seen if k == "eval"]
    saves = [m for k, m in seen if k == "save"]
    assert evals and all(m is False for m in evals)  # the Trainer's own switch, kept by the callback
    assert saves == [False, False]  # step 3 (no evaluation there) and step 4: eval mode for the save
    assert not opt.param_groups[0]["train_mode"]  # after training: the averaged weights, for the final save


# ----------------------------------------------------------------------------- names, kwargs, safety

def test_names_resolve_case_insensitively_with_a_suggestion():
    for name in ("Adagrad", "adagrad", "torch.optim.Adagrad", "TORCH.OPTIM.ADAGRAD"):
        spec = optimizers.get(name)
        assert spec.cls_path == "torch.optim.Adagrad" and spec.load_class() is torch.optim.Adagrad
        assert spec.default_lr == 1e-2 and spec.kind == "plain"
    assert optimizers.get("pytorch_optimizer.Ranger").load_class().__name__ == "Ranger"
    assert optimizers.get("ranger").cls_path == "pytorch_optimizer.Ranger"
    assert optimizers.get("Lion") is optimizers.SHIPPED["lion"]
    assert all(s.kind in optimizers.KINDS for s in optimizers.SHIPPED.values())
    assert optimizers.get("pytorch_optimizer.ScheduleFreeSGD").kind == "schedulefree"
    with pytest.raises(UserError, match="unknown optimizer 'adamm'.*did you mean 'adamw'"):
        optimizers.get("adamm")
    with pytest.raises(UserError, match="unknown optimizer 'torch.optim.Adagard'.*did you mean 'Adagrad'"):
        optimizers.get("torch.optim.Adagard")


@pytest.mark.parametrize("name", ["this.s", "tempfile.mkdtemp", "os.system", "builtins.print", "torch.nn.Linear",
                                  "torch.optim.adagrad.Adagrad", "__import__"])
def test_names_outside_the_allow_list_are_refused(name):
    with pytest.raises(UserError, match="not in an allowed module|unknown optimizer"):
        optimizers.check(name, {})


@pytest.mark.parametrize("name", ["torch.optim.lr_scheduler", "torch.optim.Optimizer",
                                  "pytorch_optimizer.load_optimizer", "pytorch_optimizer.CosineScheduler"])
def test_non_optimizers_in_allowed_modules_are_refused(name):
    with pytest.raises(UserError, match="not a torch.optim.Optimizer subclass"):
        optimizers.get(name)


def test_refused_names_are_never_imported():
    code = ("import sys\nfrom qwen_ft import optimizers\nfrom qwen_ft.errors import UserError\n"
            "for name in ('this.s', 'this', 'tempfile.mkdtemp', 'os.system', 'builtins.print', 'antigravity.fly'):\n"
            "    try:\n        optimizers.check(name, {})\n    except UserError:\n        pass\n"
            "    else:\n        raise SystemExit('accepted ' + name)\n"
            "print('this' in sys.modules, 'antigravity' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False False"
    assert "Beautiful is better" not in out.stdout  # what importing `this` prints


def test_kwargs_are_checked_against_the_class():
    with pytest.raises(UserError, match=r"'momentun' \(did you mean 'momentum'\?\)"):
        optimizers.check("sgd", {"momentun": 0.9})
    with pytest.raises(UserError, match="lr would override.*use learning_rate / weight_decay"):
        optimizers.check("adamw", {"lr": 1e-3})
    with pytest.raises(UserError, match="weight_decay would override.*use learning_rate / weight_decay"):
        optimizers.check("torch.optim.Adagrad", {"weight_decay": 0.1})
    with pytest.raises(UserError, match="adamw_wd would override"):
        optimizers.check("muon", {"adamw_wd": 0.1})
    with pytest.raises(UserError, match="set by qwen-ft"):
        optimizers.check("muon", {"use_muon": False})
    with pytest.raises(UserError, match="rejects kwargs"):  # a bad value, caught before any training
        optimizers.check("sgd", {"momentum": -1.0})
    with pytest.raises(UserError, match="needs optimizer"):  # a wrapper: nothing in a config can fill it
        optimizers.check("pytorch_optimizer.Lookahead", {})
    # pytorch_optimizer's constructors take **kwargs and drop unknown ones: checked against the named ones
    with pytest.raises(UserError, match="'gama'.*did you mean 'gamma'"):
        optimizers.check("adabound", {"gama": 0.1})
    assert optimizers.check("adabound", {"gamma": 0.1, "betas": [0.9, 0.99]}) is optimizers.SHIPPED["adabound"]
    with pytest.raises(UserError, match="no weight decay"):
        optimizers.build("torch.optim.Rprop", tiny_lora_model(), 1e-3, 0.01, {})


def test_reading_names_never_mutates_module_state():
    before = dict(vars(optimizers))
    shipped = dict(optimizers.SHIPPED)
    defaults = {k: dict(s.defaults) for k, s in shipped.items()}
    for name in ("adamw", "Adagrad", "pytorch_optimizer.Ranger", "lion", "loraplus"):
        optimizers.check(name, {})
        optimizers.default_lr(name, 3e-4)
    with pytest.raises(UserError):
        optimizers.check("this.s", {})
    optimizers.build("sgd", tiny_lora_model(), 0.1, 0.0, {"nesterov": True})
    assert dict(vars(optimizers)) == before
    assert dict(optimizers.SHIPPED) == shipped
    assert {k: dict(s.defaults) for k, s in optimizers.SHIPPED.items()} == defaults
    with pytest.raises(TypeError):
        optimizers.SHIPPED["mine"] = shipped["adamw"]  # read-only
    with pytest.raises(TypeError):
        optimizers.SHIPPED["sgd"].defaults["momentum"] = 0.0


def test_default_lr_takes_the_preset_for_the_adam_family_only():
    assert optimizers.default_lr("adamw", 5e-4) == 5e-4
    assert optimizers.default_lr("loraplus", 5e-4) == 5e-4 and optimizers.default_lr("muon", 5e-4) == 5e-4
    assert optimizers.default_lr("sgd", 5e-4) == 0.1 and optimizers.default_lr("lion", 5e-4) == 5e-5
    assert optimizers.default_lr("adamw", None) == 2e-4
    assert optimizers.default_lr("Adagrad", 5e-4) == 1e-2  # a class by name: its own default
    with pytest.raises(UserError, match="no default learning rate"):
        optimizers.default_lr("pytorch_optimizer.A2Grad", None)


# ----------------------------------------------------------------------------- measurements

def test_state_bytes_counts_the_state_tensors():
    model = tiny_lora_model()
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == LORA_NUMEL
    adamw = optimizers.build("adamw", model, 1e-3, 0.0, {})
    assert optimizers.state_bytes(adamw) == 0  # state is created on the first step
    train(model, adamw, 1)
    # exp_avg + exp_avg_sq in fp32, and one fp32 step counter per tensor
    assert optimizers.state_bytes(adamw) == 2 * 4 * LORA_NUMEL + 4 * LORA_TENSORS == 32880
    model = tiny_lora_model()
    sgd = optimizers.build("sgd", model, 0.1, 0.0, {})
    train(model, sgd, 1)
    assert optimizers.state_bytes(sgd) == 4 * LORA_NUMEL  # one momentum buffer, no counter


def test_adabound_bounds_are_the_ones_pytorch_optimizer_applies():
    """Step t = 3 after the schedule halved the lr, hand-computed: tiny gradients hit the upper bound, huge
    ones the lower; both bounds scale with lr / base_lr."""
    from pytorch_optimizer import AdaBound

    lr, final_lr, gamma, b1 = 1e-3, 0.1, 0.2, 0.9
    lower, upper = optimizers.adabound_bounds(final_lr, gamma, lr / 2, lr, 3)
    assert (lower, upper) == pytest.approx((0.05 * (1 - 1 / 1.6), 0.05 * (1 + 1 / 0.6)))
    for g, bound in ((1e-6, upper), (1e6, lower)):
        p = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
        opt = AdaBound([p], lr=lr, final_lr=final_lr, gamma=gamma, weight_decay=0.0, eps=0.0)
        m = 0.0
        for t in (1, 2, 3):
            if t == 3:
                opt.param_groups[0]["lr"] = lr / 2
            before = p.item()
            p.grad = torch.tensor([g], dtype=torch.float64)
            opt.step()
            m = b1 * m + (1 - b1) * g
        assert before - p.item() == pytest.approx(bound * m, rel=1e-9)
    low, up = optimizers.adabound_bounds(0.1, 1e-3, 1e-3, 1e-3, 100)  # the study's ~100 steps at gamma 1e-3
    assert up / low == pytest.approx(121, rel=1e-6)


def test_adabound_step_bounds_follow_luo_et_al_2019():
    """First step, hand-computed. Paper (reference implementation): with m_t, v_t Adam's moments,
    eta = clip(lr * sqrt(1 - b2^t) / (1 - b1^t) / (sqrt(v_t) + eps), lower(t), upper(t)), theta -= eta * m_t,
    lower(t) = final_lr * (1 - 1 / (gamma t + 1)), upper(t) = final_lr * (1 + 1 / (gamma t))."""
    from pytorch_optimizer import AdaBound

    lr, final_lr, gamma, b1, b2 = 1e-3, 0.1, 1e-3, 0.9, 0.999
    lower, upper = final_lr * (1 - 1 / (gamma + 1)), final_lr * (1 + 1 / gamma)  # t = 1: ~1e-4 and 100.1
    assert optimizers.adabound_bounds(final_lr, gamma, lr, lr, 1) == pytest.approx((lower, upper))

    def first_step(g: float) -> float:
        p = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
        opt = AdaBound([p], lr=lr, final_lr=final_lr, gamma=gamma, betas=(b1, b2), weight_decay=0.0, eps=0.0)
        p.grad = torch.tensor([g], dtype=torch.float64)
        opt.step()
        return p.item()

    m1 = lambda g: (1 - b1) * g  # noqa: E731
    # moderate gradient: the Adam step lr/(1-b1)/|g| = 0.01 lies inside [lower, upper]: plain Adam, -lr * sign(g)
    assert first_step(1.0) == pytest.approx(-lr, rel=1e-9)
    # tiny gradient: Adam's step 1e4 exceeds upper(1) = 100.1, so the step is upper * m_1
    assert first_step(1e-6) == pytest.approx(-upper * m1(1e-6), rel=1e-9)
    # huge gradient: Adam's step 1e-8 is below lower(1) ~ 1e-4, so the step is lower * m_1
    assert first_step(1e6) == pytest.approx(-lower * m1(1e6), rel=1e-9)


# ----------------------------------------------------------------------------- callers

def test_the_old_global_registry_is_gone():
    for old in ("REGISTRY", "register", "from_yaml", "resolve", "check_kwargs"):
        assert not hasattr(optimizers, old), old


def test_train_accepts_optimizer_flag(tiny_qwen3):
    from qwen_ft.cli import build_parser
    from qwen_ft.config_flags import user_layers
    from qwen_ft.training import resolve_config

    for name in ("sgd", "lion", "Adagrad"):
        args = build_parser().parse_args(["train", "--model", str(tiny_qwen3), "--optimizer", name])
        cfg = resolve_config(user_layers(args)).config
        assert cfg.optim.optimizer == name and cfg.optim.learning_rate == optimizers.get(name).default_lr
