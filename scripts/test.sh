#!/usr/bin/env bash
# The README's test command: set up the venv if needed, lint, run the test suite.
# Tests run in NEXUS_TEST_WORKERS pytest-xdist worker processes (default 2: on the 2-core CI VM the default suite
# takes ~10 min instead of ~15 single-process, most tests being single-threaded compiles); later arguments win,
# so `bash scripts/test.sh -n 0` runs in one process.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh
.venv/bin/ruff check .
.venv/bin/python -m pytest -q -n "${NEXUS_TEST_WORKERS:-2}" "$@"
