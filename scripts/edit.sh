#!/usr/bin/env bash
# Set up .venv and run one edit through the real code path: real weights in ./weights when
# present, otherwise the embedded tiny model (said loudly). Extra arguments go to `python -m flux edit`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
mkdir -p outputs
if [ ! -f outputs/example-input.png ]; then
  # a scene of the kind the proxy model was trained on, large enough for the real model too
  .venv/bin/python -c "
import numpy as np
from PIL import Image
from flux.lab.scenes import make_scene
Image.fromarray(make_scene(np.random.default_rng(7)).image).resize((512, 512), Image.NEAREST).save('outputs/example-input.png')"
fi
if [ $# -eq 0 ]; then
  set -- --image outputs/example-input.png --prompt "make the circle red" --out outputs/example-output.png --seed 0
fi
exec .venv/bin/python -m flux edit "$@"
