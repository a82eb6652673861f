#!/usr/bin/env bash
# Create .venv (when absent) and install nexus-jax with its test extras. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "import nexus_jax, torch, jax, flax" 2>/dev/null; then
  python3 -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
  # torch first, pinned exactly, so that no CUDA build is pulled in.
  .venv/bin/python -m pip install -q "torch==2.13.0" 2>&1 | grep -v "is ignored" || true
  .venv/bin/python -m pip install -q -e ".[test]" 2>&1 | grep -v "is ignored" || true
  .venv/bin/python -c "import nexus_jax, torch, jax, flax, transformers, diffusers" \
    || { echo "venv set-up failed" >&2; exit 1; }
fi
