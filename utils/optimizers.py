"""The optimizer registry, where the seed's README says to add an optimizer (`utils/optimizers.py`).

The registry itself lives in `qwen_ft.optimizers` and is re-exported here. To add an optimizer, either

1. add one line there (or here, before the study runs), e.g.

       register("lion", "pytorch_optimizer.Lion", 1e-4, betas=(0.9, 0.99))

   then list it in the study config: `optimizers: {lion: {}}`; or
2. name it in the study YAML only - no code at all:

       optimizers:
         adagrad: {target: torch.optim.Adagrad, lr: 0.01, kwargs: {lr_decay: 0.0}}

Either way the keyword arguments are checked against the class: an unknown one is an error, with a
suggestion. `qwen-ft train --optimizer NAME` uses the same registry.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # runs from a plain checkout too

from qwen_ft.optimizers import REGISTRY, check_kwargs, from_yaml, get, register, resolve  # noqa: E402

__all__ = ["REGISTRY", "check_kwargs", "from_yaml", "get", "register", "resolve"]

if __name__ == "__main__":
    for name, spec in sorted(REGISTRY.items()):
        print(f"{name:10s} {spec.target:32s} default lr {spec.default_lr:g}  {spec.defaults}")
