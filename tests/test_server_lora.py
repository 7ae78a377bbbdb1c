"""LoRA through the real Cog HTTP server: LoRA files in three layouts served from 127.0.0.1."""

from __future__ import annotations

import pytest

from flux.lab.loras import make_lora, write_lora
from flux.loading import load_components
from tests.cog_server import cog_server, data_uri, decode_output
from tests.conftest import image_bytes, random_image
from tests.test_lora import _tar
from tests.weights_server import serve_tree


@pytest.fixture(scope="module")
def site(tiny_weights, tmp_path_factory):
    """LoRA files for the tiny model: peft, kohya (in a Replicate-style .tar), an SDXL one, a corrupt one."""
    root = tmp_path_factory.mktemp("lora-site")
    transformer = load_components(tiny_weights).transformer
    write_lora(root / "peft.safetensors", make_lora(transformer, "peft", rank=4, seed=1))
    write_lora(root / "kohya.safetensors", make_lora(transformer, "kohya", rank=8, seed=2))
    _tar(root / "trained_model.tar", {"output/lora.safetensors": (root / "kohya.safetensors").read_bytes()})
    import torch

    sdxl = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.ones(4, 320),
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.ones(320, 4)}  # fmt: skip
    write_lora(root / "sdxl.safetensors", sdxl)
    (root / "corrupt.safetensors").write_bytes(b"\x00" * 64)
    (root / "lora.ckpt").write_bytes(b"pickle")
    with serve_tree(root) as (url, log):
        yield url, log


@pytest.fixture(scope="module")
def server(tiny_weights, tmp_path_factory, site):
    work = tmp_path_factory.mktemp("lora-server")
    allowed = site[0].removeprefix("http://")  # the LoRA site's loopback port, and no other
    with cog_server(tiny_weights, work, env={"FLUX_LORA_CACHE": str(work / "loras"), "FLUX_FETCH_ALLOW": allowed}) as s:
        yield s


def _edit(server, **inputs):
    png = data_uri(image_bytes(random_image(160, 120, seed=9)))
    status, body = server.predict(
        prompt="make it red", input_image=png, num_inference_steps=4, seed=3, output_format="png", **inputs
    )
    assert status == 200, body
    return body


def test_loras_change_the_output_restore_exactly_and_download_once(server, site):
    url, log = site
    base = decode_output(_edit(server)["output"])
    first = _edit(server, lora_weights=f"{url}/peft.safetensors")
    assert first["status"] == "succeeded", first
    assert decode_output(first["output"]) != base
    used = first["metrics"]["loras"]
    assert used[0]["source"] == f"{url}/peft.safetensors" and used[0]["downloaded"] is True
    assert {"lora_fetch", "lora_load", "lora_merge"} <= set(first["metrics"]["seconds"])
    downloads = len(log.requests)
    again = _edit(server, lora_weights=f"{url}/peft.safetensors")
    assert again["metrics"]["loras"][0]["downloaded"] is False and len(log.requests) == downloads
    assert decode_output(again["output"]) == decode_output(first["output"])
    zero = _edit(server, lora_weights=f"{url}/peft.safetensors", lora_strength=0.0)
    assert decode_output(zero["output"]) == base
    tar = _edit(server, lora_weights=f"{url}/trained_model.tar", lora_strength=0.7)
    assert tar["status"] == "succeeded" and decode_output(tar["output"]) not in (base, decode_output(first["output"]))
    both = _edit(server, lora_weights=f"{url}/peft.safetensors", extra_lora_weights=f"{url}/kohya.safetensors",
                 extra_lora_strength=-0.5)  # fmt: skip
    assert both["status"] == "succeeded" and len(both["metrics"]["loras"]) == 2
    assert decode_output(_edit(server)["output"]) == base  # after any number of LoRA requests


@pytest.mark.parametrize(
    "name,message",
    [
        ("lora.ckpt", "pickle file"),
        ("missing.safetensors", "could not fetch the LoRA"),
        ("sdxl.safetensors", "FLUX.1 (not SDXL"),
        ("corrupt.safetensors", "not a valid .safetensors file"),
    ],
)
def test_bad_loras_fail_clearly_and_the_server_keeps_serving(server, site, name, message):
    url, _ = site
    body = _edit(server, lora_weights=f"{url}/{name}")
    assert body["status"] == "failed" and message in body["error"] and "Traceback" not in body["error"]
    assert body["error"].split("Invalid input: ", 1)[1].startswith("lora_weights")
    assert _edit(server)["status"] == "succeeded"


def test_strength_out_of_range_is_422(server, site):
    url, _ = site
    png = data_uri(image_bytes(random_image(32, 32)))
    status, body = server.predict(prompt="x", input_image=png, lora_weights=f"{url}/peft.safetensors", lora_strength=9)
    assert status == 422 and "lora_strength" in str(body)
