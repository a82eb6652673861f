#!/usr/bin/env bash
# The README's main-job command: set up the venv if needed, then run the main job on the embedded default.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh
exec .venv/bin/python -m nexus_jax.main_job "$@"
