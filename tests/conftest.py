"""Shared fixtures: a tiny random Qwen3 with the real Qwen3 tokenizer, the shared data folder, runs."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("QWEN_FT_SHARED", REPO.parent / "shared"))


def shared_path(*parts: str) -> Path:
    """A file under ../shared; skipped with a reason when absent, a failure under CI=true."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        msg = f"{path} is absent (the shared data/tokenizer folder beside the repo)"
        if os.environ.get("CI") == "true":
            pytest.fail(msg + " - CI must have ../shared")
        pytest.skip(msg)
    return path


@pytest.fixture(scope="session")
def qwen3_tokenizer_dir() -> Path:
    return shared_path("qwen3_tokenizer")


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory, qwen3_tokenizer_dir) -> Path:
    """A 2-layer random Qwen3 (hidden 32) saved with the real Qwen3 tokenizer."""
    import torch
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    out = tmp_path_factory.mktemp("tiny-qwen3")
    tok = AutoTokenizer.from_pretrained(qwen3_tokenizer_dir)
    config = Qwen3Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=1024,
                         tie_word_embeddings=True, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
                         pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    Qwen3ForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def qwen_tok(qwen3_tokenizer_dir):
    from qwen_ft.models import load_tokenizer

    return load_tokenizer(str(qwen3_tokenizer_dir))


@pytest.fixture(scope="session")
def tiny_model(tiny_qwen3):
    """The tiny Qwen3 loaded once, in eval mode (read-only tests)."""
    from qwen_ft.models import load_model

    return load_model(str(tiny_qwen3)).eval()


def full_logprobs(model, ids: list[int]):
    """[T, V] log-probabilities of a plain, uncached full-sequence forward (the reference for cached code)."""
    import torch

    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QWEN_FT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def tiny_train_args(model: Path, out: Path, *extra: str) -> list[str]:
    """CLI args for a seconds-long training run of the tiny model on a slice of the demo data."""
    return ["train", "--model", str(model), "--data", "demo", "--max-samples-per-category", "5",
            "--epochs", "1", "--batch-size", "8", "--precision", "fp32", "--max-length", "256",
            "--output-dir", str(out), *extra]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_qwen3) -> Path:
    """A finished run folder of the tiny model (shared by read-only tests)."""
    from qwen_ft.cli import main

    out = tmp_path_factory.mktemp("runs") / "tiny"
    assert main(tiny_train_args(tiny_qwen3, out, "--learning-rate", "1e-2")) == 0
    return out


def copy_run(run: Path, dst: Path) -> Path:
    shutil.copytree(run, dst)
    return dst
