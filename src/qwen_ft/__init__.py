"""qwen-ft: LoRA-fine-tune a causal LM to generate a category label or an answer letter."""

__version__ = "0.1.0"
