#!/usr/bin/env bash
# bash run_all.sh [--seed 42] [--config FILE] [--phases ...] [--optimizers ...] [--force]
#
# The whole optimizer study in one command: environment, data, training (one run per optimizer), merge,
# evaluation and analysis (results/results.csv, results/report.md, plots, notebooks/analysis.ipynb).
# Without --config it runs $CONFIG, else configs/demo.yaml (SmolLM2-135M + bundled questions: offline,
# CPU, ~15-20 min). The seed's full GPU setup (Qwen3-8B on CommonsenseQA, bf16):
#     CONFIG=configs/training_config.yaml bash run_all.sh --seed 42
# Re-running skips finished phases; an interrupted run resumes. Env overrides: TRAIN_BATCH_SIZE,
# GRAD_ACCUM_STEPS, USE_BF16, USE_FLASH_ATTN, HF_ENDPOINT.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
bash phases/0_env.sh
. .venv/bin/activate
args=("$@")
if [[ " $* " != *" --config "* && " $* " != *" --config="* ]]; then
  args=(--config "${CONFIG:-configs/demo.yaml}" "${args[@]}")
fi
exec qwen-ft study "${args[@]}"
