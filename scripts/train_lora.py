"""Train a LoRA that teaches the proxy "make the background black", then measure it:

python scripts/train_lora.py --out results/lora --edits 40     # minutes on 2 CPU cores

Writes OUT/background-black.safetensors, OUT/lora-quality.json and OUT/lora-grid.png.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flux.lab.train_lora import evaluate_lora, train_lora, write_grid  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, default=Path("flux/proxy_weights"))
    parser.add_argument("--out", type=Path, default=Path("results/lora"))
    parser.add_argument("--edits", type=int, default=40)
    args = parser.parse_args()
    lora_path = train_lora(args.weights, args.out / "background-black.safetensors")
    result = evaluate_lora(args.weights, lora_path, edits=args.edits)
    (args.out / "lora-quality.json").write_text(json.dumps(result["report"], indent=2) + "\n")
    write_grid(result["samples"], args.out / "lora-grid.png")
    print(json.dumps(result["report"], indent=2))
