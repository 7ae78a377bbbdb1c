"""Evaluate what each acceleration level costs, side by side with the alternatives at the same call budget.

For every held-out edit and method: PSNR and SSIM against the "none" output of the same seed
(drift), and PSNR against the exactly computed target (edit accuracy), next to the identity
baseline (output = input) and the VAE's own reconstruction ceiling.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import taylor_utils
from flux.edit import EditSettings, LabOverrides, edit
from flux.lab import benchmark, forecasters
from flux.lab.scenes import PROMPTS, SIDE, make_example
from flux.loading import Components, load_components

STEPS = 28
LEVELS = ("go fast", "go really fast")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return benchmark.psnr(a, b, identical=100.0)  # finite, so that means over many edits stay finite


def ssim(a: np.ndarray, b: np.ndarray, window: int = 7) -> float:
    """Mean SSIM of the luminance over sliding uniform windows (Wang et al. 2004 constants)."""

    def luminance(x):
        return x.astype(np.float64) @ np.array([0.299, 0.587, 0.114])

    def box(x):
        kernel = np.ones(window) / window
        x = np.apply_along_axis(lambda r: np.convolve(r, kernel, mode="valid"), 0, x)
        return np.apply_along_axis(lambda r: np.convolve(r, kernel, mode="valid"), 1, x)

    x, y = luminance(a), luminance(b)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = box(x), box(y)
    vx, vy, cxy = box(x * x) - mx * mx, box(y * y) - my * my, box(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(s.mean())


def even_map(steps: int, calls: int) -> list[bool]:
    """``calls`` computed steps spread evenly, first and last included."""
    chosen = {round(i * (steps - 1) / (calls - 1)) for i in range(calls)}
    return [i in chosen for i in range(steps)]


@dataclass
class Method:
    name: str
    level: str
    settings: dict = field(default_factory=dict)
    diffusers_hook: dict | None = None  # run through FluxKontextPipeline with this TaylorSeerCacheConfig


def methods_for(level: str) -> list[Method]:
    calls = taylor_utils.compute_step_count(level, STEPS)
    bf16 = torch.bfloat16

    return [
        Method("TaylorSeer n=2, step units (product default)", level, {"n_derivatives": 2}),
        Method("TaylorSeer n=1 (= linear extrapolation)", level, {"n_derivatives": 1}),
        Method("reuse last prediction (n=0)", level, {"n_derivatives": 0}),
        Method("TaylorSeer n=2, timestep units", level, {"n_derivatives": 2, "units": "timesteps"}),
        Method("TaylorSeer n=1, timestep units", level, {"n_derivatives": 1, "units": "timesteps"}),
        Method(
            "Newton interpolation n=2 (exact for quadratics), timestep units",
            level,
            {"forecaster": "newton", "n_derivatives": 2, "units": "timesteps"},
        ),  # fmt: skip
        Method("Newton interpolation n=2, step units", level, {"forecaster": "newton", "n_derivatives": 2}),
        # the reference caches the whole output too; the forecast is elementwise, so the target
        # tokens' values are the same as caching them alone: the bf16 terms are the difference
        Method("public reference (whole output, bf16, step units)", level, {"n_derivatives": 2, "dtype": bf16}),
        Method("TaylorSeer n=2, evenly spread map", level, {"n_derivatives": 2, "step_map": even_map(STEPS, calls)}),
        Method(f"fewer steps ({calls}, no cache)", level, {"num_steps": calls, "acceleration": "none"}),
        Method("diffusers TaylorSeer hook", level, diffusers_hook={**benchmark.HOOK_SETTINGS[level], "max_order": 2}),
        Method(
            "diffusers TaylorSeer hook (lite)",
            level,
            diffusers_hook={**benchmark.HOOK_SETTINGS[level], "max_order": 2, "use_lite_mode": True},
        ),  # fmt: skip
    ]


def run_method(c: Components, image: Image.Image, prompt: str, seed: int, method: Method) -> np.ndarray:
    if method.diffusers_hook is not None:
        return _run_hook(c, image, prompt, seed, method.diffusers_hook)
    options = dict(method.settings)
    num_steps = options.pop("num_steps", STEPS)
    acceleration = options.pop("acceleration", method.level)
    step_map = options.pop("step_map", None)
    cache = forecasters.make_cache(c, num_steps, SIDE, SIDE, **options)
    settings = EditSettings(prompt, SIDE, SIDE, seed, num_steps=num_steps, acceleration=acceleration)
    result = edit(c, image, settings, lab=LabOverrides(cache=cache, step_map=step_map))
    return np.asarray(result.image)


def _run_hook(c: Components, image: Image.Image, prompt: str, seed: int, hook: dict) -> np.ndarray:
    run = benchmark.run_diffusers(c, image, (SIDE, SIDE, *image.size), STEPS, seed, hook, prompt=prompt)
    return np.asarray(run["image"])


def evaluate(
    weights_dir: str | Path, edits: int = 100, seed: int = 1234, levels=LEVELS, log: Callable[[str], None] = print
) -> dict:
    """Run every method on ``edits`` held-out examples (a seed the training never used)."""
    import logging

    logging.getLogger("diffusers").setLevel(logging.ERROR)
    c = load_components(weights_dir, torch.device("cpu"), torch.float32)
    rng = np.random.default_rng(seed)
    examples = [make_example(rng, PROMPTS[i % len(PROMPTS)]) for i in range(edits)]
    all_methods = [m for level in levels for m in methods_for(level)]
    rows: dict[tuple[str, str], dict[str, list[float]]] = {}
    baseline = {"identity_psnr_to_target": [], "none_psnr_to_target": [], "vae_ceiling_psnr_to_target": []}
    samples = []
    start = time.perf_counter()
    for index, (source, prompt, target) in enumerate(examples):
        image = Image.fromarray(source)
        none = run_method(c, image, prompt, index, Method("none", "none"))
        baseline["identity_psnr_to_target"].append(psnr(source, target))
        baseline["none_psnr_to_target"].append(psnr(none, target))
        baseline["vae_ceiling_psnr_to_target"].append(psnr(_reconstruct(c, target), target))
        outputs = {}
        for method in all_methods:
            out = run_method(c, image, prompt, index, method)
            outputs[(method.name, method.level)] = out
            row = rows.setdefault(
                (method.name, method.level), {"psnr": [], "ssim": [], "target_psnr": [], "closer": []}
            )
            row["psnr"].append(psnr(out, none))
            row["ssim"].append(ssim(out, none))
            row["target_psnr"].append(psnr(out, target))
            row["closer"].append(
                float(np.mean((out.astype(float) - target) ** 2) < np.mean((source.astype(float) - target) ** 2))
            )
        if index < len(PROMPTS):
            default = "TaylorSeer n=2, step units (product default)"
            samples.append(
                {"input": source, "none": none, "target": target, "prompt": prompt}
                | {level: outputs[(default, level)] for level in levels}
            )
        if index % 10 == 0:
            log(f"edit {index + 1}/{edits} ({time.perf_counter() - start:.0f}s)")
    report = {
        "weights": str(weights_dir),
        "edits": edits,
        "steps": STEPS,
        "baselines": {k: statistics.mean(v) for k, v in baseline.items()},
        "none_closer_than_input": statistics.mean(
            float(n > i)
            for n, i in zip(baseline["none_psnr_to_target"], baseline["identity_psnr_to_target"], strict=True)
        ),
        "methods": [
            {
                "method": name,
                "level": level,
                "transformer_calls": taylor_utils.compute_step_count(level, STEPS),
                "psnr_vs_none": statistics.mean(v["psnr"]),
                "ssim_vs_none": statistics.mean(v["ssim"]),
                "psnr_to_target": statistics.mean(v["target_psnr"]),
                "closer_than_input": statistics.mean(v["closer"]),
            }
            for (name, level), v in rows.items()
        ],
        "seconds": time.perf_counter() - start,
    }
    return {"report": report, "samples": samples}


@torch.no_grad()
def _reconstruct(c: Components, target: np.ndarray) -> np.ndarray:
    from flux import images

    pixels = images.to_tensor(Image.fromarray(target))
    return np.asarray(images.to_pil(c.vae.decode(c.vae.encode(pixels).latent_dist.mode()).sample))


def markdown(report: dict) -> str:
    b = report["baselines"]
    lines = [
        f"{report['edits']} held-out edits, {report['steps']} steps, {SIDE}x{SIDE}; "
        f"evaluated in {report['seconds'] / 60:.1f} min.",
        "",
        "| reference point | PSNR to exact target (dB) |",
        "|---|---|",
        f"| identity (output = input) | {b['identity_psnr_to_target']:.2f} |",
        f'| "none" (28 transformer calls) | {b["none_psnr_to_target"]:.2f} '
        f"(closer to the target than the input in {report['none_closer_than_input']:.0%} of edits) |",
        f"| VAE reconstruction of the target (ceiling) | {b['vae_ceiling_psnr_to_target']:.2f} |",
        "",
        "| level | method | calls | PSNR vs none (dB) | SSIM vs none | PSNR to target (dB) | closer than input |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in report["methods"]:
        lines.append(
            f"| {m['level']} | {m['method']} | {m['transformer_calls']} | {m['psnr_vs_none']:.2f} "
            f"| {m['ssim_vs_none']:.4f} | {m['psnr_to_target']:.2f} | {m['closer_than_input']:.0%} |"
        )
    return "\n".join(lines) + "\n"


def grid(samples: list[dict], path: Path, levels=LEVELS, scale: int = 3) -> Path:
    """One edit per row: input, none, each level, target."""
    from PIL import ImageDraw

    columns = ["input", "none", *levels, "target"]
    cell = SIDE * scale
    label = 14
    canvas = Image.new("RGB", (cell * len(columns) + 260, (cell + 4) * len(samples) + label + 4), "white")
    draw = ImageDraw.Draw(canvas)
    for j, name in enumerate(columns):
        draw.text((j * cell + 4, 2), name, fill="black")
    for i, sample in enumerate(samples):
        y = label + 4 + i * (cell + 4)
        for j, name in enumerate(columns):
            canvas.paste(Image.fromarray(sample[name]).resize((cell, cell), Image.Resampling.NEAREST), (j * cell, y))
        draw.text((len(columns) * cell + 8, y + cell // 2 - 6), sample["prompt"], fill="black")
    canvas.save(path)
    return path


def write(result: dict, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out_dir / "quality.json",
        "markdown": out_dir / "quality-table.md",
        "grid": out_dir / "quality-grid.png",
    }
    paths["json"].write_text(json.dumps(result["report"], indent=2) + "\n")
    paths["markdown"].write_text(markdown(result["report"]))
    grid(result["samples"], paths["grid"])
    return paths
