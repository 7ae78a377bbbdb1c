"""keep_unedited: the original at its own size with only what the edit changed replaced; found
robustly from the edit itself; refused where the frames do not correspond; the same edit as
before without it."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from flux.composite import changed_alpha, keep_unedited
from flux.errors import InputError
from flux.lab import keep
from flux.lab.scenes import EDITS, make_scene
from flux.request import EditRequest
from tests.conftest import image_bytes


@pytest.fixture(scope="module")
def proxy():
    return keep.proxy_model()


@pytest.mark.parametrize("disturbance", keep.DISTURBANCES)
def test_what_a_model_does_to_untouched_areas_is_not_taken_as_an_edit(disturbance):
    """Synthetic outputs: a recoloured disk, plus noise at the VAE's level, a shift of 1 to 3 pixels
    and a colour shift of the whole frame: the region found covers the disk and nothing of the
    frame beyond a tenth of the shorter side around it."""
    for case in range(3):
        picture = keep.photo(512, 384, seed=case)
        edited, region = keep.synthetic_case(picture, disturbance, seed=100 + case)
        alpha = changed_alpha(picture, edited)
        assert (alpha[region] > 0.5).mean() > 0.97
        assert not (alpha[~keep.near(region, 0.1)] > 0).any()
        iou = ((alpha > 0.5) & region).sum() / ((alpha > 0.5) | region).sum()
        assert iou > 0.5


def test_outside_the_region_the_original_pixels_come_back_exactly_at_its_own_size():
    picture = keep.photo(1200, 900, seed=3)
    small = np.asarray(Image.fromarray(picture).resize((400, 304), Image.Resampling.LANCZOS)).copy()
    small[100:160, 150:230] = (220, 30, 30)
    result, kept = keep_unedited(Image.fromarray(picture), Image.fromarray(small))
    out = np.asarray(result)
    assert result.size == (1200, 900) and not kept.whole and 0 < kept.changed_share < 0.2
    changed = (out != picture).any(axis=2)
    rows, columns = np.nonzero(changed)
    assert rows.min() > 200 and rows.max() < 570 and columns.min() > 370 and columns.max() < 770  # around the box
    assert np.abs(out[330:450, 480:660].astype(int) - (220, 30, 30)).max() <= 2  # the edit, inside


def test_an_edit_of_most_of_the_frame_comes_back_whole_without_a_seam():
    picture = keep.photo(900, 600, seed=4)
    small = Image.fromarray(255 - np.asarray(Image.fromarray(picture).resize((384, 256), Image.Resampling.LANCZOS)))
    result, kept = keep_unedited(Image.fromarray(picture), small)
    assert kept.whole and kept.changed_share > 0.9
    assert np.array_equal(np.asarray(result), np.asarray(small.resize((900, 600), Image.Resampling.LANCZOS)))


def _edit(proxy, image: np.ndarray, prompt: str, seed: int, **options):
    from flux.pipeline import run_edit

    return run_edit(proxy, EditRequest(prompt, image_bytes(Image.fromarray(image)), seed=seed, check_safety=False,
                                       **options))  # fmt: skip


@pytest.mark.parametrize("size", keep.SIZES)
@pytest.mark.parametrize("prompt", keep.LOCAL)
def test_a_local_edit_changes_the_shape_and_leaves_the_background_exact(proxy, size, prompt):
    """The proxy's recolours of upscaled scenes: the output has the input's size; beyond a fifth of
    the shorter side from the shapes, every pixel is the input's; the edited shape is closer to the
    target than the input was, as much as in the plain edit."""
    rng = np.random.default_rng(40 + size[0])
    for seed in range(2):
        scene = make_scene(rng)
        image, target = keep.upscaled(scene.image, size), keep.upscaled(EDITS[prompt](scene), size)
        plain, kept, report = keep.edit_both_ways(proxy, image, prompt, seed)
        assert kept.shape == image.shape and not report["whole_edit"]
        background = ~keep.near(keep.upscaled((scene.circle | scene.square).astype(np.uint8) * 255, size) > 0, 0.2)
        assert np.array_equal(kept[background], image[background])
        edited = (target != image).any(axis=2)
        assert keep.psnr(kept, target, edited) > keep.psnr(image, target, edited) + 6
        assert keep.psnr(kept, target, edited) > keep.psnr(plain, target, edited) - 0.5


@pytest.mark.parametrize("prompt", ["invert the colours", "flip the image horizontally"])
def test_a_global_edit_is_as_good_as_the_plain_edit(proxy, prompt):
    rng = np.random.default_rng(9)
    for seed in range(2):
        scene = make_scene(rng)
        image, target = keep.upscaled(scene.image, (640, 640)), keep.upscaled(EDITS[prompt](scene), (640, 640))
        plain, kept, report = keep.edit_both_ways(proxy, image, prompt, seed)
        if prompt == "invert the colours":
            assert report["whole_edit"] and np.array_equal(kept, plain)
        assert keep.psnr(kept, target) > keep.psnr(plain, target) - 0.5


def test_a_chain_of_five_edits_leaves_the_untouched_area_bit_identical(proxy):
    rows = keep.chain(proxy, steps=5, chains=1, seed=3)  # the circle red five times, the square blue five times
    assert all(r["identical_with"] for r in rows)
    assert rows[-1]["untouched_psnr_without"] < 100 and rows[-1]["untouched_psnr_with"] == 100


@pytest.mark.parametrize(
    "options,message",
    [
        ({"aspect_ratio": "16:9"}, "keep_unedited needs aspect_ratio match_input_image: with 16:9"),
        ({"references": (b"x",), "multi_image_mode": "stitch"}, "keep_unedited cannot be used with reference_images in stitch mode"),
    ],
)  # fmt: skip
def test_frames_that_do_not_correspond_are_refused_before_anything_is_decoded(options, message):
    with pytest.raises(InputError, match=message) as info:
        EditRequest("x", b"not decoded", keep_unedited=True, **options)
    assert info.value.field == "keep_unedited"


def test_an_input_beyond_21_to_9_is_refused(proxy):
    with pytest.raises(InputError, match="4000x100 input: it is wider or taller than 21:9"):
        _edit(proxy, np.zeros((100, 4000, 3), np.uint8), "make the circle red", 0, keep_unedited=True)


def test_the_photo_is_read_as_its_exif_says_and_decoded_at_full_size(proxy):
    """A large JPEG turned by EXIF: the result has the turned size, every pixel (no reduced decode)."""
    scene = make_scene(np.random.default_rng(5))
    image = Image.fromarray(keep.upscaled(scene.image, (2400, 1800)))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees when read
    data = image_bytes(image, "JPEG", exif=exif, quality=95)
    from flux.pipeline import run_edit

    result = run_edit(proxy, EditRequest("make the circle red", data, seed=0, check_safety=False, keep_unedited=True))
    assert result.image.size == (1800, 2400)


def test_without_the_option_nothing_of_it_runs(proxy, monkeypatch):
    import flux.pipeline

    monkeypatch.setattr(flux.pipeline, "keep_unedited", lambda *a: pytest.fail("composited without the option"))
    image = keep.upscaled(make_scene(np.random.default_rng(2)).image, (640, 640))
    result = _edit(proxy, image, "make the circle red", 1)
    assert result.image.size == (64, 64) and result.report.keep_unedited is None


def test_over_http(tiny_weights, tmp_path):
    """keep_unedited returns an image of the input's size and reports its region; with 16:9 it is
    refused saying why; without it, the output is the same bytes as with it off."""
    from tests.cog_server import cog_server, data_uri, decode_output

    uri = data_uri(image_bytes(Image.fromarray(keep.photo(900, 600, seed=2))))
    with cog_server(tiny_weights, tmp_path) as server:
        status, body = server.predict(prompt="x", input_image=uri, num_inference_steps=4, seed=3, output_format="png",
                                      keep_unedited=True)  # fmt: skip
        assert body["status"] == "succeeded", body
        assert Image.open(io.BytesIO(decode_output(body["output"]))).size == (900, 600)
        assert set(body["metrics"]["keep_unedited"]) == {"changed_share", "whole_edit"}
        status, body = server.predict(prompt="x", input_image=uri, keep_unedited=True, aspect_ratio="16:9")
        assert body["status"] == "failed" and body["error"] == (
            "Prediction failed: Prediction failed: Invalid input: keep_unedited needs aspect_ratio match_input_image: "
            "with 16:9 the output is another frame than the photo's, so no part of it lies over the original"
        )
        outputs = []
        for options in ({}, {"keep_unedited": False}):
            status, body = server.predict(prompt="x", input_image=uri, num_inference_steps=4, seed=3,
                                          output_format="png", **options)  # fmt: skip
            outputs.append(decode_output(body["output"]))
        assert outputs[0] == outputs[1] and Image.open(io.BytesIO(outputs[0])).size != (900, 600)


@pytest.mark.parametrize("turn", ["flip h", "flip v", "half turn"])
def test_on_a_photograph_a_flip_comes_back_whole(turn):
    picture = keep.photo(1200, 900, seed=2)
    small = np.asarray(Image.fromarray(picture).resize((1184, 880), Image.Resampling.LANCZOS))
    turned = {"flip h": small[:, ::-1], "flip v": small[::-1], "half turn": small[::-1, ::-1]}[turn]
    result, kept = keep_unedited(Image.fromarray(picture), Image.fromarray(np.ascontiguousarray(turned)))
    assert kept.whole and kept.changed_share > 0.8 and result.size == (1200, 900)
