#!/usr/bin/env bash
# Set up .venv (pinned dependencies) and run the lint and the whole test suite. No GPU, no network.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m pytest "$@"
