"""Fetch the weights into a folder, each file verified against weights_manifest.json
(the same as `python -m flux download`, which the image built by cog has too).

.venv/bin/python scripts/download_weights.py --out weights                # from the Hugging Face Hub (HF_TOKEN)
.venv/bin/python scripts/download_weights.py --out weights --base-url URL  # from a mirror laid out like the tree
.venv/bin/python scripts/download_weights.py --out weights --rehash        # re-verify every sha256
.venv/bin/python scripts/download_weights.py --out weights --pin           # record sizes and sha256 in the manifest
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flux.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["download", *sys.argv[1:]]))
