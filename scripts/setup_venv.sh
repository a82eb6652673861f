#!/usr/bin/env bash
# Create .venv when absent and (re)install nexus-jax with its test + tpu extras whenever pyproject.toml or the pinned
# versions (scripts/venv-constraints.txt) changed. Idempotent. The tpu extra brings libtpu for the planner tests.
set -euo pipefail
cd "$(dirname "$0")/.."
stamp=.venv/.nexus-jax-installed
want=$(cat pyproject.toml scripts/venv-constraints.txt | sha256sum | cut -d' ' -f1)
if [ -x .venv/bin/python ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  exit 0
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
quiet() { grep -v "is ignored: it is neither" || true; }
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | quiet
# torch first, pinned exactly, so that no multi-GB CUDA build is pulled in.
.venv/bin/python -m pip install -q "torch==2.13.0" 2>&1 | quiet
.venv/bin/python -m pip install -q -c scripts/venv-constraints.txt -e ".[test,tpu]" 2>&1 | quiet
.venv/bin/python -c "import nexus_jax, torch, jax, flax, transformers, diffusers, grain, orbax.checkpoint, libtpu" \
  || { echo "venv set-up failed: see the pip output above" >&2; exit 1; }
echo "$want" > "$stamp"
