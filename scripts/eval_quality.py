"""Evaluate every acceleration level and its alternatives on held-out edits with the trained proxy:

python scripts/eval_quality.py --weights flux/proxy_weights --edits 120 --out docs
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flux.lab.evaluate import evaluate, markdown, write  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, default=Path("flux/proxy_weights"))
    parser.add_argument("--edits", type=int, default=120)
    parser.add_argument("--out", type=Path, default=Path("results/quality"))
    args = parser.parse_args()
    result = evaluate(args.weights, edits=args.edits)
    paths = write(result, args.out)
    print(markdown(result["report"]))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
