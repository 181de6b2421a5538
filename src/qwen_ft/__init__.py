"""qwen-ft: LoRA-fine-tune a causal LM to generate a category label or an answer letter."""

import os

__version__ = "0.1.0"

# Whether the user chose inductor's cache folder: importing transformers' Trainer fills the variable in with
# torch's default, so it is read here, before any of that; otherwise `--torch-compile` caches under ours.
USER_INDUCTOR_CACHE = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
