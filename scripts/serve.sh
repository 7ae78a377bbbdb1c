#!/usr/bin/env bash
# Serve the Cog HTTP server locally, without Docker, on 127.0.0.1:${PORT:-5000}.
# Real weights from ./weights (or WEIGHTS_DIR) when complete; when that folder is absent, the
# committed proxy model; an incomplete one stops here with what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# the server spawns its worker with the `python` found on PATH
export PATH="$PWD/.venv/bin:$PATH"
python scripts/openapi_schema.py
WEIGHTS_DIR=$(python -c 'from flux.cli import choose_weights; from flux.config import Config; print(choose_weights(Config.from_env())[0])')
export WEIGHTS_DIR
echo "serving $WEIGHTS_DIR on http://127.0.0.1:${PORT:-5000}" >&2
COG_PREDICT_TYPE_STUB=predict.py:Predictor PORT=${PORT:-5000} exec python -m cog.server.http --host 127.0.0.1
