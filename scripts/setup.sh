#!/usr/bin/env bash
# Create .venv with the pinned dependencies (idempotent). Needs python3.11 and the package registry.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! cmp -s requirements-dev.txt .venv/.installed 2>/dev/null || ! cmp -s requirements.txt .venv/.installed-runtime 2>/dev/null; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r requirements-dev.txt
  cp requirements-dev.txt .venv/.installed
  cp requirements.txt .venv/.installed-runtime
fi
