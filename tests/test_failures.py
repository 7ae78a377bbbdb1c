"""Bad input and failures through Predictor.predict(): a clear error every time, and the next prediction works."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import pytest
import torch
from cog import CancelationException
from cog import Path as CogPath
from PIL import Image

from flux import sizes
from flux.errors import EditError, InputError, SetupError
from flux.lab.tiny import TINY_SIDE
from flux.request import MAX_SEED, EditRequest, clean_prompt
from tests.conftest import image_bytes, random_image
from tests.test_images import png_header_only
from tests.test_predict import DEFAULTS, make_predictor


@pytest.fixture(scope="module")
def predictor(tiny_weights, tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("FLUX_OUTPUT_DIR", str(tmp_path_factory.mktemp("outputs")))
    p = make_predictor(tiny_weights, mp)
    yield p
    mp.undo()


@pytest.fixture
def write(tmp_path):
    def _write(data: bytes, name: str = "in.png") -> CogPath:
        path = tmp_path / name
        path.write_bytes(data)
        return CogPath(path)

    return _write


def predict(predictor, image, prompt="make it red", **kw):
    return predictor.predict(prompt=prompt, input_image=image, **{**DEFAULTS, **kw})


def assert_next_prediction_works(predictor, write):
    out = predict(predictor, write(image_bytes(random_image(64, 48)), "ok.png"))
    with Image.open(out) as image:
        assert image.size[0] % 16 == 0


def outputs_dir(predictor) -> list:
    return sorted(p.name for p in predictor.outputs.iterdir())


@pytest.mark.parametrize(
    "data,message",
    [
        (b"this is a text file", "not a readable image"),
        (image_bytes(random_image(64, 64))[:300], "truncated or corrupt"),
        (b"", "empty"),
        (image_bytes(random_image(16, 16), "BMP"), "not supported"),
        (png_header_only(30000, 30000), "too large|megapixels"),
    ],
)
def test_bad_images(predictor, write, data, message):
    before = outputs_dir(predictor)
    with pytest.raises(InputError, match=message):
        predict(predictor, write(data))
    assert outputs_dir(predictor) == before  # never a half-written output
    assert_next_prediction_works(predictor, write)


@pytest.mark.parametrize(
    "image,fmt",
    [
        (Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"),
        (Image.new("RGB", (8, 8), (9, 9, 9)), "PNG"),
        (random_image(4000, 100), "PNG"),
        (random_image(64, 64, mode="RGBA"), "PNG"),
        (random_image(64, 64).convert("LA"), "PNG"),
        (random_image(64, 64).convert("CMYK"), "JPEG"),
        (random_image(64, 64).convert("L"), "PNG"),
        (random_image(64, 64).convert("P"), "GIF"),
        (random_image(64, 64), "WEBP"),
    ],
)
def test_images_of_every_kind_are_edited(predictor, write, image, fmt):
    out = predict(predictor, write(image_bytes(image, fmt), f"in.{fmt.lower()}"))
    with Image.open(out) as result:
        assert result.mode == "RGB"
        assert result.size[0] % 16 == 0 and result.size[1] % 16 == 0


def test_huge_jpeg_is_handled(predictor, write):
    out = predict(predictor, write(image_bytes(Image.new("RGB", (6000, 4000), (90, 30, 20)), "JPEG"), "big.jpg"))
    with Image.open(out) as result:
        width, height = result.size
        assert result.size == sizes.output_size("match_input_image", 6000, 4000, TINY_SIDE)
        assert abs(width / height - 1.5) < 16 / height  # the input's shape, to the 16-pixel grid


def test_animated_webp_uses_first_frame(predictor, write, caplog):
    frames = [Image.new("RGB", (32, 32), c) for c in [(255, 0, 0), (0, 0, 255)]]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="WEBP", save_all=True, append_images=frames[1:])
    with caplog.at_level("WARNING"):
        predict(predictor, write(buffer.getvalue(), "anim.webp"))
    assert "is animated (2 frames): using the first" in caplog.text


@pytest.mark.parametrize("prompt", ["", "   \n\t ", "\x00", "\x00\x07\x1b\x7f\x9b"])
def test_empty_prompt(predictor, write, prompt):
    with pytest.raises(InputError, match="prompt is empty"):
        predict(predictor, write(image_bytes(random_image(32, 32))), prompt=prompt)


def test_long_prompt_is_truncated_with_a_warning(predictor, write, caplog):
    with caplog.at_level("WARNING"):
        predict(predictor, write(image_bytes(random_image(32, 32))), prompt="make the circle red " * 200)
    assert "only the first 512 are used" in caplog.text


def test_non_ascii_and_emoji_prompts(predictor, write):
    predict(predictor, write(image_bytes(random_image(32, 32))), prompt="Mach den Kreis rot ✨🎨 — 把圆圈变红")


def _inject(predictor, exception_factory, at_call: int = 2):
    calls = []

    def hook(module, args, kwargs):
        calls.append(1)
        if len(calls) == at_call:
            raise exception_factory()

    return calls, predictor.model.components.transformer.register_forward_pre_hook(hook, with_kwargs=True)


def test_nan_gives_a_clear_error(predictor, write):
    transformer = predictor.model.components.transformer
    handle = transformer.register_forward_hook(lambda m, a, out: (out[0] * float("nan"),))
    try:
        with pytest.raises(EditError, match="NaN or infinite"):
            predict(predictor, write(image_bytes(random_image(32, 32))))
    finally:
        handle.remove()
    assert_next_prediction_works(predictor, write)


def test_out_of_memory_is_reported_and_recovered(predictor, write):
    calls, handle = _inject(predictor, lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20 GiB"))
    try:
        with pytest.raises(EditError, match="out of GPU memory"):
            predict(predictor, write(image_bytes(random_image(32, 32))))
    finally:
        handle.remove()
    assert_next_prediction_works(predictor, write)


def test_cancellation_stops_within_one_step(predictor, write):
    calls, handle = _inject(predictor, lambda: CancelationException(), at_call=3)
    try:
        with pytest.raises(CancelationException):
            predict(predictor, write(image_bytes(random_image(32, 32))), num_inference_steps=28)
    finally:
        handle.remove()
    assert len(calls) == 3  # no transformer call after the cancel
    assert_next_prediction_works(predictor, write)


def test_unwritable_output_folder(predictor, write, tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    monkeypatch.setattr(predictor, "outputs", locked)
    monkeypatch.setattr("flux.images.tempfile.mkstemp", _read_only_fs)
    with pytest.raises(EditError, match="could not be written"):
        predict(predictor, write(image_bytes(random_image(32, 32))))
    assert list(locked.iterdir()) == []


def _read_only_fs(*args, **kwargs):
    raise OSError(30, os.strerror(30))


def test_weights_removed_after_setup(tiny_weights, tmp_path, write, monkeypatch):
    tree = tmp_path / "weights"
    shutil.copytree(tiny_weights, tree)
    monkeypatch.setenv("FLUX_OUTPUT_DIR", str(tmp_path / "out"))
    predictor = make_predictor(tree, monkeypatch)
    (tree / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    assert_next_prediction_works(predictor, write)  # the model is in memory
    with pytest.raises(SetupError, match="missing: vae/diffusion_pytorch_model.safetensors"):
        make_predictor(tree, monkeypatch)


def test_control_characters_are_removed_before_encoding():
    assert clean_prompt("make\x00 it\tred\n") == "make it red"
    assert clean_prompt("  \x1b[31mred\x7f ") == "[31mred"
    assert clean_prompt("café ☕ 赤く") == "café ☕ 赤く"
    assert EditRequest("a\x00b", b"not decoded yet").prompt == "ab"


def test_a_prompt_with_control_characters_edits_as_its_clean_text(predictor, write):
    image = write(image_bytes(random_image(32, 32)))
    dirty = predict(predictor, image, prompt="\x00make it\x07 red\x1b", seed=4, output_format="png")
    clean = predict(predictor, image, prompt="make it red", seed=4, output_format="png")
    assert Path(dirty).read_bytes() == Path(clean).read_bytes()


@pytest.mark.parametrize("seed", [-2, MAX_SEED + 1, 2**63])
def test_seeds_outside_the_range_are_refused_before_anything_runs(predictor, write, seed):
    with pytest.raises(InputError, match=f"seed must be between 0 and {MAX_SEED}"):
        predict(predictor, write(image_bytes(random_image(32, 32))), seed=seed)
