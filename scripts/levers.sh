#!/usr/bin/env bash
# Issue 24's lever runs, one after another (resumable: a finished step is skipped, a training resumes).
#   nohup bash scripts/levers.sh > runs/levers.log 2>&1 &
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
while [ ! -f runs/recipe/COMPLETE ]; do sleep 30; done
python benchmarks/held_out_table.py runs/recipe --adapter-scales 0.5 --json runs/table-recipe.json
train configs/levers/balanced.yaml runs/levers/balanced && \
  python benchmarks/held_out_table.py runs/levers/balanced --json runs/table-balanced.json
train configs/levers/balanced_regularised.yaml runs/levers/balanced-regularised && \
  python benchmarks/held_out_table.py runs/levers/balanced-regularised --json runs/table-balanced-regularised.json
