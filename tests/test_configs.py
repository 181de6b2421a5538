"""Every shipped YAML loads, and opens with a comment giving the exact command that uses it."""

from __future__ import annotations

from pathlib import Path

import pytest

from qwen_ft.study.config import load_study_config

ALL = sorted(p for p in (Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
TRAIN = [p for p in ALL if p.read_text().startswith("# qwen-ft train ")]  # one run's recipe, not a study
CONFIGS = [p for p in ALL if p not in TRAIN]


# file -> settings it makes (each differs from the default, so a loader that drops a file, a section or an
# `include:` fails); dotted paths into the loaded StudyConfig (or TrainConfig for the train recipe)
SHIPPED = {
    "demo.yaml": {  # through its include of the packaged demo study
        "demo": True, "base.data.data": "demo-mc", "base.data.prompt_style": "plain", "base.data.val_fraction": 0.3,
        "base.data.test_fraction": 0.0, "base.model.max_length": 128, "base.train.early_stopping_patience": 0,
        "protocol.tune_rows": 40, "protocol.trial_max_steps": 8, "protocol.target": 0.4, "eval.decode": "exact",
        "eval.normalize": "char", "eval.batch_size": 32},
    "csqa_cpu.yaml": {
        "output_dir": "runs/study-csqa-cpu", "base.model.max_length": 128, "base.data.prompt_style": "plain",
        "base.data.validation_data": "../shared/data/commonsense_qa/validation.jsonl", "base.train.batch_size": 16,
        "protocol.trials": 6, "protocol.final_seeds": [1, 2, 3], "protocol.tune_rows": 200,
        "protocol.final_max_steps": 40, "eval.decode": "exact", "eval.normalize": "char"},
    "training_config.yaml": {  # and, through its include, model_config.yaml's model
        "base.model.model": "Qwen/Qwen3-8B", "base.model.precision": "bf16", "base.model.gradient_checkpointing": True,
        "base.data.data": "tau/commonsense_qa", "base.data.hub_split": "train", "base.lora.rank": 32,
        "base.lora.alpha": 64, "base.lora.dropout": 0.05, "base.optim.warmup_ratio": 0.05, "base.train.epochs": 2,
        "base.train.grad_accum": 2, "protocol.trials": 6, "protocol.tune_rows": 500, "protocol.target": 0.7},
    "model_config.yaml": {
        "base.model.model": "Qwen/Qwen3-8B", "base.model.precision": "bf16", "base.model.attn_implementation": "sdpa",
        "base.model.gradient_checkpointing": True, "base.model.max_length": 256},
    "mmlu_pro_recipe.yaml": {
        "model.max_length": 256, "data.data": "../shared/data/mmlu_pro/test.parquet", "data.split_by": "src",
        "data.val_fraction": 0.1, "data.max_train_samples_per_category": 400, "optim.learning_rate": 1e-3,
        "train.epochs": 1, "train.batch_size": 16, "train.early_stopping_patience": 0,
        "train.output_dir": "runs/mmlu-pro-recipe"},
}


def test_configs_exist(monkeypatch):
    """Each named config is shipped, loads through the loader its command uses, and gives the settings it says."""
    import operator

    from qwen_ft.config import TrainConfig, build, load_yaml

    for var in ("TRAIN_BATCH_SIZE", "GRAD_ACCUM_STEPS", "USE_BF16", "USE_FLASH_ATTN"):
        monkeypatch.delenv(var, raising=False)
    by_name = {p.name: p for p in ALL}
    assert set(SHIPPED) <= set(by_name), sorted(set(SHIPPED) - set(by_name))
    for name, expected in SHIPPED.items():
        path = by_name[name]
        if path in TRAIN:  # as `qwen-ft train --config` reads it
            cfg = build(TrainConfig, load_yaml(path), str(path))
        else:
            cfg = load_study_config([path])
        got = {key: operator.attrgetter(key)(cfg) for key in expected}
        assert got == expected, name


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
