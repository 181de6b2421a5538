"""The optimizers, where the seed's README says to look for them (`utils/optimizers.py`).

The code lives in `qwen_ft.optimizers` and is re-exported here. Nothing needs registering: name an
optimizer in the study YAML or with `qwen-ft train --optimizer NAME`, either a shipped entry (listed by
running this file) or any torch.optim / pytorch_optimizer optimizer class:

    optimizers:
      lion: {}                                              # a shipped entry
      my_adagrad: {optimizer: torch.optim.Adagrad, learning_rate: 0.01, kwargs: {lr_decay: 0.0}}

Keyword arguments are checked against the class: an unknown one is an error, with a suggestion, and
`lr` / `weight_decay` belong in learning_rate / weight_decay. Only torch.optim and pytorch_optimizer are
ever imported from a name. A new shipped entry (with its default lr and why) is one line in SHIPPED there.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # runs from a plain checkout too

from qwen_ft.optimizers import (  # noqa: E402
    SHIPPED,
    OptimizerModeCallback,
    OptimizerSpec,
    adabound_bounds,
    build,
    check,
    default_lr,
    eval_mode,
    get,
    state_bytes,
)

__all__ = ["SHIPPED", "OptimizerModeCallback", "OptimizerSpec", "adabound_bounds", "build", "check", "default_lr",
           "eval_mode", "get", "state_bytes"]

if __name__ == "__main__":
    for name, spec in SHIPPED.items():
        lr = f"{spec.default_lr:g}" + (" (or the size preset's)" if spec.uses_preset_lr else "")
        print(f"{name:19s} {spec.cls_path:37s} {spec.kind:12s} lr {lr:25s} {dict(spec.defaults)}")
