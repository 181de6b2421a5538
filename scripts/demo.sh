#!/usr/bin/env bash
# The main job: set up (if needed), then the optimizer study on the embedded SmolLM2-135M and the bundled
# five-choice questions - AdamW vs SGD+momentum vs AdaBound, data -> train -> merge -> eval -> analysis.
# Offline, CPU. Results: results/results.csv, results/report.md (+ plots), notebooks/analysis.ipynb.
# Same as `bash run_all.sh`; extra flags (--seed, --force, --phases, --optimizers) are passed on.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exec bash run_all.sh "$@"
