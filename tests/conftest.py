"""Shared fixtures: the tiny model is generated once per test session."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from flux.lab.tiny import make_tiny_weights
from flux.loading import load_components


@pytest.fixture(autouse=True)
def allow_loopback_servers(monkeypatch):
    """The tests' HTTP servers listen on 127.0.0.1, which the outbound address rule refuses by
    default: every test allows it explicitly here; the tests of the rule itself take it away."""
    monkeypatch.setenv("FLUX_FETCH_ALLOW", "127.0.0.1")


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory):
    return make_tiny_weights(tmp_path_factory.mktemp("tiny") / "weights")


@pytest.fixture(scope="session")
def flagging_weights(tmp_path_factory):
    """Tiny weights whose safety checker flags every image."""
    return make_tiny_weights(tmp_path_factory.mktemp("tiny-flag") / "weights", safety="flag")


@pytest.fixture(scope="session")
def components(tiny_weights):
    return load_components(tiny_weights)


def lora_store():
    """Where LoRAs come from, as the environment configures it at this moment (a test's own cache,
    endpoints, limits and address rule, set with monkeypatch.setenv)."""
    from flux.config import Config
    from flux.lora_sources import LoraStore

    return LoraStore.from_config(Config.from_env())


def fetch_policy():
    """The address rule as the environment configures it now (FLUX_FETCH_ALLOW)."""
    from flux.config import Config

    return Config.from_env().fetch_policy


def model_of(components, config=None):
    """A pipeline Model around loaded components: one device, no safety checker, the configuration
    as the environment has it (a test's own LoRA cache and fetch rules)."""
    from flux.config import Config
    from flux.lora_sources import LoraStore
    from flux.pipeline import Model
    from flux.runtime import LocalRuntime

    config = config or Config.from_env()
    return Model(config, components, LocalRuntime(components.transformer), None, LoraStore.from_config(config))


def random_image(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    channels = {"RGB": 3, "RGBA": 4}.get(mode, 3)
    array = np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(array, mode if channels == 4 else "RGB")


def image_bytes(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()
