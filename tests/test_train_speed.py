"""Training speed levers that must not change a single value: frozen weights held in the autocast dtype."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest
import torch

from qwen_ft import cli, malloc
from qwen_ft.config import LoraArgs
from qwen_ft.models import apply_lora, frozen_in_compute_dtype
from qwen_ft.training.batches import LeftPadCollator, answer_loss


def tiny_lora_model(seed: int = 0):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    base = Qwen3ForCausalLM(Qwen3Config(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                        tie_word_embeddings=True))
    model = apply_lora(base, LoraArgs(rank=4, alpha=8, dropout=0.0))
    for name, p in model.named_parameters():  # LoRA B starts at zero: give it values, so its gradient path counts
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return model.train()


def batch() -> dict:
    g = torch.Generator().manual_seed(1)
    feats = []
    for n in (9, 5, 12):  # different lengths: left padding, a mask, and a sliced logits_to_keep
        ids = torch.randint(3, 96, (n,), generator=g).tolist()
        feats.append({"input_ids": ids, "labels": [-100] * (n - 2) + ids[-2:]})
    return LeftPadCollator(0)(feats)


def step(model) -> tuple[torch.Tensor, dict]:
    b = dict(batch())
    labels, keep = b.pop("labels"), b.pop("logits_to_keep")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = answer_loss(model(**b, logits_to_keep=keep), labels)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def test_frozen_linears_held_in_bf16_compute_the_same_loss_and_gradients_bit_for_bit():
    reference, held = tiny_lora_model(), tiny_lora_model()
    loss_ref, grads_ref = step(reference)
    embed = held.get_input_embeddings().weight
    q = held.base_model.model.model.layers[0].self_attn.q_proj
    with frozen_in_compute_dtype(held, torch.bfloat16):
        # the lever did act: frozen projections and the output head in bf16, everything trained and the
        # embedding (the residual stream) still fp32, and the head no longer shares the embedding's tensor
        assert q.base_layer.weight.dtype == torch.bfloat16 and q.lora_A["default"].weight.dtype == torch.float32
        assert held.get_output_embeddings().weight.dtype == torch.bfloat16 and embed.dtype == torch.float32
        assert not q.cast_input_dtype_enabled
        loss_held, grads_held = step(held)
    assert torch.equal(loss_held, loss_ref), (loss_held.item(), loss_ref.item())
    assert grads_held.keys() == grads_ref.keys() and len(grads_ref) == 2 * 7 * 2
    for name, g in grads_ref.items():
        assert torch.equal(grads_held[name], g), name
    assert any(g.abs().sum() > 0 for g in grads_ref.values())
    # on exit the caller's model is as it was: fp32 weights, the tie restored, peft's input casting back on
    assert q.base_layer.weight.dtype == torch.float32 and q.cast_input_dtype_enabled
    assert held.get_output_embeddings().weight is held.get_input_embeddings().weight
    assert all(p.dtype == torch.float32 for p in held.parameters())


def test_fp32_precision_leaves_the_model_untouched():
    model = tiny_lora_model()
    before = {n: p for n, p in model.named_parameters()}
    with frozen_in_compute_dtype(model, torch.float32):
        assert {n: p for n, p in model.named_parameters()} == before
    with frozen_in_compute_dtype(model, None):
        assert all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_allocator_thresholds_apply_on_glibc_unless_turned_off():
    # mallopt is process-wide and cannot be undone: each setting in its own process. (Whether glibc's defaults
    # fault freed pages in again depends on the process's history - 6,144 to 286,080 minor faults for the same
    # 20 cycles of 60 MB in repeated runs - so the speed is measured by the benchmarks, not asserted here.)
    probe = "from qwen_ft.precision import resolve_precision; from qwen_ft.malloc import tune_allocator; " \
            "resolve_precision('fp32'); print(tune_allocator())"

    def applied(mode: str) -> str:
        env = {**os.environ, "QWEN_FT_MALLOC": mode}
        return subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                              check=True).stdout.strip()

    assert applied("tuned") == "True" and applied("system") == "False"


def thp_capable() -> bool:
    return malloc.environ_with_huge_pages({}) is not None


needs_thp = pytest.mark.skipif(not thp_capable(), reason="needs Linux, glibc >= 2.35 and transparent huge pages "
                                                         "in 'madvise' mode")


@needs_thp
def test_huge_page_tunable_joins_other_tunables_once_and_respects_the_opt_out():
    env = malloc.environ_with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "HOME": "/h"})
    assert env == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:" + malloc.HUGE_PAGES, "HOME": "/h",
                   malloc.RELAUNCHED: "1"}
    assert malloc.environ_with_huge_pages(env) is None  # already set: nothing to relaunch for
    # the restarted process never restarts again, even where glibc dropped GLIBC_TUNABLES (privileged processes)
    assert malloc.environ_with_huge_pages({malloc.RELAUNCHED: "1"}) is None
    assert malloc.environ_with_huge_pages({"QWEN_FT_MALLOC": "system"}) is None


@pytest.mark.parametrize("setting, applies", [("always [madvise] never", True), ("[always] madvise never", False),
                                              ("always madvise [never]", False), (None, False)])
def test_huge_page_tunable_only_where_glibc_would_use_it(tmp_path, monkeypatch, setting, applies):
    if not malloc._glibc_linux({}, (2, 35)):
        pytest.skip("needs Linux with glibc >= 2.35")
    path = tmp_path / "enabled"
    if setting is not None:  # None: the kernel has no such file (no THP support)
        path.write_text(setting + "\n")
    monkeypatch.setattr(malloc, "THP_SETTING", str(path))
    assert (malloc.environ_with_huge_pages({}) is not None) == applies


def run_probe(code: str) -> tuple[int, list[str]]:
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "QWEN_FT_MALLOC", malloc.RELAUNCHED)}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
    try:
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()  # a restart loop would otherwise outlive the test
    assert proc.returncode == 0
    return proc.pid, out.splitlines()


@needs_thp
def test_relaunch_replaces_the_process_once_with_the_tunable():
    # what runs before the restart runs twice (the same command line again), what runs after it once: in the
    # same process, with the tunable set
    pid, lines = run_probe("import os; from qwen_ft import malloc; print('before', flush=True); "
                           "malloc.relaunch_with_huge_pages(); print(os.getpid(), os.environ.get('GLIBC_TUNABLES'))")
    assert lines == ["before", "before", f"{pid} {malloc.HUGE_PAGES}"]


@needs_thp
def test_the_command_entry_relaunches_and_python_callers_of_main_do_not(monkeypatch):
    _, lines = run_probe("import sys; sys.argv = ['qwen-ft', '--version']; print('before', flush=True); "
                         "from qwen_ft import cli; raise SystemExit(cli.run())")
    assert lines[:2] == ["before", "before"] and lines[2].startswith("qwen-ft ")

    def refuse():
        raise AssertionError("main(argv) relaunched the calling process")

    monkeypatch.setattr(malloc, "relaunch_with_huge_pages", refuse)
    assert cli.main(["--help"]) == 0
    assert cli.main(["--version"]) == 0


def features(lengths=(9, 5, 12, 30)) -> list[dict]:
    g = torch.Generator().manual_seed(2)
    feats = []
    for n in lengths:  # answers of 2 and 3 tokens
        ids = torch.randint(3, 96, (n,), generator=g).tolist()
        k = 2 + n % 2
        feats.append({"input_ids": ids, "labels": [-100] * (n - k) + ids[-k:], "length": n})
    return feats


def loss_and_grads(model, b: dict) -> tuple[torch.Tensor, dict]:
    b = dict(b)
    labels, keep = b.pop("labels"), b.pop("logits_to_keep")
    loss = answer_loss(model(**b, logits_to_keep=keep), labels)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize("max_scores", [None, 16])  # the matmul segments, and sdpa per segment (long rows)
def test_a_packed_batch_gives_the_padded_batchs_loss_and_gradients(monkeypatch, max_scores):
    """PackedCollator + qwen-ft's attention: no padding through the linear layers, each example attending to
    itself only; the loss and every LoRA gradient equal those of the same examples padded (fp32: to rounding),
    and the Trainer's token count (labels after the first column) is the same. As in training, without a KV
    cache (transformers then derives a block mask from the restarting positions; the segments must be used)."""
    from qwen_ft import attention
    from qwen_ft.training.batches import PackedCollator

    if max_scores:
        monkeypatch.setattr(attention, "MAX_SCORES", max_scores)
    segment_calls = []
    original = attention.segment_attention
    monkeypatch.setattr(attention, "segment_attention", lambda *a: segment_calls.append(1) or original(*a))
    model = tiny_lora_model()
    model.config.use_cache = False
    assert not attention.packs(model)  # sdpa: no segments
    attention.use_on(model)
    assert attention.packs(model)
    for name, value in (("attention_dropout", 0.1), ("attn_logit_softcapping", 50.0), ("sliding_window", 8)):
        before = getattr(model.config, name, None)
        setattr(model.config, name, value)
        assert not attention.packs(model), name  # calls that would raise on segments: padded batches instead
        setattr(model.config, name, before)
    padded, packed = LeftPadCollator(0)(features()), PackedCollator(0, pack_above=0)(features())
    assert packed["input_ids"].shape == (1, 9 + 5 + 12 + 30) and packed[attention.SEGMENTS] == [9, 5, 12, 30]
    assert packed["position_ids"][0, 9:14].tolist() == list(range(5))
    assert packed["labels"][:, 1:].ne(-100).sum() == padded["labels"][:, 1:].ne(-100).sum() == 3 + 3 + 2 + 2
    loss_pad, grads_pad = loss_and_grads(model, padded)
    loss_pack, grads_pack = loss_and_grads(model, packed)
    assert len(segment_calls) == 2  # one per layer: the segment path, not only the derived mask
    assert torch.allclose(loss_pack, loss_pad, atol=1e-6), (loss_pack.item(), loss_pad.item())
    assert grads_pack.keys() == grads_pad.keys()
    for name, g in grads_pad.items():
        assert torch.allclose(grads_pack[name], g, atol=1e-6, rtol=1e-4), name
    assert sum(g.abs().sum() for g in grads_pad.values()) > 0
    # a segment must not see its neighbour: changing the first example changes nothing of the others' logits
    with torch.no_grad():
        b = {k: v for k, v in packed.items() if k != "labels"}
        other = dict(b, input_ids=b["input_ids"].clone())
        other["input_ids"][0, :9] = 3
        keep = b.pop("logits_to_keep")
        other.pop("logits_to_keep")
        a, c = model(**b).logits, model(**other).logits
    assert torch.allclose(a[0, 9:], c[0, 9:], atol=1e-5) and not torch.allclose(a[0, :9], c[0, :9])
    assert keep.tolist()[-1] == 9 + 5 + 12 + 30 - 1


def test_segments_where_attention_cannot_honour_them_raise():
    from types import SimpleNamespace

    from qwen_ft import attention

    q = torch.zeros(1, 2, 4, 8)
    with pytest.raises(RuntimeError, match="packed segments"):
        attention.matmul_attention(SimpleNamespace(is_causal=True, training=True), q, q, q, None, dropout=0.1,
                                   **{attention.SEGMENTS: [2, 2]})


def test_only_batches_that_would_pad_much_are_packed():
    from qwen_ft import attention
    from qwen_ft.training.batches import PACK_ABOVE_PADDING, PackedCollator

    collate = PackedCollator(0)
    even = collate(features((20, 19, 18)))  # 60 computed for 57 real: padded
    uneven = collate(features((30, 5, 6)))  # 90 computed for 41 real: packed
    assert 3 * 20 <= PACK_ABOVE_PADDING * 57 and 3 * 30 > PACK_ABOVE_PADDING * 41
    assert even["input_ids"].shape == (3, 20) and attention.SEGMENTS not in even
    assert uneven["input_ids"].shape == (1, 41) and uneven[attention.SEGMENTS] == [30, 5, 6]
