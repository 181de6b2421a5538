#!/usr/bin/env bash
# Set up (if needed), then train + validate the category task on the embedded SmolLM2-135M and the
# bundled demo questions (14 categories), offline on a CPU. Extra flags go to `qwen-ft train`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
. .venv/bin/activate
RUN=${RUN:-runs/demo-category}
qwen-ft train --model smollm2-135m --data demo --output-dir "$RUN" --overwrite "$@"
qwen-ft validate --model-path "$RUN"
