#!/usr/bin/env bash
# Issue 24's lever runs, one after another (resumable: a finished step is skipped, a training resumes).
#   nohup bash scripts/levers.sh > runs/levers.log 2>&1 &
# Each run gets a row of benchmarks/held_out_table.py and of benchmarks/near_copies.py.
set -uo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
DATA=${DATA:-../shared/data/mmlu_pro/test.parquet}
train() {  # CONFIG OUT
  if [ ! -f "$2/COMPLETE" ]; then
    local resume=(); [ -f "$2/run.json" ] && resume=(--resume)
    qwen-ft train --config "$1" --data "$DATA" --output-dir "$2" "${resume[@]}" || return 1
  fi
}
table() {  # RUN NAME [held_out_table flags]
  [ -f "runs/table-$2.json" ] || python benchmarks/held_out_table.py "$1" --json "runs/table-$2.json" "${@:3}"
  python benchmarks/near_copies.py "$1"
}
train configs/levers/balanced.yaml runs/levers/balanced && table runs/levers/balanced balanced
train configs/mmlu_pro_recipe.yaml runs/recipe && table runs/recipe recipe --adapter-scales 0.5
train configs/levers/balanced_regularised.yaml runs/levers/balanced-regularised && \
  table runs/levers/balanced-regularised balanced-regularised
