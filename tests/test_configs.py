"""Every shipped YAML loads, and opens with a comment giving the exact command that uses it."""

from __future__ import annotations

from pathlib import Path

import pytest

from qwen_ft.study.config import load_study_config

ALL = sorted(p for p in (Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
TRAIN = [p for p in ALL if p.read_text().startswith("# qwen-ft train ")]  # one run's recipe, not a study
CONFIGS = [p for p in ALL if p not in TRAIN]


def test_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"demo.yaml", "training_config.yaml", "model_config.yaml", "csqa_cpu.yaml"} <= names


@pytest.mark.parametrize("path", TRAIN, ids=lambda p: p.name)
def test_shipped_train_recipe_loads_and_states_what_it_measured(path):
    import yaml

    from qwen_ft.config import TrainConfig, build

    text = path.read_text()
    cfg = build(TrainConfig, yaml.safe_load(text), str(path))  # unknown keys -> the same error `train` gives
    assert cfg.train.output_dir and cfg.model.model
    assert "Measured" in text and "%" in text  # the figures it was shipped with, next to it


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_yaml_loads_and_names_its_command(path, monkeypatch):
    for var in ("TRAIN_BATCH_SIZE", "GRAD_ACCUM_STEPS", "USE_BF16", "USE_FLASH_ATTN"):
        monkeypatch.delenv(var, raising=False)
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and ("qwen-ft " in first or "run_all.sh" in first), first
    cfg = load_study_config([path])  # validates every optimizer entry and its search space
    assert cfg.optimizers and cfg.seed == 42
    if path.name not in ("model_config.yaml", "extended.yaml"):
        assert set(cfg.optimizers) == {"adamw", "sgd", "adabound"}  # the seed's three stay the default set
    if path.name != "model_config.yaml":
        assert cfg.protocol.trials >= 4 and len(cfg.protocol.final_seeds) >= 2
        for name, entry in cfg.optimizers.items():
            assert entry.optimizer == name and "learning_rate" in entry.search
            low = entry.optim(cfg.base.optim, {k: r.low for k, r in entry.search.items()})
            assert low.optimizer == name and low.learning_rate > 0


def test_training_config_includes_the_model_config_and_env_overrides(monkeypatch):
    path = next(p for p in CONFIGS if p.name == "training_config.yaml")
    monkeypatch.setenv("TRAIN_BATCH_SIZE", "4")
    monkeypatch.setenv("GRAD_ACCUM_STEPS", "4")
    monkeypatch.setenv("USE_BF16", "false")
    cfg = load_study_config([path])
    b = cfg.base
    assert b.model.model == "Qwen/Qwen3-8B" and b.model.gradient_checkpointing
    assert (b.train.batch_size, b.train.grad_accum, b.model.precision) == (4, 4, "fp32")
    assert b.data.validation_data == "tau/commonsense_qa:validation"
