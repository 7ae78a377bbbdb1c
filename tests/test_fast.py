"""The GPU fast path: off on the CPU; and the TaylorSeer forecast never recompiles a compiled transformer."""

from __future__ import annotations

import pytest
import torch

from flux.config import Config, FastPathConfig
from flux.edit import edit
from flux.errors import SetupError
from flux.lab.plans import direct, lab_plan
from flux.loading import load_components
from flux.runtime import FastPath, prepare_transformer
from tests.conftest import random_image


def test_everything_is_off_on_the_cpu(tiny_weights):
    c = load_components(tiny_weights)
    before = {k: v.clone() for k, v in c.transformer.state_dict().items()}
    forward = c.transformer.forward
    decided = prepare_transformer(c.transformer, c.device, c.dtype, FastPathConfig.defaults(fp8="on"))
    assert decided == FastPath() and decided.summary() == {}
    assert c.transformer._compiled_call_impl is None
    assert c.transformer.forward == forward
    assert all(torch.equal(before[k], v) for k, v in c.transformer.state_dict().items())
    conv = c.vae.decoder.conv_in.weight
    assert conv.is_contiguous()


def test_forecasts_never_recompile_the_compiled_transformer(tiny_weights):
    """Compiled (dynamo, eager backend on the CPU), every level at one size runs on one graph."""
    import torch._dynamo

    c = load_components(tiny_weights)
    torch._dynamo.reset()
    c.transformer.compile(backend="eager", dynamic=False)
    image = random_image(32, 32)
    settings = dict(prompt="x", width=32, height=32, seed=1, num_steps=12, condition=(32, 32))
    edit(c, image, lab_plan(c, image, **settings, acceleration="none"), transformer=direct(c))  # compiles once
    with torch._dynamo.config.patch(error_on_recompile=True):
        for level in ("go fast", "go really fast", "none", "go fast"):
            result = edit(c, image, lab_plan(c, image, **settings, acceleration=level), transformer=direct(c))
            assert torch.isfinite(result.latents).all()
    torch._dynamo.reset()


def test_settings_defaults_bound_the_first_cold_start():
    settings = Config.from_env({}).fast
    assert settings == FastPathConfig.defaults()
    # max-autotune tunes kernels for minutes on a cache-less first start; it stays an opt-in; the
    # default shape policy is the one that cannot compile during a request
    assert settings.compile == "auto" and settings.compile_mode == "default" and settings.fp8 == "auto"
    assert settings.compile_shapes == "dynamic" and settings.compile_backend == "inductor"


def test_gpu_check_is_a_clear_error_on_the_cpu(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [sys.executable, "-m", "flux.lab.gpu_check", str(tmp_path / "out")], cwd=root, capture_output=True, text=True
    )
    assert done.returncode == 2
    assert "needs a CUDA GPU" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out" / "gpu_check.json").exists()


def test_fp8_without_torchao_is_a_clear_error(monkeypatch):
    import builtins

    from flux.fast import quantize_fp8

    real_import = builtins.__import__

    def no_torchao(name, *args, **kwargs):
        if name.startswith("torchao"):
            raise ImportError("No module named 'torchao'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torchao)
    with pytest.raises(SetupError, match="FP8 needs torchao"):
        quantize_fp8(torch.nn.Linear(4, 4))


def test_gpu_check_rehearses_on_the_cpu(tmp_path):
    """The same code the H100 runs, at tiny size on the CPU: every mode, every level, the cold start."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "out"
    command = [sys.executable, "-m", "flux.lab.gpu_check", str(out), "--preset", "tiny", "--device", "cpu"]
    # dynamo with the eager backend: the same policies and guards, without minutes of C++ code generation
    env = {**os.environ, "FLUX_COMPILE_BACKEND": "eager"}
    done = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=480, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((out / "gpu_check.json").read_text())
    for mode in ("compiled", "compiled static"):
        assert (
            report["modes"][mode]["applied"]["compile_shapes"]
            == {"compiled": "dynamic", "compiled static": "static"}[mode]
        )
        unseen = report["modes"][mode]["unseen_sizes"]
        assert len(unseen) == {"compiled": 2, "compiled static": 1}[mode]
        assert all(f["first_edit_seconds"] > 0 for f in unseen.values())
    for mode in ("eager", "compiled", "compiled static"):
        levels = report["modes"][mode]["levels"]
        assert {level: figures["transformer_calls"] for level, figures in levels.items()} == {
            "none": 28, "go fast": 18, "go really fast": 13
        }  # fmt: skip
        assert all(figures["seconds_per_edit"] > 0 and figures["peak_memory_gib"] > 0 for figures in levels.values())
    fp8 = report["modes"]["compiled+fp8"]
    try:
        import torchao  # noqa: F401
    except ImportError:  # the CPU environment has no torchao: FP8 is recorded as off, the branch still ran
        assert "FP8 needs torchao" in fp8["applied"]["fp8"]
    assert fp8["applied"]["lora_branch"].startswith("rank 64 on ")
    assert set(fp8["eager_4_step_edit_seconds"]) == {"without_lora_branch", "with_lora_branch"}
    assert "error" not in fp8["lora"], fp8["lora"]
    assert fp8["lora"]["swap_seconds"] > 0 and fp8["lora"]["edit_with_two_loras_seconds"] > 0
    assert set(report["modes"]["compiled"]["references"]) == {"1_references_seconds", "3_references_seconds"}
    short = report["modes"]["compiled"]["short_schedule"]
    assert {lv: f["transformer_calls"] for lv, f in short["levels"].items()} == {
        "none": 8,
        "go fast": 6,
        "go really fast": 5,
    }
    release = report["modes"]["compiled"]["release"]
    assert release["after_release_seconds"] > 0 and release["after_edit_seconds"] > 0
    lora = report["modes"]["compiled"]["lora"]
    assert "error" not in lora, lora
    assert lora["merge_first_seconds"] > 0 and lora["edit_with_lora_seconds"] > 0 and lora["restore_seconds"] >= 0
    assert report["collector"]["objects"] > 100_000 and report["collector"]["frozen_seconds"] >= 0
    assert report["cold_start"]["rc"] == 0
    assert set(report["cold_start"]["seconds"]) == {"build_random_weights", "fast_path", "warm_up"}
    assert report["cold_start"]["applied"]["compile_shapes"] == "dynamic"


def test_gpu_check_parallel_case_rehearses_on_the_cpu_and_skips_on_one_gpu(tmp_path, monkeypatch):
    """The several-GPU case at tiny size with 2 CPU processes: per-edit seconds for 1 and 2 ranks at
    every level, eager, and for 2 ranks compiled (the eager backend here), and the output difference
    to 1 rank; on a machine with one GPU it says it skipped."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from flux.lab import gpu_check

    root = Path(__file__).resolve().parent.parent
    command = [sys.executable, "-m", "flux.lab.gpu_check", str(tmp_path), "--parallel", "--preset", "tiny",
               "--device", "cpu"]  # fmt: skip
    env = {**os.environ, "FLUX_COMPILE_BACKEND": "eager"}
    done = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=480, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((tmp_path / "parallel.json").read_text())
    assert report["ranks"] == [1, 2] and report["2"]["applied"]["context_parallel"] == "ulysses x2"
    assert "compile" not in report["2"]["applied"] and report["2 compiled"]["applied"]["compile"] == "eager"
    for level in ("none", "go fast", "go really fast"):
        for run in ("1", "2", "2 compiled"):
            assert report[run][level]["seconds_per_edit"] > 0
        for run in ("2", "2 compiled"):
            assert report[run]["difference_to_1"][level]["max_abs"] <= 1e-4
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    skipped = gpu_check.parallel_case(tmp_path, "tiny", torch.device("cuda"))
    assert skipped == {"skipped": "this machine has 1 GPU; the case needs 2 or more"}
