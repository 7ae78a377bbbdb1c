#!/usr/bin/env bash
# One prepared GPU check (one H100, no network, at most 8 minutes): full-size random weights,
# 1024x1024 edit of a 1024x1024 input, 28 steps, every level (and at 8 steps, compiled); eager, compiled (dynamic shapes),
# compiled static shapes (with the stall at sizes never seen), compiled + FP8; a 3000x2000 photo edited
# through the product path with and without a mask (crop and stitch);
# then a cold start in a fresh process that reuses the compile cache; with 2+ GPUs, one edit across
# N of them against one (skipped, and said so, on one GPU); last, a few proxy training
# steps on CUDA (scripts/train_proxy.py --quick: the training's device path runs on a GPU).
#   bash scripts/gpu_check.sh OUT_DIR      -> OUT_DIR/gpu_check.json, cold_start.json, gpu_check.log
# Uses the machine's python and torch. Packages that machine lacks (diffusers, torchao) travel as
# wheels in .whl/ (bash scripts/gpu_wheels.sh, here, with network) and are installed from there.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: scripts/gpu_check.sh OUT_DIR}
mkdir -p "$out"
PY=python3
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-$PWD/.cache/torch-compile}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$out/gpu.txt" || true
timeout 450 "$PY" -m flux.lab.gpu_check "$out" 2>&1 | tee "$out/gpu_check.log" || true
# several GPUs: one edit across N = 2, 4, 8 of them against 1, eager, then the most compiled (parallel.json);
# on one GPU it says it was skipped
timeout 480 "$PY" -m flux.lab.gpu_check "$out" --parallel 2>&1 | tail -5 | tee "$out/parallel.log" || true
FLUX_DEVICE=cuda timeout 20 "$PY" scripts/train_proxy.py --quick --out /tmp/proxy_quick 2>&1 | tail -3 | tee "$out/train_proxy_quick.log"
