"""What Python's cyclic garbage collector costs a loaded model, measured side by side in one run:
the full collection the pipeline makes after each prediction (``release_memory``) with the loaded
model's objects in the collector's view, and frozen out of it (``freeze_loaded_objects``, which
``load_model`` calls).

Two figures: seconds per prediction of the tiny model through ``load_model`` / ``run_edit`` (the
real code path), unfrozen and frozen; and one full collection with the full-size components
(transformer, T5-XXL, CLIP-L, VAE; built on the meta device, so no memory) in view and frozen, in a
process of its own. The collection walks Python objects, not tensor memory, so the meta build has
the real model's object count.
"""

from __future__ import annotations

import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from flux.device import freeze_loaded_objects


def _collection_seconds(repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        gc.collect()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def in_view_and_frozen(repeats: int = 5) -> dict:
    """One full collection's seconds with every object alive now in view, then frozen (left frozen)."""
    gc.unfreeze()
    gc.collect()
    figures = {"objects": len(gc.get_objects()), "in_view_seconds": _collection_seconds(repeats)}
    freeze_loaded_objects()
    figures["frozen_seconds"] = _collection_seconds(repeats)
    return figures


def full_size_on_meta() -> dict:
    """The full-size text encoders, transformer and VAE built on the meta device, then ``in_view_and_frozen``."""
    import torch

    from flux.lab.tiny import build_models

    models = build_models("full", clip_vocab=0, t5_vocab=0, device="meta", dtype=torch.bfloat16)
    figures = in_view_and_frozen()
    figures["parameters"] = sum(p.numel() for m in models.values() for p in m.parameters())
    return figures


def predictions(count: int = 20) -> dict:
    """Seconds per tiny-model prediction (``run_edit``, 4 steps), the loaded objects in view, then frozen."""
    from flux.config import Config
    from flux.lab.benchmark import input_image
    from flux.lab.tiny import make_tiny_weights
    from flux.pipeline import load_model, run_edit
    from flux.request import EditRequest

    folder = Path(tempfile.mkdtemp(prefix="collector-"))
    model = load_model(Config.from_env(WEIGHTS_DIR=str(make_tiny_weights(folder / "weights"))))
    input_image(320, 240).save(folder / "input.png")
    image = folder / "input.png"
    run_edit(model, EditRequest("warm up", image, seed=0, num_steps=4))
    figures = {}
    for name, freeze in (("in view", False), ("frozen", True)):
        gc.unfreeze()
        if freeze:
            freeze_loaded_objects()
        start = time.perf_counter()
        for seed in range(count):
            run_edit(model, EditRequest("x", image, seed=seed, num_steps=4))
        figures[name] = (time.perf_counter() - start) / count
    figures["objects"] = len(gc.get_objects()) + gc.get_freeze_count()
    return figures


def benchmark(count: int = 20) -> dict:
    """Both figures; the full-size one in a fresh process (nothing else loaded there)."""
    done = subprocess.run(
        [sys.executable, "-m", "flux.lab.collector", "--full-size"], capture_output=True, text=True, check=True
    )
    return {"tiny_predictions": predictions(count), "full_size_collection": json.loads(done.stdout.splitlines()[-1])}


if __name__ == "__main__":
    if sys.argv[1:] == ["--full-size"]:
        print(json.dumps(full_size_on_meta()))
