"""`--torch-compile` (models.compiled_blocks): the compiled training path agrees with the eager one."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from qwen_ft.cli import main
from qwen_ft.models import compiled_blocks
from tests.conftest import tiny_train_args

EXTRA = ("--learning-rate", "1e-2", "--seed", "5", "--max-samples-per-category", "4")


def losses(run) -> list[float]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["type"] == "step"]


def predictions(run) -> list[str]:
    assert main(["validate", "--model-path", str(run), "--precision", "fp32", "--output-dir", str(run / "v")]) == 0
    return [json.loads(x)["pred"] for x in (run / "v" / "predictions.jsonl").read_text().splitlines()]


def test_compiled_blocks_swap_the_layer_parts_and_restore_them(isolated_cache):
    from torch._dynamo.utils import counters
    from transformers import Qwen3Config, Qwen3ForCausalLM

    # 10 layers: more than dynamo's 8 recompiles, after which a per-layer recompile would silently run eagerly
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=10,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=8)).eval()
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        eager = model(ids).logits
    layer = model.model.layers[0]
    torch._dynamo.reset()
    counters.clear()
    with compiled_blocks(model) as n, torch.no_grad():
        assert n == 3 * len(model.model.layers)
        assert "forward" in vars(layer.mlp) and "forward" in vars(layer.input_layernorm)
        assert torch.allclose(model(ids).logits, eager, atol=1e-5)
        # dynamic shapes: another batch shape runs through the same compiled code
        assert torch.allclose(model(ids[:1, :4]).logits, eager[:1, :4], atol=1e-5)
    # one graph per kind of part (MLP, RMSNorm), shared by all 10 layers and both shapes - not one per layer
    assert 1 <= counters["stats"]["unique_graphs"] <= 4, dict(counters["stats"])
    assert "forward" not in vars(layer.mlp) and "forward" not in vars(layer.post_attention_layernorm)
    assert (isolated_cache / "inductor").is_dir()  # inductor's cache lives under the qwen-ft cache folder


@pytest.mark.filterwarnings("ignore")
def test_compiled_training_matches_eager_losses_and_predictions(tiny_qwen3, tmp_path, isolated_cache):
    from torch._dynamo.utils import counters

    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    torch._dynamo.reset()
    counters.clear()
    assert main(tiny_train_args(tiny_qwen3, eager, *EXTRA)) == 0
    assert counters["stats"]["unique_graphs"] == 0
    assert main(tiny_train_args(tiny_qwen3, compiled, *EXTRA, "--torch-compile")) == 0
    assert counters["stats"]["unique_graphs"] > 0  # the flag did compile (a flag that did nothing would agree too)
    a, b = losses(eager), losses(compiled)
    assert len(a) >= 5 and len(a) == len(b)
    # fp32: inductor fuses and reorders reductions, so equal up to float rounding (stated tolerance 1e-4)
    assert all(abs(x - y) <= 1e-4 * max(1.0, abs(x)) for x, y in zip(a, b)), (a, b)
    assert a[0] != a[-1]  # the model did train: a loss that never moves would agree trivially
    wa, wb = load_file(eager / "adapter_model.safetensors"), load_file(compiled / "adapter_model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], atol=1e-4) for k in wa)
    assert any(not torch.equal(wa[k], torch.zeros_like(wa[k])) for k in wa if "lora_B" in k)
    assert predictions(eager) == predictions(compiled)
