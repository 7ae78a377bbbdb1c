"""Benchmark the acceleration levels side by side with diffusers (random weights; speed does not depend on them).

  python scripts/benchmark.py --size tiny                  # seconds, smoke
  python scripts/benchmark.py --size cpu-mid               # minutes on 2 CPU cores, 512x512
  python scripts/benchmark.py --size full --out DIR        # a CUDA GPU, 1024x1024, bf16

Writes benchmark-SIZE.json, .md and .png (speedup against drift) into --out (default results/).
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flux.device import dtype_for, pick_device  # noqa: E402
from flux.lab.benchmark import (  # noqa: E402
    SIZES,
    components_for,
    markdown_table,
    reference_costs,
    run_benchmark,
    write_report,
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=list(SIZES), default="tiny")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("results"))
    parser.add_argument("--weights", type=Path, default=None, help="benchmark a weights tree instead")
    parser.add_argument("--references", action="store_true", help="instead: edit time with 0 to 3 reference images")
    args = parser.parse_args()
    device = pick_device()
    components = components_for(args.size, device, dtype_for(device), args.weights)
    if args.references:
        rows = reference_costs(components, args.size, steps=args.steps, repeats=args.repeats)
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"benchmark-{args.size}-references.json"
        path.write_text(
            json.dumps({"size": args.size, "steps": args.steps, "level": "go fast", "rows": rows}, indent=2)
        )
        print("| references | conditioning tokens | seconds per edit | vs none |\n|---|---|---|---|")
        for r in rows:
            print(
                f"| {r['references']} | {r['conditioning_tokens']} | {r['seconds_per_edit']:.2f} | {r['ratio_to_no_reference']:.2f}x |"
            )
        print(f"wrote {path}")
        return 0
    report = run_benchmark(components, args.size, steps=args.steps, repeats=args.repeats)
    paths = write_report(report, args.out)
    print(markdown_table(report))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
