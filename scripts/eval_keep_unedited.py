"""What keep_unedited does, measured with the trained proxy (docs/quality.md, "Keep the unedited"),
and what it costs at 12 and 64 megapixels (docs/benchmarks.md):

python scripts/eval_keep_unedited.py --edits 10 --out docs    # quality, the chain, robustness, the picture
python scripts/eval_keep_unedited.py --cost --out docs        # seconds and memory
python scripts/eval_keep_unedited.py --photos --before bf5b318 --out docs   # real photographs, before and after
"""

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from flux.lab import keep  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--edits", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("results/keep"))
    parser.add_argument("--cost", action="store_true", help="seconds and memory at 12 and 64 megapixels")
    parser.add_argument("--photos", action="store_true", help="real photographs with simulated regeneration")
    parser.add_argument("--before", help="also measure keep_unedited as it was at this git revision")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.photos:
        report = keep.photographs(ROOT, args.before, log=lambda line: print(line, file=sys.stderr))
        (args.out / "keep-unedited-photos.json").write_text(json.dumps(report, indent=1) + "\n")
        print(keep.photographs_markdown(report))
    elif args.cost:
        rows = keep.cost(ROOT)
        (args.out / "keep-unedited-cost.json").write_text(json.dumps(rows, indent=2) + "\n")
        for row in rows:
            print(row)
    else:
        report = keep.evaluate(args.edits, log=lambda line: print(line, file=sys.stderr))
        (args.out / "keep-unedited.json").write_text(json.dumps(report, indent=2) + "\n")
        print(keep.markdown(report))
        print(f"wrote {keep.picture(keep.proxy_model(), args.out)}")
