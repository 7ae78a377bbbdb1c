#!/usr/bin/env bash
# Wheels the GPU machine lacks (its image has torch, transformers, accelerate, safetensors,
# tokenizers, pillow and numpy, but not diffusers or torchao), fetched here into .whl/ (ignored
# by git) for the device tool to carry: run(command="bash scripts/gpu_check.sh $OUT", carry=[".whl"]).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 torchao==0.18.0
ls -l .whl
