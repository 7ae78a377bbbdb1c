"""Write the tiny random FLUX.1-Kontext-dev model, in the real diffusers layout, into a directory:

python scripts/make_tiny_weights.py DIR [--seed 0] [--safety pass|flag]

Deterministic: the same seed writes the same bytes. Tests build it once per session themselves.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flux.lab.tiny import make_tiny_weights  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="directory to write (replaced if it exists)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--safety", choices=("pass", "flag"), default="pass", help="flag: the checker flags every image"
    )
    args = parser.parse_args()
    print(f"wrote {make_tiny_weights(args.out, seed=args.seed, safety=args.safety)}")
