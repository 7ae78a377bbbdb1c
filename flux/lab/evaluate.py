"""Evaluate what each acceleration level costs, side by side with the alternatives at the same call budget.

For every held-out edit and method: PSNR and SSIM against the "none" output of the same seed
(drift), and PSNR against the exactly computed target (edit accuracy), next to the identity
baseline (output = input) and the VAE's own reconstruction ceiling.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import taylor_utils
from flux.edit import LabOverrides, edit
from flux.lab import adaptive, benchmark, forecasters
from flux.lab.adaptive import AdaptivePlan
from flux.lab.plans import direct, lab_plan
from flux.lab.scenes import PROMPTS, SIDE, make_example
from flux.loading import Components, load_components

STEPS = 28
LEVELS = ("go fast", "go really fast")
DEFAULT_METHOD = "TaylorSeer n=2, step units (product default)"
CURVE = "schedule curve"  # the level of the rows that trace transformer calls against drift
CURVE_EVEN_CALLS = (8, 10, 13, 16, 18, 20, 23)
CURVE_TOLERANCES = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16)
# the adaptive schedule held to each level's call count: (tolerance, level)
CURVE_CAPPED = ((0.02, "go fast"), (0.04, "go fast"), (0.08, "go really fast"), (0.16, "go really fast"))


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


def curve_methods() -> list[Method]:
    """Transformer calls against drift: the fixed level maps (the main table's product rows), evenly
    spread fixed maps at more call counts, and the adaptive schedule at several tolerances."""
    even = [Method(f"fixed, {calls} calls evenly spread", CURVE, {"n_derivatives": 2, "acceleration": "none",
                   "step_map": even_map(STEPS, calls)}) for calls in CURVE_EVEN_CALLS]  # fmt: skip
    adaptive = [
        Method(f"adaptive, tolerance {tolerance:g}", CURVE, {"n_derivatives": 2, "acceleration": "none",
               "adaptive_tolerance": tolerance})
        for tolerance in CURVE_TOLERANCES
    ]  # fmt: skip
    capped = [
        Method(f"adaptive, tolerance {tolerance:g}, at most the {calls} calls of {level}", CURVE,
               {"n_derivatives": 2, "acceleration": "none", "adaptive_tolerance": tolerance,
                "adaptive_max_calls": calls})
        for tolerance, level in CURVE_CAPPED
        for calls in [taylor_utils.compute_step_count(level, STEPS)]
    ]  # fmt: skip
    return even + adaptive + capped


def run_method(c: Components, image: Image.Image, prompt: str, seed: int, method: Method) -> tuple[np.ndarray, int]:
    """The method's output image and the transformer calls it made."""
    if method.diffusers_hook is not None:
        return _run_hook(c, image, prompt, seed, method.diffusers_hook)
    options = dict(method.settings)
    num_steps = options.pop("num_steps", STEPS)
    acceleration = options.pop("acceleration", method.level)
    step_map = options.pop("step_map", None)
    tolerance = options.pop("adaptive_tolerance", None)
    max_calls = options.pop("adaptive_max_calls", None)
    cache = forecasters.make_cache(c, num_steps, SIDE, SIDE, **options)
    lab = LabOverrides(cache=cache, step_map=step_map)
    if tolerance is not None:
        lab = adaptive.overrides(AdaptivePlan(num_steps, tolerance, max_calls=max_calls), cache)
    plan = lab_plan(c, image, prompt, SIDE, SIDE, seed, num_steps=num_steps, acceleration=acceleration)
    result = edit(c, image, plan, lab=lab, transformer=direct(c))
    return np.asarray(result.image), result.report.transformer_calls


def _run_hook(c: Components, image: Image.Image, prompt: str, seed: int, hook: dict) -> tuple[np.ndarray, int]:
    run = benchmark.run_diffusers(c, image, (SIDE, SIDE, *image.size), STEPS, seed, hook, prompt=prompt)
    return np.asarray(run["image"]), run["calls"]


def evaluate(
    weights_dir: str | Path,
    edits: int = 100,
    seed: int = 1234,
    levels=LEVELS,
    log: Callable[[str], None] = print,
    curve: bool = True,
) -> dict:
    """Run every method (and, with ``curve``, the schedule curve) on ``edits`` held-out examples (a seed
    the training never used)."""
    import logging

    logging.getLogger("diffusers").setLevel(logging.ERROR)
    c = load_components(weights_dir, torch.device("cpu"), torch.float32)
    rng = np.random.default_rng(seed)
    examples = [make_example(rng, PROMPTS[i % len(PROMPTS)]) for i in range(edits)]
    all_methods = [m for level in levels for m in methods_for(level)] + (curve_methods() if curve else [])
    rows: dict[tuple[str, str], dict[str, list[float]]] = {}
    baseline = {"identity_psnr_to_target": [], "none_psnr_to_target": [], "vae_ceiling_psnr_to_target": []}
    # per instruction: the baselines, and the product's levels
    per_prompt: dict[str, dict[str, list[float]]] = {p: {} for p in PROMPTS}
    samples = []
    start = time.perf_counter()
    for index, (source, prompt, target) in enumerate(examples):
        image = Image.fromarray(source)
        none, _ = run_method(c, image, prompt, index, Method("none", "none"))
        figures = {
            "identity_psnr_to_target": psnr(source, target),
            "none_psnr_to_target": psnr(none, target),
            "vae_ceiling_psnr_to_target": psnr(_reconstruct(c, target), target),
        }
        figures["none_closer_than_input"] = float(closer_than_input(none, source, target))
        for key, value in figures.items():
            baseline.setdefault(key, []).append(value)
            per_prompt[prompt].setdefault(key, []).append(value)
        outputs = {}
        for method in all_methods:
            out, calls = run_method(c, image, prompt, index, method)
            outputs[(method.name, method.level)] = out
            row = rows.setdefault(
                (method.name, method.level), {"calls": [], "psnr": [], "ssim": [], "target_psnr": [], "closer": []}
            )
            row["calls"].append(calls)
            row["psnr"].append(psnr(out, none))
            row["ssim"].append(ssim(out, none))
            row["target_psnr"].append(psnr(out, target))
            row["closer"].append(float(closer_than_input(out, source, target)))
            if method.name == DEFAULT_METHOD:
                per_prompt[prompt].setdefault(f"{method.level}_psnr_vs_none", []).append(row["psnr"][-1])
                per_prompt[prompt].setdefault(f"{method.level}_psnr_to_target", []).append(row["target_psnr"][-1])
                per_prompt[prompt].setdefault(f"{method.level}_closer_than_input", []).append(row["closer"][-1])
        if index < len(PROMPTS):
            samples.append(
                {"input": source, "none": none, "target": target, "prompt": prompt}
                | {level: outputs[(DEFAULT_METHOD, level)] for level in levels}
            )
        if index % 10 == 0:
            log(f"edit {index + 1}/{edits} ({time.perf_counter() - start:.0f}s)")
    baselines = {k: statistics.mean(v) for k, v in baseline.items()}
    report = {
        "weights": str(weights_dir),
        "edits": edits,
        "steps": STEPS,
        "baselines": {k: v for k, v in baselines.items() if k != "none_closer_than_input"},
        "none_closer_than_input": baselines["none_closer_than_input"],
        "per_instruction": {
            prompt: {"edits": len(figures["none_psnr_to_target"])} | {k: statistics.mean(v) for k, v in figures.items()}
            for prompt, figures in per_prompt.items()
            if figures
        },
        "methods": [
            {
                "method": name,
                "level": level,
                "transformer_calls": statistics.mean(v["calls"]),
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


def closer_than_input(out: np.ndarray, source: np.ndarray, target: np.ndarray) -> bool:
    """Whether ``out`` is closer to the target than the input is (mean squared error)."""
    return bool(np.mean((out.astype(float) - target) ** 2) < np.mean((source.astype(float) - target) ** 2))


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
        if m["level"] != CURVE:
            lines.append(
                f"| {m['level']} | {m['method']} | {m['transformer_calls']:.1f} | {m['psnr_vs_none']:.2f} "
                f"| {m['ssim_vs_none']:.4f} | {m['psnr_to_target']:.2f} | {m['closer_than_input']:.0%} |"
            )
    per_instruction = report.get("per_instruction", {})
    if per_instruction:
        levels = [level for level in LEVELS if f"{level}_psnr_vs_none" in next(iter(per_instruction.values()))]
        lines += [
            "",
            "Per instruction (PSNR to the exact target in dB; the levels' PSNR against \"none\"):",
            "",
            "| instruction | edits | identity | none | VAE ceiling | none closer than input | "
            + " | ".join(f"{level} vs none" for level in levels) + " |",
            "|---|---|---|---|---|---|" + "---|" * len(levels),
        ]  # fmt: skip
        for prompt, f in per_instruction.items():
            lines.append(
                f"| {prompt} | {f['edits']} | {f['identity_psnr_to_target']:.2f} | {f['none_psnr_to_target']:.2f} "
                f"| {f['vae_ceiling_psnr_to_target']:.2f} | {f['none_closer_than_input']:.0%} | "
                + " | ".join(f"{f[f'{level}_psnr_vs_none']:.2f}" for level in levels) + " |"
            )  # fmt: skip
    curve = curve_rows(report)
    if any(row["method"].startswith("adaptive") for row in curve):
        lines += [
            "",
            'Schedule curve (mean transformer calls per edit against drift from "none" and accuracy):',
            "",
            "| schedule | calls | PSNR vs none (dB) | PSNR to target (dB) | closer than input |",
            "|---|---|---|---|---|",
        ]
        for m in curve:
            lines.append(
                f"| {m['method']} | {m['transformer_calls']:.1f} | {m['psnr_vs_none']:.2f} | {m['psnr_to_target']:.2f} "
                f"| {m['closer_than_input']:.0%} |"
            )
    return "\n".join(lines) + "\n"


def curve_rows(report: dict) -> list[dict]:
    """The schedule curve: the product's fixed level maps, the evenly spread fixed maps and the
    adaptive schedule, by calls."""
    rows = [
        {**m, "method": f"fixed, level map of {m['level']}"} if m["method"] == DEFAULT_METHOD else m
        for m in report["methods"]
        if m["level"] == CURVE or m["method"] == DEFAULT_METHOD
    ]
    return sorted(rows, key=lambda m: (not m["method"].startswith("fixed"), m["transformer_calls"]))


def adaptive_verdict(report: dict) -> list[dict]:
    """For each adaptive tolerance: the best fixed map (a level map or an evenly spread one) that makes
    no more calls than the adaptive schedule's mean rounded up, and whether the adaptive schedule
    drifts less from "none" (higher PSNR against it)."""
    curve = curve_rows(report)
    fixed = [m for m in curve if m["method"].startswith("fixed")]
    verdicts = []
    for m in curve:
        if not m["method"].startswith("adaptive"):
            continue
        budget = math.ceil(m["transformer_calls"] - 1e-9)
        within = [f for f in fixed if f["transformer_calls"] <= budget]
        best = max(within, key=lambda f: f["psnr_vs_none"]) if within else None
        verdicts.append({
            "method": m["method"], "calls": m["transformer_calls"], "psnr_vs_none": m["psnr_vs_none"],
            "psnr_to_target": m["psnr_to_target"],
            "best_fixed_within_calls": None if best is None else best["method"],
            "best_fixed_calls": None if best is None else best["transformer_calls"],
            "best_fixed_psnr_vs_none": None if best is None else best["psnr_vs_none"],
            "beats_fixed": None if best is None else m["psnr_vs_none"] > best["psnr_vs_none"],
        })  # fmt: skip
    return verdicts


def _series(row: dict) -> str:
    if row["method"].startswith("fixed"):
        return "fixed"
    return "capped" if "at most" in row["method"] else "adaptive"


def curve_chart(report: dict, path: Path) -> Path:
    """PNG: transformer calls (x) against PSNR vs "none" (y), fixed maps and the adaptive schedule."""
    from PIL import ImageDraw

    width, height, margin = 900, 560, 70
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    rows = curve_rows(report)
    xs = [m["transformer_calls"] for m in rows]
    ys = [m["psnr_vs_none"] for m in rows]
    x0, x1 = min(xs) - 1, STEPS
    y0, y1 = min(ys) - 2, max(ys) + 2

    def xy(x: float, y: float) -> tuple[float, float]:
        return (margin + (x - x0) / (x1 - x0) * (width - 2 * margin),
                height - margin - (y - y0) / (y1 - y0) * (height - 2 * margin))  # fmt: skip

    draw.line((margin, height - margin, width - margin, height - margin), fill="black")
    draw.line((margin, margin, margin, height - margin), fill="black")
    for i in range(6):
        px, _ = xy(x0 + (x1 - x0) * i / 5, y0)
        _, py = xy(x0, y0 + (y1 - y0) * i / 5)
        draw.text((px - 8, height - margin + 8), f"{x0 + (x1 - x0) * i / 5:.0f}", fill="black")
        draw.text((10, py - 6), f"{y0 + (y1 - y0) * i / 5:.1f}", fill="black")
    draw.text((width // 2 - 150, height - 30), f"transformer calls per edit (of {STEPS} steps)", fill="black")
    draw.text((10, 20), 'drift: PSNR of the output against "none" (dB), mean over the held-out edits', fill="black")
    series = {"fixed": (30, 90, 200), "adaptive": (200, 30, 30), "capped": (30, 150, 60)}
    for name, colour in series.items():
        points = sorted(xy(m["transformer_calls"], m["psnr_vs_none"]) for m in rows if _series(m) == name)
        if len(points) > 1 and name != "capped":
            draw.line(points, fill=colour, width=2)
        for px, py in points:
            draw.ellipse((px - 5, py - 5, px + 5, py + 5), fill=colour)
    for m in rows:
        if m["method"].startswith("fixed, level map"):
            px, py = xy(m["transformer_calls"], m["psnr_vs_none"])
            draw.text((px + 8, py + 4), m["level"], fill=series["fixed"])
    draw.text(
        (width - 460, margin), "blue: fixed maps; red: adaptive; green: adaptive within a level's calls", fill="black"
    )
    canvas.save(path)
    return path


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
        "curve": out_dir / "quality-curve.png",
    }
    result["report"]["adaptive_verdict"] = adaptive_verdict(result["report"])
    paths["json"].write_text(json.dumps(result["report"], indent=2) + "\n")
    paths["markdown"].write_text(markdown(result["report"]))
    grid(result["samples"], paths["grid"])
    if any(m["level"] == CURVE for m in result["report"]["methods"]):
        curve_chart(result["report"], paths["curve"])
    else:
        paths.pop("curve")
    return paths
