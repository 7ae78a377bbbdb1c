"""Benchmark the acceleration levels side by side with diffusers (random weights; speed does not depend on them).

  python scripts/benchmark.py --size tiny                  # seconds, smoke
  python scripts/benchmark.py --size cpu-mid               # minutes on 2 CPU cores, 512x512
  python scripts/benchmark.py --size full --out DIR        # a CUDA GPU, 1024x1024, bf16

Writes benchmark-SIZE.json, .md and .png (speedup against drift) into --out (default results/).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flux.device import dtype_for, pick_device  # noqa: E402
from flux.lab.benchmark import SIZES, components_for, markdown_table, run_benchmark, write_report  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=list(SIZES), default="tiny")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("results"))
    parser.add_argument("--weights", type=Path, default=None, help="benchmark a weights tree instead")
    args = parser.parse_args()
    device = pick_device()
    components = components_for(args.size, device, dtype_for(device), args.weights)
    report = run_benchmark(components, args.size, steps=args.steps, repeats=args.repeats)
    paths = write_report(report, args.out)
    print(markdown_table(report))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
