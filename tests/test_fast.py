"""The GPU fast path: off on the CPU; and the TaylorSeer forecast never recompiles a compiled transformer."""

from __future__ import annotations

import torch

from flux.edit import EditSettings, edit
from flux.fast import FastSettings, optimize
from flux.loading import load_components
from tests.conftest import random_image


def test_everything_is_off_on_the_cpu(tiny_weights):
    c = load_components(tiny_weights)
    before = {k: v.clone() for k, v in c.transformer.state_dict().items()}
    forward = c.transformer.forward
    assert optimize(c, FastSettings(compile=True, fp8="on", attention="auto")) == {}
    assert c.transformer._compiled_call_impl is None
    assert c.transformer.forward == forward
    assert all(torch.equal(before[k], v) for k, v in c.transformer.state_dict().items())
    conv = c.vae.decoder.conv_in.weight
    assert conv.is_contiguous()


def test_settings_from_env(monkeypatch):
    monkeypatch.setenv("FLUX_COMPILE", "0")
    monkeypatch.setenv("FLUX_FP8", "off")
    monkeypatch.setenv("FLUX_WARM_SIZES", "1024x1024, 1392x752")
    settings = FastSettings.from_env()
    assert settings.compile is False and settings.fp8 == "off"
    assert settings.warm_sizes == [(1024, 1024), (1392, 752)]


def test_forecasts_never_recompile_the_compiled_transformer(tiny_weights, monkeypatch):
    """Compiled (dynamo, eager backend on the CPU), every level at one size runs on one graph."""
    import torch._dynamo

    c = load_components(tiny_weights)
    torch._dynamo.reset()
    c.transformer.compile(backend="eager", dynamic=False)
    image = random_image(32, 32)
    settings = dict(prompt="x", width=32, height=32, seed=1, num_steps=12, condition_size=(32, 32))
    edit(c, image, EditSettings(**settings, acceleration="none"))  # compiles once
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    for level in ("go fast", "go really fast", "none", "go fast"):
        result = edit(c, image, EditSettings(**settings, acceleration=level))
        assert torch.isfinite(result.latents).all()
    torch._dynamo.reset()
