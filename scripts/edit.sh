#!/usr/bin/env bash
# Set up .venv and run one edit through the real code path: real weights in ./weights when
# present, otherwise the embedded tiny model (said loudly). Extra arguments go to `python -m flux edit`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
mkdir -p outputs
if [ ! -f outputs/example-input.png ]; then
  .venv/bin/python -c "
from PIL import Image, ImageDraw
image = Image.new('RGB', (1024, 768), (235, 225, 200))
draw = ImageDraw.Draw(image)
draw.ellipse((200, 200, 500, 500), fill=(40, 90, 200))
draw.rectangle((600, 300, 850, 550), fill=(200, 60, 40))
image.save('outputs/example-input.png')"
fi
if [ $# -eq 0 ]; then
  set -- --image outputs/example-input.png --prompt "make the circle red" --out outputs/example-output.png --seed 0
fi
exec .venv/bin/python -m flux edit "$@"
