"""What masked edits do, measured with the trained proxy (docs/quality.md, "Masked edits"), and what
crop and stitch costs against the same edit without a mask (docs/benchmarks.md):

python scripts/eval_masks.py --edits 12 --out docs    # every level on held-out scenes; the README's picture
python scripts/eval_masks.py --cost --out docs        # seconds and memory at 3000x2000 and 6000x4000
"""

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from flux.lab import masks  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--edits", type=int, default=12)
    parser.add_argument("--out", type=Path, default=Path("results/masks"))
    parser.add_argument("--cost", action="store_true", help="seconds and memory with and without a mask")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.cost:
        rows = masks.cost(ROOT)
        (args.out / "masks-cost.json").write_text(json.dumps(rows, indent=2) + "\n")
        for row in rows:
            print(row)
    else:
        report = masks.evaluate(args.edits, log=lambda line: print(line, file=sys.stderr))
        (args.out / "masks.json").write_text(json.dumps(report, indent=1) + "\n")
        print(masks.markdown(report))
        print(f"wrote {masks.picture(masks.proxy_model(), args.out)}")
