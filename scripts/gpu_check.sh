#!/usr/bin/env bash
# One prepared GPU check (one H100, no network, at most 8 minutes): full-size random weights,
# 1024x1024 edit of a 1024x1024 input, 28 steps, every level; eager, compiled, compiled + FP8.
#   bash scripts/gpu_check.sh OUT_DIR      -> OUT_DIR/gpu_check.json (+ gpu_check.log)
# Uses the machine's python and torch when they import; otherwise set up .venv first.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: scripts/gpu_check.sh OUT_DIR}
mkdir -p "$out"
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-$PWD/.cache/torch-compile}"
timeout 470 "$PY" -m flux.gpu_check "$out" 2>&1 | tee "$out/gpu_check.log"
