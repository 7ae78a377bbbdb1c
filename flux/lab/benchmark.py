"""Benchmark: the project's acceleration levels side by side with diffusers, on random weights.

For each method it measures, over repeats after a warm-up (medians): transformer calls, denoise
and end-to-end seconds, speedup against "none", the cost of a forecast step against a full step,
peak and cache memory, and the drift from "none" with the same seed (PSNR of the decoded image,
relative error of the final latents). Speed does not depend on weight values, so random weights
of the real architecture measure the real speed.
"""

from __future__ import annotations

import contextlib
import json
import math
import platform
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

import taylor_utils
from flux import images
from flux.device import release_memory, synchronize
from flux.edit import T5_MAX_TOKENS, TransformerCall, decode, edit
from flux.lab.plans import direct, lab_plan
from flux.loading import Components

SIZES = {
    # preset: (output width, height, input width, height)
    "tiny": (256, 256, 256, 256),
    "cpu-mid": (512, 512, 512, 512),
    "full": (1024, 1024, 1024, 1024),
}
HOOK_SETTINGS = {
    # diffusers TaylorSeerCacheConfig settings that compute exactly the steps of our level
    # at 28 steps: 0-3, the odd steps 5..23, 24-27 (18 calls); 0-2, 4, 7, ..., 22, 25-27 (13 calls)
    "go fast": dict(cache_interval=2, disable_cache_before_step=4, disable_cache_after_step=24),
    "go really fast": dict(cache_interval=3, disable_cache_before_step=3, disable_cache_after_step=25),
}


@dataclass
class MethodResult:
    method: str
    level: str
    transformer_calls: int
    denoise_seconds: float
    end_to_end_seconds: float
    peak_memory_bytes: int
    cache_bytes: int | None = None  # the project's Taylor cache; not measurable inside diffusers' hook
    forecast_cost_ratio: float | None = None
    speedup_denoise: float | None = None
    speedup_end_to_end: float | None = None
    psnr_vs_none: float | None = None
    latent_rel_error_vs_none: float | None = None
    note: str = ""
    runs: list[dict] = field(default_factory=list)


class PeakMemory:
    """Peak GPU memory allocated, or peak resident memory of this process sampled every 5 ms on the CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.stop = threading.Event()
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(0.005)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self.stop.set()
            self.thread.join()


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def input_image(width: int, height: int) -> Image.Image:
    """A deterministic test picture: gradients and shapes."""
    y, x = np.mgrid[0:height, 0:width]
    array = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], -1)
    image = Image.fromarray(array.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    draw.ellipse((width // 5, height // 5, width // 2, height // 2), fill=(220, 40, 40))
    draw.rectangle((width // 2, height // 2, 4 * width // 5, 4 * height // 5), fill=(40, 40, 220))
    return image


def psnr(a: Image.Image | np.ndarray, b: Image.Image | np.ndarray, identical: float = float("inf")) -> float:
    """PSNR in dB of two 8-bit images; ``identical`` is returned for equal ones (the lab averages
    many, so it passes a finite value)."""
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    mse = float(np.mean((x - y) ** 2))
    return identical if mse == 0 else 10 * math.log10(255.0**2 / mse)


def _pipeline(c: Components):
    from diffusers import FluxKontextPipeline

    pipe = FluxKontextPipeline(
        scheduler=c.scheduler, vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer,
        text_encoder_2=c.text_encoder_2, tokenizer_2=c.tokenizer_2, transformer=c.transformer,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _count_attention(c: Components) -> tuple[list, Callable[[], None]]:
    """Counts full transformer computations: calls of the first block's attention projection.

    The diffusers hook calls the transformer's forward on every step and skips work inside it,
    so its real work is counted where it is done.
    """
    calls: list[int] = []
    handle = c.transformer.transformer_blocks[0].attn.to_q.register_forward_pre_hook(lambda *a: calls.append(1))
    return calls, handle.remove


def run_project(
    c: Components, image: Image.Image, size, level: str, steps: int, seed: int, references: list | None = None,
    transformer: TransformerCall | None = None,
) -> dict:  # fmt: skip
    """One timed edit by the project's loop (``transformer``: a runtime; default the components' module)."""
    width, height, _, _ = size
    references = references or []
    # references share the budget of one image of the benchmark's side, as they do at full size
    plan = lab_plan(c, image, "make the circle red", width, height, seed, num_steps=steps, acceleration=level,
                    references=references, condition=image.size, reference_base=max(image.size))  # fmt: skip
    synchronize(c.device)
    start = time.perf_counter()
    with PeakMemory(c.device) as peak:
        result = edit(c, image, plan, references=references, transformer=transformer or direct(c))
    synchronize(c.device)
    report = result.report
    forecast_ratio = None
    if report.forecast_steps and report.transformer_calls:
        per_forecast = report.forecast_seconds / len(report.forecast_steps)
        per_call = report.transformer_seconds / report.transformer_calls
        forecast_ratio = per_forecast / per_call
    return dict(
        calls=report.transformer_calls, denoise=report.seconds["denoise"], e2e=time.perf_counter() - start,
        peak=peak.peak, cache=report.cache_bytes, forecast_ratio=forecast_ratio, latents=result.latents,
        image=result.image, report=report,
    )  # fmt: skip


def reference_costs(
    c: Components,
    preset: str,
    steps: int = 28,
    level: str = "go fast",
    repeats: int = 1,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Seconds per edit with 0 to 3 reference images (each the preset's input size; together they get
    one image's token budget at the preset's side, as at full size), median of ``repeats``."""
    from flux import sizes

    size = SIZES[preset]
    image = input_image(size[2], size[3])
    run_project(c, image, size, "none", min(steps, 4), 0)  # warm-up
    rows: list[dict] = []
    for count in range(sizes.MAX_REFERENCES + 1):
        references = [input_image(size[2], size[3]) for _ in range(count)]
        ref_tokens = sum(sizes.tokens(*sizes.reference_size(*r.size, count, max(image.size))) for r in references)
        seconds = statistics.median(
            run_project(c, image, size, level, steps, 0, references)["e2e"] for _ in range(repeats)
        )
        rows.append({
            "references": count, "target_tokens": sizes.tokens(size[0], size[1]),
            "conditioning_tokens": sizes.tokens(*image.size) + ref_tokens, "seconds_per_edit": seconds,
            "ratio_to_no_reference": seconds / rows[0]["seconds_per_edit"] if rows else 1.0,
        })  # fmt: skip
        log(f"  {count} references: {rows[-1]['conditioning_tokens']} conditioning tokens, {seconds:.2f}s per edit")
        release_memory(c.device)
    return rows


def run_diffusers(
    c: Components, image: Image.Image, size, steps: int, seed: int, hook: dict | None,
    prompt: str = "make the circle red",
) -> dict:  # fmt: skip
    """FluxKontextPipeline, optionally with diffusers' TaylorSeer hook (inside a cache context)."""
    from diffusers import TaylorSeerCacheConfig

    width, height, _, _ = size
    pipe = _pipeline(c)
    calls, remove = _count_attention(c)
    marks: dict[str, float] = {}

    def first_call(*args):
        marks.setdefault("denoise_start", time.perf_counter())

    def step_end(pipeline, i, t, kwargs):
        if i == steps - 1:
            synchronize(c.device)
            marks["denoise_end"] = time.perf_counter()
        return kwargs

    start_handle = c.transformer.register_forward_pre_hook(first_call)
    if hook is not None:
        c.transformer.enable_cache(TaylorSeerCacheConfig(taylor_factors_dtype=c.dtype, **hook))
    try:
        synchronize(c.device)
        start = time.perf_counter()
        with PeakMemory(c.device) as peak, torch.inference_mode():
            context = c.transformer.cache_context("cond") if hook is not None else contextlib.nullcontext()
            with context:
                latents = pipe(
                    image=image, prompt=prompt, height=height, width=width,
                    num_inference_steps=steps, guidance_scale=2.5, max_area=width * height, _auto_resize=False,
                    generator=torch.Generator("cpu").manual_seed(seed), output_type="latent",
                    callback_on_step_end=step_end,
                    max_sequence_length=min(T5_MAX_TOKENS, c.tokenizer_2.model_max_length),
                ).images  # fmt: skip
            decoded = decode(c, latents, width, height)
        synchronize(c.device)
        e2e = time.perf_counter() - start
    finally:
        start_handle.remove()
        remove()
        if hook is not None:
            c.transformer.disable_cache()
    return dict(
        calls=len(calls), denoise=marks["denoise_end"] - marks["denoise_start"], e2e=e2e, peak=peak.peak, cache=None,
        forecast_ratio=None, latents=latents, image=images.to_pil(decoded),
    )  # fmt: skip


def _summarise(method: str, level: str, runs: list[dict], note: str = "") -> MethodResult:
    last = runs[-1]
    ratios = [r["forecast_ratio"] for r in runs if r["forecast_ratio"] is not None]
    return MethodResult(
        method=method, level=level, transformer_calls=last["calls"],
        denoise_seconds=statistics.median(r["denoise"] for r in runs),
        end_to_end_seconds=statistics.median(r["e2e"] for r in runs),
        peak_memory_bytes=max(r["peak"] for r in runs), cache_bytes=last["cache"],
        forecast_cost_ratio=statistics.median(ratios) if ratios else None, note=note,
        runs=[{"denoise": r["denoise"], "e2e": r["e2e"]} for r in runs],
    )  # fmt: skip


def run_benchmark(
    c: Components, preset: str, steps: int = 28, repeats: int = 3, seed: int = 0, log: Callable[[str], None] = print
) -> dict:
    size = SIZES[preset]
    image = input_image(size[2], size[3])
    log(f"warm-up ({preset}, {size[0]}x{size[1]}, {steps} steps, {c.device}, {c.dtype})")
    run_project(c, image, size, "none", min(steps, 4), seed)
    methods: list[tuple[str, str, Callable[[], dict]]] = []
    for level in taylor_utils.ACCELERATION_LEVELS:
        methods.append(("project", level, lambda lv=level: run_project(c, image, size, lv, steps, seed)))
    methods.append(("diffusers pipeline", "none", lambda: run_diffusers(c, image, size, steps, seed, None)))
    for level, settings in HOOK_SETTINGS.items():
        for lite in (False, True):
            name = "diffusers TaylorSeer hook" + (" (lite)" if lite else "")
            hook = {**settings, "max_order": 2, "use_lite_mode": lite}
            methods.append((name, level, lambda h=hook: run_diffusers(c, image, size, steps, seed, h)))

    results: list[MethodResult] = []
    outputs: dict[tuple[str, str], dict] = {}
    # interleave the repeats so that a slow moment of the machine is shared between methods, and
    # reverse the order every other repeat so that no method always runs first (or after another's
    # leftovers in the caches)
    runs: dict[tuple[str, str], list[dict]] = {(m, lv): [] for m, lv, _ in methods}
    errors: dict[tuple[str, str], str] = {}
    for r in range(repeats):
        for method, level, fn in methods if r % 2 == 0 else methods[::-1]:
            if (method, level) in errors:
                continue
            try:
                out = fn()
            except Exception as exc:  # report why a peer could not run, never skip silently
                errors[(method, level)] = f"{type(exc).__name__}: {exc}"
                log(f"  {method} / {level}: could not run: {errors[(method, level)]}")
                continue
            runs[(method, level)].append(out)
            outputs[(method, level)] = out
            log(f"  repeat {r + 1}: {method} / {level}: {out['calls']} calls, denoise {out['denoise']:.3f}s")
            release_memory(c.device)
    for method, level, _ in methods:
        key = (method, level)
        if key in errors:
            results.append(
                MethodResult(method, level, 0, float("nan"), float("nan"), 0, note=f"could not run: {errors[key]}")
            )
            continue
        results.append(_summarise(method, level, runs[key]))

    reference = outputs[("project", "none")]
    base = next(r for r in results if r.method == "project" and r.level == "none")
    for result in results:
        out = outputs.get((result.method, result.level))
        if out is None:
            continue
        result.speedup_denoise = base.denoise_seconds / result.denoise_seconds
        result.speedup_end_to_end = base.end_to_end_seconds / result.end_to_end_seconds
        ref_latents = reference["latents"].float()
        latents = out["latents"].float()
        if latents.shape == ref_latents.shape:
            result.latent_rel_error_vs_none = float((latents - ref_latents).norm() / ref_latents.norm())
        result.psnr_vs_none = psnr(out["image"], reference["image"])

    pipeline = next(r for r in results if r.method == "diffusers pipeline")
    ideal = {level: steps / taylor_utils.compute_step_count(level, steps) for level in taylor_utils.ACCELERATION_LEVELS}
    return {
        "preset": preset,
        "size": {"output": list(size[:2]), "input": list(size[2:])},
        "steps": steps,
        "repeats": repeats,
        "device": _device_name(c.device),
        "dtype": str(c.dtype).removeprefix("torch."),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "ideal_speedup": ideal,
        "none_vs_diffusers_denoise_ratio": base.denoise_seconds / pipeline.denoise_seconds,
        "none_vs_diffusers_end_to_end_ratio": base.end_to_end_seconds / pipeline.end_to_end_seconds,
        "results": [asdict(r) for r in results],
    }


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()})"


def markdown_table(report: dict) -> str:
    lines = [
        f"**{report['preset']}**: {report['size']['output'][0]}x{report['size']['output'][1]} edit, "
        f"{report['steps']} steps, median of {report['repeats']}, {report['device']}, {report['dtype']} "
        f"({report['machine']})",
        "",
        "| method | level | calls | denoise s | speedup (denoise) | end-to-end s | speedup (e2e) | forecast/full step "
        "| PSNR vs none (dB) | latent rel. error | peak memory | cache |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def f(value, fmt):
        return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)

    def mib(value):
        return "-" if value is None else f"{value / 2**20:.1f} MiB"

    def percent(ratio):  # two significant digits: the forecast costs 0.3% at tiny size, 0.001% at cpu-mid
        return "-" if ratio is None else f"{100 * ratio:.2g}%"

    for r in report["results"]:
        psnr_text = "identical" if r["psnr_vs_none"] == float("inf") else f(r["psnr_vs_none"], ".1f")
        lines.append(
            f"| {r['method']} | {r['level']} | {r['transformer_calls']} | {f(r['denoise_seconds'], '.3f')} "
            f"| {f(r['speedup_denoise'], '.2f')}x | {f(r['end_to_end_seconds'], '.3f')} "
            f"| {f(r['speedup_end_to_end'], '.2f')}x | {percent(r['forecast_cost_ratio'])} | {psnr_text} "
            f"| {f(r['latent_rel_error_vs_none'], '.4f')} | {r['peak_memory_bytes'] / 2**20:.0f} MiB "
            f"| {mib(r['cache_bytes'])} |" + (f" {r['note']}" if r["note"] else "")
        )
    lines += [
        "",
        f'Project "none" against diffusers\' pipeline (time ratio, lower is faster): denoise '
        f"{report['none_vs_diffusers_denoise_ratio']:.3f}, end to end {report['none_vs_diffusers_end_to_end_ratio']:.3f}.",
        "Ideal speedups from call counts: "
        + ", ".join(f"{k} {v:.2f}x" for k, v in report["ideal_speedup"].items())
        + ".",
    ]
    return "\n".join(lines) + "\n"


def chart(report: dict, path: Path) -> Path:
    """PNG scatter: denoise speedup (x) against drift from "none" (latent relative error, y)."""
    width, height, margin = 900, 600, 80
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    points = [
        r for r in report["results"]
        if r["speedup_denoise"] is not None and r["latent_rel_error_vs_none"] is not None
    ]  # fmt: skip
    max_x = max([r["speedup_denoise"] for r in points] + [2.5]) * 1.1
    max_y = max([r["latent_rel_error_vs_none"] for r in points] + [0.01]) * 1.15
    draw.line((margin, height - margin, width - margin, height - margin), fill="black")
    draw.line((margin, margin, margin, height - margin), fill="black")

    def xy(x, y):
        return (margin + x / max_x * (width - 2 * margin), height - margin - y / max_y * (height - 2 * margin))

    for i in range(6):
        x_value, y_value = max_x * i / 5, max_y * i / 5
        px, _ = xy(x_value, 0)
        _, py = xy(0, y_value)
        draw.text((px - 10, height - margin + 8), f"{x_value:.1f}x", fill="black")
        draw.text((8, py - 6), f"{y_value:.3f}", fill="black")
    draw.text((width // 2 - 120, height - 30), "denoise speedup against project 'none'", fill="black")
    draw.text((8, 20), "drift: relative error of final latents vs 'none'", fill="black")
    colours = {"project": (200, 30, 30), "diffusers pipeline": (30, 30, 30)}
    labels: list[tuple[float, float]] = []
    for r in points:
        colour = colours.get(r["method"], (30, 90, 200) if "lite" not in r["method"] else (30, 160, 90))
        px, py = xy(r["speedup_denoise"], r["latent_rel_error_vs_none"])
        draw.ellipse((px - 6, py - 6, px + 6, py + 6), fill=colour)
        ty = py - 7
        while any(abs(ty - ly) < 13 and abs(px - lx) < 250 for lx, ly in labels):
            ty += 13  # points that (nearly) coincide, as ours and the lite hook do: stack their labels
        labels.append((px, ty))
        draw.text((px + 9, ty), f"{r['method']} / {r['level']}", fill=colour)
    draw.text(
        (margin, 45),
        f"{report['preset']} {report['size']['output'][0]}x{report['size']['output'][1]}, {report['steps']} steps, "
        f"{report['device']}",
        fill="black",
    )
    canvas.save(path)
    return path


def write_report(report: dict, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out_dir / f"benchmark-{report['preset']}.json",
        "markdown": out_dir / f"benchmark-{report['preset']}.md",
        "chart": out_dir / f"benchmark-{report['preset']}.png",
    }
    paths["json"].write_text(json.dumps(report, indent=2, default=str) + "\n")
    paths["markdown"].write_text(markdown_table(report))
    chart(report, paths["chart"])
    return paths


def components_for(preset: str, device: torch.device, dtype: torch.dtype, weights_dir: Path | None = None):
    """The model to benchmark: a weights tree when given, else random weights of the preset."""
    if weights_dir is not None:
        from flux.loading import load_components

        return load_components(weights_dir, device, dtype)
    from flux.lab.tiny import random_components

    if preset == "full" and device.type != "cuda":
        raise SystemExit("the full-size benchmark needs a CUDA GPU (the model is 12B parameters in bf16)")
    return random_components(preset, device, dtype, tempfile.mkdtemp(prefix="bench-tokenizers-"))
