"""The GPU check: full-size random weights, 1024x1024 edit of a 1024x1024 input, 28 steps, every level,
eager against compiled against compiled + FP8, then a cold start that reuses the compile cache.
Writes gpu_check.json into the folder it is given, after every mode, so a run cut short still
leaves what it measured.

Speed does not depend on weight values, so the real architecture with random bf16 weights
measures the real speed. Built to finish in under 8 minutes on one H100 with no network; a mode
that fails is recorded with its error and the check goes on.

    python -m flux.lab.gpu_check OUT_DIR                            # the check (CUDA, full size)
    python -m flux.lab.gpu_check OUT_DIR --preset tiny --device cpu # a rehearsal of the same code (tests)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

import taylor_utils
from flux.device import release_memory, synchronize
from flux.fast import FastSettings, optimize, quantize_fp8
from flux.lab.benchmark import SIZES, input_image, psnr, run_project
from flux.lab.tiny import random_components
from flux.pipeline import Model, warm_up

STEPS = 28
COLD_START_IF_UNDER_S = 300  # elapsed seconds after which the cold-start process is left out
MODES = ("eager", "compiled", "compiled+fp8")


def _edit(c, image, size: int, level: str, steps: int = STEPS) -> dict:
    """One timed edit (the benchmark's measurement), in the figures this check reports."""
    run = run_project(c, image, (size, size, *image.size), level, steps, seed=0)
    report = run["report"]
    return {
        "seconds_per_edit": run["e2e"],
        "transformer_calls": report.transformer_calls,
        "seconds_per_transformer_call": report.transformer_seconds / report.transformer_calls,
        "denoise_seconds": report.seconds["denoise"],
        "phases": report.seconds,
        "peak_memory_gib": run["peak"] / 2**30,
        "latents": run["latents"],
        "image": run["image"],
    }


def _build(preset: str, device: torch.device):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return random_components(preset, device, dtype, tempfile.mkdtemp(prefix="gpu-check-"))


def cold_start(out: Path, preset: str, device: torch.device) -> dict:
    """What setup() does on a GPU, timed per phase, in a fresh process (the compile cache is on disk)."""
    seconds = {}
    start = time.perf_counter()
    c = _build(preset, device)
    synchronize(device)
    seconds["build_random_weights"] = time.perf_counter() - start
    start = time.perf_counter()
    applied = optimize(c, FastSettings.from_env())
    seconds["fast_path"] = time.perf_counter() - start
    size = SIZES[preset][0]
    seconds["warm_up"] = warm_up(Model(c, None, Path(tempfile.gettempdir())), [(size, size)])
    figures = {"seconds": seconds, "applied": {k: str(v) for k, v in applied.items()}}
    (out / "cold_start.json").write_text(json.dumps(figures, indent=2) + "\n")
    return figures


def run_check(out: Path, preset: str = "full", device: torch.device | None = None) -> dict:
    device = device or torch.device("cuda")
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    size = SIZES[preset][0]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    report: dict = {"device": name, "torch": torch.__version__, "preset": preset, "size": size, "steps": STEPS}

    def save():
        report["total_seconds"] = time.perf_counter() - started
        (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")

    def say(message: str):
        print(f"[{time.perf_counter() - started:6.1f}s] {message}", flush=True)

    start = time.perf_counter()
    c = _build(preset, device)
    report["build_seconds"] = time.perf_counter() - start
    say(f"built the {preset} random model on {name} in {report['build_seconds']:.1f}s")
    image = input_image(size, size)
    model = Model(c, None, Path(tempfile.gettempdir()))
    shipped = FastSettings.from_env()
    modes: dict = {}
    report["modes"] = modes
    latents = {}

    def prepare(mode: str) -> dict:
        if mode == "compiled":
            return optimize(c, FastSettings(**{**shipped.__dict__, "fp8": "off"}))
        if mode == "compiled+fp8":
            # a fresh compile of the quantized transformer, so its warm-up is a real compile
            torch._dynamo.reset()
            quantize_fp8(c.transformer)
            return {"fp8": True, "compile": shipped.compile_mode if device.type == "cuda" else "off on the CPU"}
        return {}

    for mode in MODES:
        start = time.perf_counter()
        try:
            applied = prepare(mode)
            warm_up(model, [(size, size)])  # what setup() does: the compile (or first-call) cost
            warm = time.perf_counter() - start
            say(f"{mode}: ready in {warm:.1f}s ({applied})")
            modes[mode] = {"applied": {k: str(v) for k, v in applied.items()}, "warm_up_seconds": warm, "levels": {}}
            for level in taylor_utils.ACCELERATION_LEVELS:
                figures = _edit(c, image, size, level)
                latents[(mode, level)] = (figures.pop("latents").float().cpu(), figures.pop("image"))
                modes[mode]["levels"][level] = figures
                say(f"{mode} / {level}: {figures['seconds_per_edit']:.2f}s per edit, "
                    f"{figures['seconds_per_transformer_call'] * 1000:.0f} ms per call")  # fmt: skip
        except Exception as exc:  # record and go on: the other modes are still worth measuring
            modes.setdefault(mode, {})["error"] = f"{type(exc).__name__}: {exc}"
            say(f"{mode} failed:\n{traceback.format_exc()}")
        save()

    drift = {}
    for level in taylor_utils.ACCELERATION_LEVELS:
        if ("compiled", level) in latents and ("compiled+fp8", level) in latents:
            bf16, bf16_image = latents[("compiled", level)]
            fp8, fp8_image = latents[("compiled+fp8", level)]
            drift[level] = {
                "latent_rel_error_fp8_vs_bf16": float((fp8 - bf16).norm() / bf16.norm()),
                "psnr_fp8_vs_bf16": psnr(fp8_image, bf16_image),
            }
    report["fp8_drift"] = drift
    save()

    if time.perf_counter() - started < COLD_START_IF_UNDER_S:
        del c, model, latents
        release_memory(device)
        say("cold start in a fresh process, compile cache on disk")
        start = time.perf_counter()
        command = [sys.executable, "-m", "flux.lab.gpu_check", str(out), "--cold-start", "--preset", preset,
                   "--device", device.type]  # fmt: skip
        done = subprocess.run(command, check=False)
        report["cold_start"] = {"process_seconds": time.perf_counter() - start, "rc": done.returncode}
        cold = out / "cold_start.json"
        if cold.exists():
            report["cold_start"].update(json.loads(cold.read_text()))
    else:
        report["cold_start"] = {"skipped": "not enough time left in the 8-minute budget"}
    save()
    say(f"wrote {out / 'gpu_check.json'}")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", nargs="?", default="results/gpu")
    parser.add_argument("--preset", default="full", choices=sorted(SIZES))
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--cold-start", action="store_true", help="one process start: build, fast path, warm-up")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check needs a CUDA GPU (--preset tiny --device cpu rehearses the same code)", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    if args.cold_start:
        print(json.dumps(cold_start(Path(args.out), args.preset, device)), flush=True)
    else:
        run_check(Path(args.out), args.preset, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
