"""The GPU check: full-size random weights, 1024x1024 edit of a 1024x1024 input, 28 steps, every level,
eager against compiled against compiled + FP8. Writes gpu_check.json into the folder it is given.

Speed does not depend on weight values, so the real architecture with random bf16 weights
measures the real speed. Built to finish in well under 8 minutes on one H100 with no network.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

import taylor_utils
from flux.benchmark import input_image, psnr
from flux.edit import EditSettings, edit
from flux.fast import FastSettings, optimize, quantize_fp8
from flux.tiny import random_components

SIZE = 1024
STEPS = 28


def _edit(c, image, level: str, seed: int = 0):
    settings = EditSettings(prompt="make the circle red", width=SIZE, height=SIZE, seed=seed, num_steps=STEPS,
                            acceleration=level)  # fmt: skip
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = edit(c, image, settings)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    report = result.report
    return result, {
        "seconds_per_edit": seconds,
        "transformer_calls": report.transformer_calls,
        "seconds_per_transformer_call": report.transformer_seconds / report.transformer_calls,
        "denoise_seconds": report.seconds["denoise"],
        "phases": report.seconds,
        "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
    }


def main(out_dir: str) -> int:
    if not torch.cuda.is_available():
        print("gpu_check needs a CUDA GPU", file=sys.stderr)
        return 2
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    report: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "size": SIZE, "steps": STEPS}

    def save():
        report["total_seconds"] = time.perf_counter() - started
        (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")

    def say(message: str):
        print(f"[{time.perf_counter() - started:6.1f}s] {message}", flush=True)

    start = time.perf_counter()
    c = random_components("full", torch.device("cuda"), torch.bfloat16, tempfile.mkdtemp())
    report["build_seconds"] = time.perf_counter() - start
    say(f"built the full-size random model in {report['build_seconds']:.1f}s")
    image = input_image(SIZE, SIZE)
    modes = {}
    latents = {}
    plans = [
        ("eager", FastSettings(compile=False, fp8="off")),
        ("compiled", FastSettings(compile=True, fp8="off")),
        ("compiled+fp8", FastSettings(compile=True, fp8="on")),
    ]
    for mode, settings in plans:
        start = time.perf_counter()
        if mode == "compiled+fp8":
            # the transformer is already compiled in place; quantizing swaps its weights, which
            # recompiles on the next call (counted in this mode's warm-up)
            quantize_fp8(c.transformer)
            applied = {"fp8": True, "compile": "kept"}
        elif mode == "compiled":
            applied = optimize(c, settings)
        else:
            applied = {}
        # compile (or first-call) cost, then the levels
        _edit(c, image, "none")
        warm = time.perf_counter() - start
        say(f"{mode}: ready in {warm:.1f}s ({applied})")
        modes[mode] = {"applied": {k: str(v) for k, v in applied.items()}, "warm_up_seconds": warm, "levels": {}}
        for level in taylor_utils.ACCELERATION_LEVELS:
            result, figures = _edit(c, image, level)
            modes[mode]["levels"][level] = figures
            latents[(mode, level)] = (result.latents.float().cpu(), result.image)
            say(f"{mode} / {level}: {figures['seconds_per_edit']:.2f}s per edit, "
                f"{figures['seconds_per_transformer_call'] * 1000:.0f} ms per call")  # fmt: skip
        report["modes"] = modes
        save()
    drift = {}
    for level in taylor_utils.ACCELERATION_LEVELS:
        bf16, bf16_image = latents[("compiled", level)]
        fp8, fp8_image = latents[("compiled+fp8", level)]
        drift[level] = {
            "latent_rel_error_fp8_vs_bf16": float((fp8 - bf16).norm() / bf16.norm()),
            "psnr_fp8_vs_bf16": psnr(fp8_image, bf16_image),
        }
    report["fp8_drift"] = drift
    save()
    say(f"wrote {out / 'gpu_check.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "results/gpu"))
