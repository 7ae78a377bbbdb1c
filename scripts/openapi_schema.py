"""Write .cog/openapi_schema.json from predict.py (what `cog build` does); --snapshot also
refreshes the committed API contract snapshot (a deliberate, reviewed act)."""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flux.lab.cog_schema import SNAPSHOT_PATH, openapi_schema, render, write_schema  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--snapshot", action="store_true", help="also overwrite " + str(SNAPSHOT_PATH))
    args = parser.parse_args()
    print(f"wrote {write_schema()}")
    if args.snapshot:
        SNAPSHOT_PATH.parent.mkdir(parents=True, exist_ok=True)
        SNAPSHOT_PATH.write_text(render(openapi_schema()))
        print(f"wrote {SNAPSHOT_PATH}")
