"""The GPU check: full-size random weights, 1024x1024 edit of a 1024x1024 input, 28 steps, every level,
eager against compiled (dynamic shapes, the default policy) against compiled with static shapes (a
graph per size) against dynamic + FP8 (with the LoRA side branch, as shipped); for each compiled policy the first edit at sizes setup() never
saw (the stall a user would feel) and the next one; then a cold start that reuses the compile cache.
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
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

import taylor_utils
from flux import lora, sizes
from flux.config import Config, FastPathConfig
from flux.device import dtype_for, release_memory, synchronize
from flux.errors import SetupError
from flux.fast import compile_transformer, quantize_fp8, warm_up_sizes
from flux.lab.benchmark import SIZES, input_image, psnr, run_project
from flux.lab.collector import in_view_and_frozen
from flux.lab.tiny import random_components
from flux.lora_sources import LoraStore
from flux.pipeline import Model, start_runtime, warm_up
from flux.runtime import AUTO_LORA_BRANCH_RANK, FastPath, LocalRuntime, TransformerRuntime, prepare_transformer

STEPS = 28
COLD_START_IF_UNDER_S = 360  # elapsed seconds after which the cold-start process is left out
MODES = ("eager", "compiled", "compiled static", "compiled+fp8")
MODE_IF_UNDER_S = 330  # a mode starts only while this many seconds have not passed (8-minute budget)
UNSEEN_RATIOS = ("3:2", "9:16")  # sizes no warm-up edits: their first edit shows any compile stall


def _edit(c, image, size: tuple[int, int], level: str, steps: int = STEPS, runtime=None) -> dict:
    """One timed edit (the benchmark's measurement) of ``image`` to ``size`` (width, height), through
    ``runtime`` where given (several ranks), else the components' transformer."""
    run = run_project(c, image, (*size, *image.size), level, steps, seed=0, transformer=runtime)
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


def _release_case(c, image, size: int, say) -> dict:
    """What handing cached memory back after each prediction (``release_memory``, as run_edit does)
    costs the next one: a "go really fast" edit right after the release against one right after
    another edit, interleaved twice, the faster of each."""
    after_release, after_edit = [], []
    for _ in range(2):
        release_memory(c.device)
        after_release.append(_edit(c, image, (size, size), "go really fast")["seconds_per_edit"])
        after_edit.append(_edit(c, image, (size, size), "go really fast")["seconds_per_edit"])
    figures = {"after_release_seconds": min(after_release), "after_edit_seconds": min(after_edit)}
    figures["release_cost_seconds"] = figures["after_release_seconds"] - figures["after_edit_seconds"]
    say(
        f"release: next edit {figures['after_release_seconds']:.3f}s after it, {figures['after_edit_seconds']:.3f}s without"
    )
    return figures


def _short_schedule(c, image, size: int, say, steps: int = 8) -> dict:
    """Every level at a short schedule (the edges scale down with it): calls and seconds per edit."""
    figures = {}
    for level in taylor_utils.ACCELERATION_LEVELS:
        run = _edit(c, image, (size, size), level, steps=steps)
        figures[level] = {"transformer_calls": run["transformer_calls"], "seconds_per_edit": run["seconds_per_edit"]}
    say(f"compiled / {steps} steps: " + ", ".join(f"{lv} {f['transformer_calls']} calls {f['seconds_per_edit']:.2f}s"
                                                  for lv, f in figures.items()))  # fmt: skip
    return {"steps": steps, "levels": figures}


def _unseen_sizes(c, base: int, say, mode: str) -> dict:
    """For sizes no warm-up edited: the first edit (any compile happens in it) and the next, "go fast"."""
    figures = {}
    # under static shapes each unseen size is a full compile: one shows the stall within the budget
    for ratio in UNSEEN_RATIOS[:1] if mode == "compiled static" else UNSEEN_RATIOS:
        width, height = sizes.output_size(ratio, 1, 1, base)
        image = input_image(width, height)
        first = _edit(c, image, (width, height), "go fast")
        then = _edit(c, image, (width, height), "go fast")
        figures[f"{width}x{height}"] = {
            "first_edit_seconds": first["seconds_per_edit"],
            "next_edit_seconds": then["seconds_per_edit"],
            "stall_seconds": first["seconds_per_edit"] - then["seconds_per_edit"],
        }
        say(f"{mode} / unseen {width}x{height}: first edit {first['seconds_per_edit']:.2f}s, "
            f"next {then['seconds_per_edit']:.2f}s")  # fmt: skip
    return figures


def _reference_case(c, image, size: int, say) -> dict:
    """A "go fast" edit with 1 and with 3 reference images (the first ever: any compile would show)."""
    figures = {}
    for count in (1, 3):
        references = [input_image(size, size) for _ in range(count)]
        run = run_project(c, image, (size, size, *image.size), "go fast", STEPS, 0, references)
        figures[f"{count}_references_seconds"] = run["e2e"]
        say(f"compiled / {count} references: {run['e2e']:.2f}s per edit")
    return figures


def _lora_case(c, image, size: int, say, state: lora.LoraState) -> dict:
    """Two LoRAs (fal Kontext layout at full size, rank 16; peft layout, rank 32) applied (merged, or in
    the side branch beside FP8), swapped and removed: seconds of each step and of a "go fast" edit with
    and without a LoRA, under the compiled graph."""
    from flux.lab.loras import make_lora, write_lora

    figures: dict = {}
    how = "side branch" if state.branch_rank else "merged"
    folder = Path(tempfile.mkdtemp(prefix="gpu-check-lora-"))
    try:
        loaded = []
        config = c.transformer.config
        real_layout = (config.num_layers, config.num_single_layers, config.attention_head_dim) == (19, 38, 128)
        # diffusers' fal Kontext converter assumes the real layout; the rehearsal's tiny model gets kohya
        for fmt, rank in (("fal" if real_layout else "kohya", 16), ("peft", 32)):
            start = time.perf_counter()
            path = write_lora(folder / f"{fmt}.safetensors", make_lora(c.transformer, fmt, rank=rank, scale=0.05))
            loaded.append(lora.convert(path, fmt, c.transformer))
            figures[f"convert_{fmt}_rank{rank}_seconds"] = time.perf_counter() - start
        figures["edit_without_lora_seconds"] = _edit(c, image, (size, size), "go fast")["seconds_per_edit"]
        synchronize(c.device)
        figures["merge_first_seconds"] = state.apply([(loaded[0], 1.0)])
        figures["edit_with_lora_seconds"] = _edit(c, image, (size, size), "go fast")["seconds_per_edit"]
        figures["swap_seconds"] = state.apply([(loaded[1], 0.8)])
        figures["strength_change_seconds"] = state.apply([(loaded[1], 0.4)])
        figures["two_loras_seconds"] = state.apply([(loaded[0], 1.0), (loaded[1], 0.5)])
        figures["edit_with_two_loras_seconds"] = _edit(c, image, (size, size), "go fast")["seconds_per_edit"]
        start = time.perf_counter()
        state.apply([])
        synchronize(c.device)
        figures["restore_seconds"] = time.perf_counter() - start
        figures["edit_after_restore_seconds"] = _edit(c, image, (size, size), "go fast")["seconds_per_edit"]
        say(f"LoRA ({how}): merge {figures['merge_first_seconds']:.2f}s, swap {figures['swap_seconds']:.2f}s, "
            f"edit {figures['edit_with_lora_seconds']:.2f}s with, {figures['edit_without_lora_seconds']:.2f}s without")  # fmt: skip
    except Exception as exc:  # recorded, not fatal: the other figures are still worth having
        figures["error"] = f"{type(exc).__name__}: {exc}"
        say(f"LoRA ({how}): {figures['error']}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return figures


def _mask_case(model: Model, say, photo_size: tuple[int, int] = (3000, 2000)) -> dict:
    """A "go fast" edit of a 3000x2000 photo through the product path without a mask and with one
    over a small region (edited on a crop around it, stitched back at 3000x2000): seconds of each
    and where the masked one ran."""
    import io

    from PIL import Image

    from flux.pipeline import run_edit
    from flux.request import EditRequest

    def png(image: Image.Image) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, "PNG", compress_level=1)
        return buffer.getvalue()

    width, height = photo_size
    mask = Image.new("L", photo_size)
    mask.paste(255, (width * 3 // 4, height // 6, width * 3 // 4 + width // 8, height // 6 + height // 5))
    photo, figures = png(input_image(width, height)), {}
    for name, sent in (("without_mask", None), ("with_mask", png(mask))):
        synchronize(model.components.device)
        start = time.perf_counter()
        result = run_edit(model, EditRequest("make it red", photo, seed=0, check_safety=False, mask=sent))
        figures[f"{name}_seconds"] = time.perf_counter() - start
        figures[f"{name}_size"] = list(result.image.size)
    figures["mask"] = result.report.mask
    say(f"compiled / {width}x{height} photo: {figures['without_mask_seconds']:.2f}s plain, "
        f"{figures['with_mask_seconds']:.2f}s masked (crop {figures['mask']['crop']}, ran at {figures['mask']['edit_size']})")  # fmt: skip
    return figures


def _build(preset: str, device: torch.device):
    return random_components(preset, device, dtype_for(device), tempfile.mkdtemp(prefix="gpu-check-"))


def _model(c, runtime: TransformerRuntime | None = None, config: Config | None = None) -> Model:
    """The components as the pipeline holds them (what ``warm_up`` takes)."""
    config = config or Config.from_env()
    return Model(config, c, runtime or LocalRuntime(c.transformer), None, LoraStore.from_config(config), {})


def _shipped(**changes: object) -> FastPathConfig:
    """The fast path as configured, compiling on any device this check runs on, with ``changes``."""
    return dataclasses.replace(Config.from_env().fast, compile="on", **changes)


def cold_start(out: Path, preset: str, device: torch.device) -> dict:
    """What setup() does on a GPU, timed per phase, in a fresh process (the compile cache is on disk)."""
    seconds = {}
    start = time.perf_counter()
    c = _build(preset, device)
    synchronize(device)
    seconds["build_random_weights"] = time.perf_counter() - start
    start = time.perf_counter()
    applied = prepare_transformer(c.transformer, device, c.dtype, _shipped())
    seconds["fast_path"] = time.perf_counter() - start
    seconds["warm_up"] = warm_up(_model(c, LocalRuntime(c.transformer, applied)), warm_up_sizes(SIZES[preset][0]))
    figures = {"seconds": seconds, "applied": applied.summary()}
    (out / "cold_start.json").write_text(json.dumps(figures, indent=2) + "\n")
    return figures


PARALLEL_RANKS = (1, 2, 4, 8)
PARALLEL_IF_UNDER_S = 300  # a rank count starts only while this many seconds of the case have not passed
PARALLEL_CASE_S = 460  # a rank count still running then is stopped (scripts/gpu_check.sh allows 480)


def parallel_case(out: Path, preset: str, device: torch.device) -> dict:
    """Seconds per edit at the preset's size with N = 1, 2, 4, 8 ranks (context parallelism, as many as
    the machine has GPUs; the CPU rehearsal: 1 and 2 processes), every level, eager, then the largest
    N compiled as shipped (its 1-rank counterpart is gpu_check.json's "compiled" mode), and each
    output's difference to N = 1 eager. Skipped, and said so, on a machine with one GPU. Writes
    parallel.json."""
    available = torch.cuda.device_count() if device.type == "cuda" else 2
    ranks = [n for n in PARALLEL_RANKS if n <= available]
    figures: dict = {"ranks": ranks}
    if len(ranks) < 2:
        figures = {"skipped": f"this machine has {available} GPU; the case needs 2 or more"}
    else:
        started = time.perf_counter()
        folder = Path(tempfile.mkdtemp(prefix="gpu-check-parallel-"))
        try:
            c = _build(preset, device)
            c.transformer.save_pretrained(folder / "transformer")  # the workers load it from disk
            figures["save_transformer_seconds"] = time.perf_counter() - started
            del c
            release_memory(device)
            # the most ranks first after one (eager, then compiled as shipped), the counts between last
            most = ranks[-1]
            runs = [("1", 1, "0"), (str(most), most, "0"), (f"{most} compiled", most, "1")]
            runs += [(str(n), n, "0") for n in ranks[1:-1]]
            for name, n, compile_setting in runs:
                figures[name] = _parallel_run(folder, name, n, compile_setting, preset, device, started)
                (out / "parallel.json").write_text(json.dumps(figures, indent=2) + "\n")
            for name, _, _ in runs[1:]:
                for level in taylor_utils.ACCELERATION_LEVELS:
                    one, many = (folder / f"latents-{k}-{level}.pt" for k in ("1", name))
                    if one.exists() and many.exists():
                        a, b = torch.load(one), torch.load(many)
                        figures[name].setdefault("difference_to_1", {})[level] = {
                            "max_abs": float((a - b).abs().max()), "rel_l2": float((a - b).norm() / a.norm())}  # fmt: skip
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    (out / "parallel.json").write_text(json.dumps(figures, indent=2) + "\n")
    return figures


def _parallel_run(folder: Path, name: str, n: int, compile_setting: str, preset: str, device: torch.device,
                  started: float) -> dict:  # fmt: skip
    """One run of ``parallel_case`` (``n`` ranks) in a process of its own, within the case's time."""
    if time.perf_counter() - started > PARALLEL_IF_UNDER_S:
        return {"skipped": "not enough time left"}
    left = PARALLEL_CASE_S - (time.perf_counter() - started)
    command = [sys.executable, "-m", "flux.lab.gpu_check", str(folder), "--parallel-ranks", str(n),
               "--name", name, "--preset", preset, "--device", device.type]  # fmt: skip
    env = {**os.environ, "FLUX_CONTEXT_PARALLEL": str(n), "FLUX_COMPILE": compile_setting}
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False, timeout=left)
    except subprocess.TimeoutExpired:
        return {"error": f"still running after {PARALLEL_CASE_S} s of the case; stopped"}
    result = folder / f"parallel-{name}.json"
    return json.loads(result.read_text()) if result.exists() else {"error": done.stderr[-2000:]}


def parallel_ranks(folder: Path, ranks: int, name: str, preset: str, device: torch.device) -> dict:
    """One rank count of ``parallel_case``, in a process of its own (a process holds one process group):
    rank 0 with the saved transformer (its folder read as the weights tree) and random encoders and
    VAE, the product's own way to the other ranks (``pipeline.start_runtime``, as FLUX_CONTEXT_PARALLEL
    and FLUX_COMPILE say), one timed edit per level."""
    c = _build(preset, device)
    c.transformer = None
    release_memory(device)
    config = Config.from_env(WEIGHTS_DIR=str(folder))
    start = time.perf_counter()
    runtime = start_runtime(config, device, c.dtype)
    c.transformer = runtime.transformer
    if runtime.decided.compiled is not None:  # compiled now, on every rank, as setup() does
        warm_up(_model(c, runtime, config), warm_up_sizes(SIZES[preset][0]))
    figures: dict = {"ready_seconds": time.perf_counter() - start, "applied": runtime.decided.summary()}
    size = SIZES[preset][0]
    image = input_image(*SIZES[preset][2:])
    try:
        _edit(c, image, (size, size), "go really fast", steps=4, runtime=runtime)  # the first call's one-time costs
        for level in taylor_utils.ACCELERATION_LEVELS:
            run = _edit(c, image, (size, size), level, runtime=runtime)
            torch.save(run.pop("latents").float().cpu(), folder / f"latents-{name}-{level}.pt")
            run.pop("image")
            figures[level] = {k: v for k, v in run.items() if k != "phases"}
    finally:
        runtime.close()
    (folder / f"parallel-{name}.json").write_text(json.dumps(figures, indent=2) + "\n")
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
    report["collector"] = in_view_and_frozen()  # and frozen from here on, as load_model leaves a server
    say(f"one full garbage collection: {report['collector']['in_view_seconds']:.3f}s with the model in view, "
        f"{report['collector']['frozen_seconds'] * 1e3:.2f} ms frozen")  # fmt: skip
    image = input_image(size, size)
    model = _model(c)
    modes: dict = {}
    report["modes"] = modes
    latents = {}
    modes_extra: dict = {}

    def prepare(mode: str) -> FastPath:
        """Each compiled mode starts from a fresh dynamo state, so its warm-up is a real compile."""
        if mode == "eager":
            return FastPath()
        torch._dynamo.reset()
        if mode == "compiled":  # the shipped policy, and the rest of the fast path, FP8 off
            return prepare_transformer(c.transformer, c.device, c.dtype, _shipped(fp8="off"))
        if mode == "compiled static":
            return FastPath(compiled=compile_transformer(c.transformer, _shipped(compile_shapes="static")))
        # compiled+fp8: the shipped policy on the quantized transformer, with the LoRA side branch
        # setup() installs beside FP8; its cost measured eagerly, a short "none" edit without and with it
        fp8, why = True, None
        try:
            quantize_fp8(c.transformer)
        except SetupError as exc:  # no torchao (the CPU rehearsal): the branch and LoRA case still run
            fp8, why = False, str(exc)
        without = _edit(c, image, (size, size), "none", steps=4)["seconds_per_edit"]
        rank = _shipped().branch_rank(True, AUTO_LORA_BRANCH_RANK)
        layers = lora.install_branches(c.transformer, rank, c.dtype)
        with_branch = _edit(c, image, (size, size), "none", steps=4)["seconds_per_edit"]
        modes_extra["compiled+fp8"] = {"eager_4_step_edit_seconds": {"without_lora_branch": without,
                                                                     "with_lora_branch": with_branch}}  # fmt: skip
        say(f"compiled+fp8: eager 4-step edit {without:.2f}s, {with_branch:.2f}s with the rank-{rank} LoRA branch")
        compiled = compile_transformer(c.transformer, _shipped(compile_shapes="dynamic"))
        return FastPath(fp8=fp8, fp8_off_because=why, lora_branch_rank=rank, lora_branch_layers=layers,
                        compiled=compiled)  # fmt: skip

    for mode in MODES:
        if time.perf_counter() - started > MODE_IF_UNDER_S:
            modes[mode] = {"skipped": "not enough time left in the 8-minute budget"}
            continue
        start = time.perf_counter()
        try:
            applied = prepare(mode)
            # what setup() does: the compile (or first-call) cost of the policy's warm-up sizes;
            # the static policy, as shipped before, warmed the square size only
            warm_sizes = warm_up_sizes(size)[:1] if mode == "compiled static" else warm_up_sizes(size)
            warm_up(model, warm_sizes)
            warm = time.perf_counter() - start
            say(f"{mode}: ready in {warm:.1f}s ({applied})")
            modes[mode] = {"applied": applied.summary(), "warm_up_seconds": warm,
                           "warm_up_sizes": warm_sizes, "levels": {}, **modes_extra.get(mode, {})}  # fmt: skip
            for level in taylor_utils.ACCELERATION_LEVELS:
                figures = _edit(c, image, (size, size), level)
                latents[(mode, level)] = (figures.pop("latents").float().cpu(), figures.pop("image"))
                modes[mode]["levels"][level] = figures
                say(f"{mode} / {level}: {figures['seconds_per_edit']:.2f}s per edit, "
                    f"{figures['seconds_per_transformer_call'] * 1000:.0f} ms per call")  # fmt: skip
            if mode in ("compiled", "compiled static"):
                modes[mode]["unseen_sizes"] = _unseen_sizes(c, size, say, mode)
            if mode == "compiled":
                modes[mode]["short_schedule"] = _short_schedule(c, image, size, say)
                modes[mode]["references"] = _reference_case(c, image, size, say)
                modes[mode]["release"] = _release_case(c, image, size, say)
                modes[mode]["mask"] = _mask_case(model, say)
            if mode in ("compiled", "compiled+fp8"):
                state = lora.LoraState(c.transformer, applied.lora_branch_rank, applied.fp8)
                modes[mode]["lora"] = _lora_case(c, image, size, say, state)
        except Exception as exc:  # record and go on: the other modes are still worth measuring
            modes.setdefault(mode, {})["error"] = f"{type(exc).__name__}: {exc}"
            say(f"{mode} failed:\n{traceback.format_exc()}")
        save()

    drift = {}
    for level in taylor_utils.ACCELERATION_LEVELS:
        if ("compiled", level) in latents and ("compiled static", level) in latents:
            dynamic, static = latents[("compiled", level)][0], latents[("compiled static", level)][0]
            drift.setdefault(level, {})["latent_rel_error_dynamic_vs_static"] = float(
                (dynamic - static).norm() / static.norm()
            )
        if ("compiled", level) in latents and ("compiled+fp8", level) in latents:
            bf16, bf16_image = latents[("compiled", level)]
            fp8, fp8_image = latents[("compiled+fp8", level)]
            drift.setdefault(level, {}).update(
                latent_rel_error_fp8_vs_bf16=float((fp8 - bf16).norm() / bf16.norm()),
                psnr_fp8_vs_bf16=psnr(fp8_image, bf16_image),
            )
    report["drift"] = drift
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
    parser.add_argument("--parallel", action="store_true", help="instead: the several-GPU case (parallel.json)")
    parser.add_argument("--parallel-ranks", type=int, help="one rank count of that case (its own process)")
    parser.add_argument("--name", help="with --parallel-ranks: the run's name in parallel.json")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check needs a CUDA GPU (--preset tiny --device cpu rehearses the same code)", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    if args.cold_start:
        print(json.dumps(cold_start(Path(args.out), args.preset, device)), flush=True)
    elif args.parallel_ranks:
        parallel_ranks(Path(args.out), args.parallel_ranks, args.name or str(args.parallel_ranks), args.preset, device)
    elif args.parallel:
        print(json.dumps(parallel_case(Path(args.out), args.preset, device)), flush=True)
    else:
        run_check(Path(args.out), args.preset, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
