"""Count the shapes each instruction puts in their place, in the target's colour, on fresh scenes (the
proxy's "none" output), and the inversion's right colours by shape and input colour:

  python scripts/check_shapes.py --weights flux/proxy_weights --scenes 20 --inversions 30
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from flux.lab.shapes import count_shapes, inversion_colours, markdown  # noqa: E402
from flux.loading import load_components  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, default=Path("flux/proxy_weights"))
    parser.add_argument("--scenes", type=int, default=20, help="fresh scenes per instruction")
    parser.add_argument("--inversions", type=int, default=30, help="fresh scenes for the inversion's colours")
    args = parser.parse_args()
    components = load_components(args.weights, torch.device("cpu"), torch.float32)
    rows = count_shapes(components, args.scenes)
    inversion = inversion_colours(components, args.inversions) if args.inversions else None
    print(markdown(rows, inversion))
