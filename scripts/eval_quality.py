"""Evaluate every acceleration level and its alternatives on held-out edits with the trained proxy:

python scripts/eval_quality.py --weights flux/proxy_weights --edits 120 --out docs
python scripts/eval_quality.py --short-schedules --edits 120 --out docs   # the levels at 8 to 20 steps
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flux.lab import schedules  # noqa: E402
from flux.lab.evaluate import evaluate, markdown, write  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, default=Path("flux/proxy_weights"))
    parser.add_argument("--edits", type=int, default=120)
    parser.add_argument("--out", type=Path, default=Path("results/quality"))
    parser.add_argument("--short-schedules", action="store_true", help="the levels at 8, 12, 16 and 20 steps")
    args = parser.parse_args()
    if args.short_schedules:
        report = schedules.short_schedules(args.weights, edits=args.edits)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "short-schedules.json").write_text(json.dumps(report, indent=2) + "\n")
        print(schedules.markdown(report))
        print(f"wrote {args.out / 'short-schedules.json'}")
    else:
        result = evaluate(args.weights, edits=args.edits)
        paths = write(result, args.out)
        print(markdown(result["report"]))
        print("wrote " + ", ".join(str(p) for p in paths.values()))
