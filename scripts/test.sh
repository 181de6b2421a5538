#!/usr/bin/env bash
# Set up (if needed) and run the tests: lint, the fast tier, and with --slow the real-model tier too.
# pytest ends with how many passed and skipped; -rfEs lists each failure, and each skip with its reason.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff check src tests benchmarks
python -m pytest -m "not slow" -rfEs $(printf "%s\n" "$@" | grep -v -- "^--slow$" || true)
if [[ " $* " == *" --slow "* ]]; then
  python -m pytest -m slow -rfEs
fi
