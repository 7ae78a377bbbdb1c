"""Seconds per edit on one device and across several (context parallelism), measured side by side
in one run on a random model of a preset written to disk (the workers load it from there).

On the CPU this is a sanity check of the machinery, not a speed claim: N processes share the
machine's cores. What counts is the same run on N GPUs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from flux.weights import PROJECT_ROOT

ONE_RUN = """
import json, sys, time
sys.path.insert(0, ROOT)
import numpy as np
from PIL import Image
from flux.config import Config
from flux.pipeline import load_model, run_edit
from flux.request import EditRequest
from tests.conftest import image_bytes
model = load_model(Config.from_env(), with_safety=False)
image = image_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)))
run_edit(model, EditRequest("warm up", image, seed=0, num_steps=4, check_safety=False))
figures = {}
for level in LEVELS:
    start = time.perf_counter()
    result = run_edit(model, EditRequest("make it red", image, seed=1, num_steps=STEPS, acceleration=level,
                                         check_safety=False))
    figures[level] = {"seconds": time.perf_counter() - start, "size": list(result.image.size),
                      "latents": result.latents.flatten()[:4096].tolist()}
model.close()
print(json.dumps(figures))
"""


def _run(weights: Path, ranks: int, side: int, steps: int, levels: list[str]) -> dict:
    code = (ONE_RUN.replace("ROOT", repr(str(PROJECT_ROOT))).replace("SIDE", str(side)).replace("STEPS", str(steps))
            .replace("LEVELS", repr(levels)))  # fmt: skip
    env = {**os.environ, "FLUX_CONTEXT_PARALLEL": str(ranks), "WEIGHTS_DIR": str(weights)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=PROJECT_ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"{ranks} ranks failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def benchmark(preset: str = "cpu-mid", ranks: tuple[int, ...] = (1, 2), steps: int = 28,
              levels: tuple[str, ...] = ("none", "go fast")) -> dict:  # fmt: skip
    """{ranks: {level: seconds}}, the speed-up of each against 1 rank, and the latents' largest difference."""
    import numpy as np

    from flux.lab.benchmark import SIZES
    from flux.lab.tiny import make_tiny_weights

    side = SIZES[preset][0]
    with tempfile.TemporaryDirectory(prefix="parallel-bench-") as folder:
        weights = make_tiny_weights(Path(folder) / "weights", side=side, preset=preset)
        runs = {n: _run(weights, n, side, steps, list(levels)) for n in ranks}
    first = runs[ranks[0]]
    report = {"preset": preset, "steps": steps, "side": side, "rows": []}
    for n, figures in runs.items():
        for level, row in figures.items():
            report["rows"].append({
                "ranks": n, "level": level, "seconds": row["seconds"], "size": row["size"],
                "speedup": first[level]["seconds"] / row["seconds"],
                "max_latent_difference": float(np.abs(np.array(row["latents"]) - np.array(first[level]["latents"])).max())
                if row["size"] == first[level]["size"] else None,
            })  # fmt: skip
    return report
