"""What the acceleration levels cost and save at short schedules: at 8, 12, 16 and 20 steps (28 for
reference), the product's maps (always-computed edges that scale down with the step count)
against the same maps with the edges of 28 steps kept at every step count, each beside "none" at
the same number of steps, on the trained proxy's held-out edits.

    python scripts/eval_quality.py --short-schedules [--edits 120]
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import taylor_utils
from flux.lab.evaluate import Method, closer_than_input, psnr, run_method
from flux.lab.scenes import PROMPTS, make_example
from flux.loading import load_components

STEPS = (8, 12, 16, 20, 28)
LEVELS = ("go fast", "go really fast")
# the level maps with the edges they have at 28 steps kept at every step count (the maps before the
# edges scaled with the schedule): the baseline the product's maps are measured against
FIXED_EDGES = {"go fast": 4, "go really fast": 3}
PATTERNS = {"go fast": (False, True), "go really fast": (False, True, False)}


def fixed_edge_map(level: str, num_steps: int) -> list[bool]:
    edge, pattern = FIXED_EDGES[level], PATTERNS[level]
    return [i < edge or i >= num_steps - edge or pattern[i % len(pattern)] for i in range(num_steps)]


def maps(level: str, steps: int) -> dict[str, list[bool]]:
    return {
        "fixed edges": fixed_edge_map(level, steps),
        "scaled edges (product)": taylor_utils.compute_step_map(level, steps),
    }


def short_schedules(
    weights_dir: str | Path, edits: int = 120, seed: int = 1234, log: Callable[[str], None] = print
) -> dict:
    """Rows of (steps, level, map): transformer calls, PSNR against "none" at the same steps, PSNR
    to the exact target and how often the output is closer to it than the input; and "none" itself."""
    c = load_components(weights_dir, torch.device("cpu"), torch.float32)
    rng = np.random.default_rng(seed)
    examples = [make_example(rng, PROMPTS[i % len(PROMPTS)]) for i in range(edits)]
    rows: dict[tuple[int, str, str], dict[str, list[float]]] = {}
    start = time.perf_counter()
    for steps in STEPS:
        for index, (source, prompt, target) in enumerate(examples):
            image = Image.fromarray(source)
            none, calls = run_method(c, image, prompt, index, Method("none", "none", {"num_steps": steps}))
            _add(rows, (steps, "none", "every step"), calls, none, none, source, target)
            for level in LEVELS:
                for name, step_map in maps(level, steps).items():
                    method = Method(name, level, {"num_steps": steps, "step_map": step_map, "n_derivatives": 2})
                    out, calls = run_method(c, image, prompt, index, method)
                    _add(rows, (steps, level, name), calls, out, none, source, target)
        log(f"{steps} steps done ({time.perf_counter() - start:.0f}s)")
    return {
        "weights": str(weights_dir),
        "edits": edits,
        "seconds": time.perf_counter() - start,
        "rows": [
            {"steps": steps, "level": level, "map": name} | {k: statistics.mean(v) for k, v in figures.items()}
            for (steps, level, name), figures in rows.items()
        ],
    }


def _add(rows: dict, key: tuple, calls: int, out: np.ndarray, none: np.ndarray, source: np.ndarray,
         target: np.ndarray) -> None:  # fmt: skip
    row = rows.setdefault(key, {"calls": [], "psnr_vs_none": [], "psnr_to_target": [], "closer_than_input": []})
    row["calls"].append(calls)
    row["psnr_vs_none"].append(psnr(out, none))
    row["psnr_to_target"].append(psnr(out, target))
    row["closer_than_input"].append(float(closer_than_input(out, source, target)))


def markdown(report: dict) -> str:
    lines = [
        f"{report['edits']} held-out edits per step count; evaluated in {report['seconds'] / 60:.1f} min.",
        "",
        "| steps | level | map | calls | PSNR vs none (dB) | PSNR to target (dB) | closer than input |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        vs_none = "-" if r["level"] == "none" else f"{r['psnr_vs_none']:.2f}"
        lines.append(
            f"| {r['steps']} | {r['level']} | {r['map']} | {r['calls']:.0f} | {vs_none} | {r['psnr_to_target']:.2f} "
            f"| {r['closer_than_input']:.0%} |"
        )
    return "\n".join(lines) + "\n"
