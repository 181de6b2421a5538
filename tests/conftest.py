"""Shared fixtures: a tiny random Qwen3 with a small ChatML tokenizer built here, the shared folder, runs.

The tests of our own code need nothing beside the repo: the tokenizer is a byte-level BPE trained at
session start on the bundled demo data, with a ChatML chat template of our own. Only the tests of the
real Qwen3 chat template and of real data sets use ../shared (`shared_path`: a skip, a failure in CI).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("QWEN_FT_SHARED", REPO.parent / "shared"))

# ChatML as Qwen3 writes it, without the think block: Qwen3's `enable_thinking` is accepted and ignored
CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{- raise_exception('unsupported role: ' + message['role']) -}}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
CHATML_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def shared_path(*parts: str) -> Path:
    """A file under ../shared; skipped with a reason when absent, a failure under CI=true."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        msg = f"{path} is absent (the shared data/tokenizer folder beside the repo)"
        if os.environ.get("CI") == "true":
            pytest.fail(msg + " - CI must have ../shared")
        pytest.skip(msg)
    return path


def _demo_texts():
    """The prompts the tests build: each demo row as its task renders it (instruction, labels, choices)."""
    from qwen_ft.config import DataArgs
    from qwen_ft.data.prepare import prepare

    for demo in ("demo", "demo-mc"):
        prepared = prepare(DataArgs(data=demo), 0)
        task = prepared.task
        for rows in prepared.splits.values():
            for row in rows:
                yield f"{task.system_message()}\n\n{task.user_message(row)}\n{task.answer(row, row['label'])}"


def build_chatml_tokenizer(out: Path, vocab_size: int = 3072):
    """A byte-level BPE (any text encodes) trained in seconds on the demo data; Qwen3's special tokens,
    eos <|im_end|>, pad <|endoftext|>, no BOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(_demo_texts(), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=CHATML_SPECIAL, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  chat_template=CHATML_TEMPLATE)
    tok.save_pretrained(out)
    return tok


@pytest.fixture(scope="session")
def chatml_tokenizer_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("chatml-tokenizer")
    build_chatml_tokenizer(out)
    return out


@pytest.fixture(scope="session")
def qwen3_tokenizer_dir() -> Path:
    return shared_path("qwen3_tokenizer")


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory, chatml_tokenizer_dir) -> Path:
    """A 2-layer random Qwen3 (hidden 32) saved with the ChatML fixture tokenizer."""
    import torch
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    out = tmp_path_factory.mktemp("tiny-qwen3")
    tok = AutoTokenizer.from_pretrained(chatml_tokenizer_dir)
    config = Qwen3Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=1024,
                         tie_word_embeddings=True, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
                         pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    Qwen3ForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def qwen_tok(chatml_tokenizer_dir):
    """The tiny Qwen3's tokenizer (the ChatML fixture), loaded as the commands load it."""
    from qwen_ft.models import load_tokenizer

    return load_tokenizer(str(chatml_tokenizer_dir))


@pytest.fixture(scope="session")
def real_qwen3_tok(qwen3_tokenizer_dir):
    """The real Qwen3 tokenizer and chat template (skips without ../shared)."""
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


class ForcedAnswer:
    """The model made to write `answer` (token ids) after the token `after`, whatever its weights say, so that a
    test knows the right answer of an untrained model. A forward hook lifts, at every position whose input token
    is `after` or a token of `answer`, the logit of the token that follows it in `after + answer` to `margin`
    above that position's largest logit. Every way of calling the model (generate, cached, padded and packed
    passes, plain full forwards) sees the same forced model. The tokens of `after + answer` must be distinct
    but for the last (each one has a single successor)."""

    def __init__(self, model, after: int, answer: list[int], margin: float = 30.0):
        chain = [after, *answer]
        assert len(set(chain[:-1])) == len(chain) - 1, f"a token repeats in {chain}: no bigram can force it"
        self.model, self.margin = model, margin
        self.successor = dict(zip(chain[:-1], chain[1:]))

    def _hook(self, module, args, kwargs, output):
        import torch

        ids = kwargs.get("input_ids", args[0] if args else None)
        logits = output.logits
        keep = kwargs.get("logits_to_keep")
        # the input token at each position whose logits were kept (packed passes keep listed positions)
        ids = ids[:, keep.to(ids.device)] if isinstance(keep, torch.Tensor) else ids[:, -logits.size(1):]
        top = logits.amax(-1)
        for token, successor in self.successor.items():
            at = (ids == token).to(logits.device)
            logits[..., successor] = torch.where(at, top + self.margin, logits[..., successor])

    def __enter__(self) -> ForcedAnswer:
        self.handle = self.model.register_forward_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()
