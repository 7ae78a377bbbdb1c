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


def random_image(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    channels = {"RGB": 3, "RGBA": 4}.get(mode, 3)
    array = np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(array, mode if channels == 4 else "RGB")


def image_bytes(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()
