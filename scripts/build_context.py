"""List what `cog build` would send to Docker (honouring .dockerignore) and its size:

python scripts/build_context.py            # the default image: weights fetched by setup()
python scripts/build_context.py --bake     # weights/ baked into the image
"""

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from flux.lab.build_context import build_context  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bake", action="store_true", help="as if the weights/ line were deleted")
    parser.add_argument("--quiet", action="store_true", help="only the totals")
    args = parser.parse_args()
    files = build_context(ROOT, bake=args.bake)
    if not args.quiet:
        for path, size in files:
            print(f"{size:>12,}  {path}")
    total = sum(size for _, size in files)
    print(f"{len(files)} files, {total / 1e6:.2f} MB")
