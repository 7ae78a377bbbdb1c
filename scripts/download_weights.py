"""Fetch the weights into a directory, verified against weights_manifest.json.

python scripts/download_weights.py --out weights                # from the Hugging Face Hub (HF_TOKEN)
python scripts/download_weights.py --out weights --base-url URL  # from a mirror laid out like the tree
python scripts/download_weights.py --out weights --rehash        # re-verify every sha256
python scripts/download_weights.py --out weights --pin           # record sizes and sha256 in the manifest
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flux import weights  # noqa: E402
from flux.fetch import FetchError, fetch, pin  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=weights.DEFAULT_WEIGHTS_DIR)
    parser.add_argument("--manifest", type=Path, default=weights.MANIFEST_PATH)
    parser.add_argument("--base-url", default=None, help="mirror or weights CDN serving the tree's layout")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--rehash", action="store_true", help="verify the sha256 of files already present")
    parser.add_argument("--pin", action="store_true", help="after the fetch, write sizes and sha256 into --manifest")
    args = parser.parse_args()
    try:
        report = fetch(
            args.out, json.loads(args.manifest.read_text()), base_url=args.base_url, workers=args.workers,
            rehash=args.rehash,
        )  # fmt: skip
    except FetchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"{len(report.downloaded)} files downloaded ({report.bytes_downloaded / 1e9:.2f} GB), "
        f"{len(report.skipped)} already verified, in {report.seconds:.1f}s"
    )
    if args.pin:
        pinned = pin(args.out, args.manifest)
        print(f"pinned {len(pinned['files'])} files, {pinned['total_size'] / 1e9:.2f} GB, into {args.manifest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
