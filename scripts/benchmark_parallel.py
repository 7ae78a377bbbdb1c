"""Seconds per edit on 1 rank against 2 (or more) ranks of context parallelism, side by side in one run:

python scripts/benchmark_parallel.py --preset cpu-mid --ranks 1 2     # 2 CPU processes: a sanity check
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flux.lab.parallel_benchmark import benchmark  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu-mid")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=28)
    args = parser.parse_args()
    report = benchmark(args.preset, tuple(args.ranks), args.steps)
    for row in report["rows"]:
        difference = "-" if row["max_latent_difference"] is None else f"{row['max_latent_difference']:.1e}"
        print(f"{row['ranks']} ranks, {row['level']:>14}: {row['seconds']:7.2f} s per edit, "
              f"{row['speedup']:.2f}x against {args.ranks[0]}, latents differ by {difference}")  # fmt: skip
    print(json.dumps(report))
