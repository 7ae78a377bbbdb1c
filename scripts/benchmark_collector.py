"""Seconds per prediction and per full garbage collection with the loaded model's objects in the
collector's view and frozen out of it (what load_model does), side by side in one run:

python scripts/benchmark_collector.py
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flux.lab.collector import benchmark  # noqa: E402

if __name__ == "__main__":
    report = benchmark()
    tiny, full = report["tiny_predictions"], report["full_size_collection"]
    print(f"tiny model, {tiny['objects']} objects: {tiny['in view']:.3f} s per prediction in view, "
          f"{tiny['frozen']:.3f} s frozen")  # fmt: skip
    print(f"full-size components (meta), {full['objects']} objects: one full collection "
          f"{full['in_view_seconds']:.3f} s in view, {full['frozen_seconds'] * 1e3:.2f} ms frozen")  # fmt: skip
    print(json.dumps(report))
