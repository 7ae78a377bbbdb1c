"""The command line, end to end on the tiny model."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from flux import sizes
from flux.device import pick_device
from flux.errors import SetupError
from flux.lab.tiny import TINY_SIDE
from tests.conftest import image_bytes, random_image


def run_cli(*args, cwd=None, env=None):
    return subprocess.run(
        [sys.executable, "-m", "flux", *args], capture_output=True, text=True, timeout=300, cwd=cwd, env=env
    )


def test_edit_writes_an_image_and_reports_phases(tiny_weights, tmp_path):
    source = tmp_path / "in.png"
    source.write_bytes(image_bytes(random_image(200, 100)))
    out = tmp_path / "out.png"
    result = run_cli(
        "edit", "--weights", str(tiny_weights), "--image", str(source), "--prompt", "make it red",
        "--out", str(out), "--steps", "6", "--seed", "3", "--acceleration", "go really fast",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    for phase in ("load:", "encode:", "denoise:", "decode:"):
        assert phase in result.stderr
    assert "denoise: 100%" in result.stderr or "6/6" in result.stderr
    with Image.open(out) as image:
        assert image.size == sizes.output_size("match_input_image", 200, 100, TINY_SIDE)


def test_bad_image_gives_a_clear_error(tiny_weights, tmp_path):
    source = tmp_path / "in.png"
    source.write_bytes(b"not an image")
    result = run_cli(
        "edit", "--weights", str(tiny_weights), "--image", str(source), "--prompt", "x", "--out", str(tmp_path / "o.png")
    )  # fmt: skip
    assert result.returncode == 2
    assert f"error: --image {source} is not a readable image" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "o.png").exists()


def test_seed_outside_the_range_is_refused(tiny_weights, tmp_path):
    source = tmp_path / "in.png"
    source.write_bytes(image_bytes(random_image(32, 32)))
    result = run_cli(
        "edit", "--weights", str(tiny_weights), "--image", str(source), "--prompt", "x",
        "--out", str(tmp_path / "o.png"), "--seed", str(2**32),
    )  # fmt: skip
    assert result.returncode == 2
    assert "error: --seed must be between 0 and 4294967295" in result.stderr and "Traceback" not in result.stderr


def test_pick_device_refuses_a_device_this_machine_cannot_use():
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    with pytest.raises(SetupError, match="asks for CUDA, but this machine has no CUDA device"):
        pick_device("cuda")
    assert pick_device("cpu") == torch.device("cpu") == pick_device(None)


def test_an_unusable_device_is_a_clear_error_on_the_command_line(tiny_weights, tmp_path):
    source = tmp_path / "in.png"
    source.write_bytes(image_bytes(random_image(32, 32)))
    result = run_cli(
        "edit", "--weights", str(tiny_weights), "--image", str(source), "--prompt", "x",
        "--out", str(tmp_path / "o.png"), env={**os.environ, "FLUX_DEVICE": "banana"},
    )  # fmt: skip
    assert result.returncode == 2
    assert "error: FLUX_DEVICE='banana' is not valid: it accepts cpu, cuda or cuda:N" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "o.png").exists()


def test_lora_on_the_command_line(tiny_weights, tmp_path, monkeypatch):
    from flux.lab.loras import make_lora, write_lora
    from flux.loading import load_components

    transformer = load_components(tiny_weights).transformer
    lora_file = write_lora(tmp_path / "site" / "style.safetensors", make_lora(transformer, "peft", seed=4))
    source = tmp_path / "in.png"
    source.write_bytes(image_bytes(random_image(64, 48)))
    outputs = {}
    from tests.weights_server import serve_tree

    with serve_tree(lora_file.parent) as (url, _):
        for name, extra in [("base", []), ("lora", ["--lora", f"{url}/style.safetensors", "--lora-strength", "0.8"])]:
            out = tmp_path / f"{name}.png"
            result = run_cli(
                "edit", "--weights", str(tiny_weights), "--image", str(source), "--prompt", "x", "--out", str(out),
                "--steps", "4", "--seed", "2", *extra, env={**os.environ, "FLUX_LORA_CACHE": str(tmp_path / "cache")},
            )  # fmt: skip
            assert result.returncode == 0, result.stderr
            outputs[name] = out.read_bytes()
    assert outputs["base"] != outputs["lora"]
    assert "lora_weights http://127.0.0.1" in result.stderr and "strength 0.8" in result.stderr


@pytest.mark.parametrize(
    "change,message",
    [
        ({"--image": "missing.png"}, "error: --image {tmp}/missing.png: No such file or directory"),
        ({"--steps": "3"}, "error: --steps must be between 4 and 50; got 3"),
        ({"--guidance": "20"}, "error: --guidance must be between 0 and 10; got 20"),
        ({"--prompt": " \x07 "}, "error: --prompt is empty"),
        ({"--quality": "150"}, "error: --quality must be between 0 and 100; got 150"),
        ({"--out": "out.tif"}, "error: --out {tmp}/out.tif: the extension picks the format: .png, .jpg, .jpeg or .webp; got .tif"),
        ({"--out": "in.png/sub/out.png"}, "error: --out {tmp}/in.png/sub/out.png: {tmp}/in.png is a file, not a folder"),
    ],
)  # fmt: skip
def test_the_command_line_checks_everything_before_it_loads_anything(tmp_path, change, message):
    """Weights that could never load (an empty folder): each mistake is reported, naming its flag,
    before the loading that would have failed, and no output is written."""
    (tmp_path / "in.png").write_bytes(image_bytes(random_image(32, 32)))
    (tmp_path / "no-weights").mkdir()
    flags = {"--image": "in.png", "--prompt": "make it red", "--out": "out.png", **change}
    args = [
        part
        for flag, value in flags.items()
        for part in (flag, str(tmp_path / value) if flag in ("--image", "--out") else value)
    ]
    result = run_cli("edit", "--weights", str(tmp_path / "no-weights"), *args)
    assert result.returncode == 2, result.stderr
    assert message.format(tmp=tmp_path) in result.stderr, result.stderr
    assert "incomplete" not in result.stderr and "Traceback" not in result.stderr  # the weights were never reached
    assert not list(tmp_path.rglob("out.*"))


def test_an_incomplete_weights_folder_is_listed_not_replaced_by_the_proxy(tiny_weights, tmp_path):
    """A download cut short: the command line names what is missing and how to fetch it, and offers
    the proxy (--proxy) rather than running it unasked."""
    import shutil

    partial = tmp_path / "weights"
    shutil.copytree(tiny_weights, partial)
    (partial / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    (tmp_path / "in.png").write_bytes(image_bytes(random_image(32, 32)))
    command = ["edit", "--image", str(tmp_path / "in.png"), "--prompt", "x", "--out", str(tmp_path / "o.png")]
    env = {k: v for k, v in os.environ.items() if k not in ("WEIGHTS_BASE_URL", "HF_TOKEN")}
    result = run_cli(*command, env={**env, "WEIGHTS_DIR": str(partial)})
    assert result.returncode == 2
    assert (
        f"error: the weights in {partial} are incomplete:\n  missing: vae/diffusion_pytorch_model.safetensors"
        in result.stderr
    )
    assert "python -m flux download --out" in result.stderr and "add --proxy" in result.stderr
    assert "PROXY" not in result.stderr and not (tmp_path / "o.png").exists()
    result = run_cli(*command, "--proxy", "--steps", "4", env={**env, "WEIGHTS_DIR": str(partial)})
    assert result.returncode == 0, result.stderr
    assert "running the small PROXY model" in result.stderr and "make the circle red" in result.stderr
    with Image.open(tmp_path / "o.png") as image:
        assert image.format == "PNG"


def test_keep_unedited_on_the_command_line(tmp_path):
    """The proxy recolours the circle of a scene at 640x480: the file written is the input's size,
    the circle changed, and away from the shapes every pixel is the input's."""
    import numpy as np

    from flux.lab import keep
    from flux.lab.scenes import make_scene

    scene = make_scene(np.random.default_rng(11))
    picture = keep.upscaled(scene.image, (640, 480))
    source = tmp_path / "in.png"
    source.write_bytes(image_bytes(Image.fromarray(picture)))
    out = tmp_path / "out.png"
    base = ["edit", "--proxy", "--image", str(source), "--prompt", "make the circle red", "--out", str(out)]
    result = run_cli(*base, "--keep-unedited", "--aspect-ratio", "16:9")
    assert result.returncode == 2 and "error: --keep-unedited needs aspect_ratio match_input_image" in result.stderr
    result = run_cli(*base, "--keep-unedited", "--seed", "1", "--no-safety-checker")
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stdout and "(640x480)" in result.stdout
    kept = np.asarray(Image.open(out).convert("RGB"))
    far = ~(keep.upscaled(keep.near(scene.circle | scene.square, 0.2).astype(np.uint8) * 255, (640, 480)) > 0)
    circle = keep.upscaled(scene.circle.astype(np.uint8) * 255, (640, 480)) > 0
    assert far.mean() > 0.3 and np.array_equal(kept[far], picture[far])
    assert np.abs(kept[circle].astype(int) - picture[circle]).mean() > 20
