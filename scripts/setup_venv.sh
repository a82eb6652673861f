#!/usr/bin/env bash
# Create .venv when absent and (re)install nexus-jax with its test extras whenever pyproject.toml changed. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
stamp=.venv/.nexus-jax-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ -x .venv/bin/python ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  exit 0
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
quiet() { grep -v "is ignored: it is neither" || true; }
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | quiet
# torch first, pinned exactly, so that no multi-GB CUDA build is pulled in.
.venv/bin/python -m pip install -q "torch==2.13.0" 2>&1 | quiet
.venv/bin/python -m pip install -q -e ".[test]" 2>&1 | quiet
.venv/bin/python -c "import nexus_jax, torch, jax, flax, transformers, diffusers, grain, orbax.checkpoint" \
  || { echo "venv set-up failed: see the pip output above" >&2; exit 1; }
echo "$want" > "$stamp"
