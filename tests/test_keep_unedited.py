"""keep_unedited: the original at its own size with only what the edit changed replaced; found
robustly from the edit itself; refused where the frames do not correspond; the same edit as
before without it."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from flux.composite import compose, find_changes, keep_unedited
from flux.errors import InputError
from flux.lab import keep, photos
from flux.lab.scenes import EDITS, make_scene
from flux.request import EditRequest
from tests.conftest import image_bytes


@pytest.fixture(scope="module")
def proxy():
    return keep.proxy_model()


# --- real photographs, the model's regeneration simulated (flux/lab/photos.py) --------------------

PHOTO_CASES = photos.cases(
    photos=("astronaut", "rocket"),
    regenerations=("texture", "tone", "shift 8 px", "scale 1%", "all, strong"),
    edits=("none", "brighten +20", "tint (red +28, blue -28)", "pasted object"),
)


def _photo_case(photo: str, edit: str, regeneration: photos.Regeneration, seed: int = 5) -> photos.Case:
    """A case with a regeneration of the test's own (the named ones are in photos.REGENERATIONS)."""
    photos.REGENERATIONS["the test's"] = regeneration
    try:
        return photos.case(photo, edit, "the test's", seed)
    finally:
        del photos.REGENERATIONS["the test's"]


def test_on_real_photographs_no_edit_is_lost_and_the_background_is_the_photos():
    """Two photographs, five regenerations of the untouched area (redrawn texture, a tone curve with
    mixed channels, an 8-pixel shift, a 1% scale, all at once: 25-29 dB after alignment), four
    edits: every edit comes back with at least 80% of its visibly changed pixels (95% in at least
    9 of 10), at most 1 in 10 whole; where composited, the background beyond 1/16 of the shorter
    side from the edit is the photo's own pixels in at least 99.9% of them; no edit: the photo."""
    rows = photos.evaluate(photos.product_finder, PHOTO_CASES)
    edited = [r for r in rows if "recall" in r]
    assert all(r["recall"] >= 0.8 for r in edited), [r for r in edited if r["recall"] < 0.8]
    assert sum(r["recall"] >= 0.95 for r in edited) >= 0.9 * len(edited)
    assert sum(r["whole"] for r in edited) <= 0.1 * len(edited)
    composited = [r for r in edited if not r["whole"]]
    assert all(r["background_exact"] >= 0.999 for r in composited), [
        r for r in composited if r["background_exact"] < 0.999
    ]
    assert all(r["input_back"] for r in rows if "input_back" in r)


def test_the_edit_lands_in_the_photos_geometry():
    """The model drew the frame 8 pixels left and 5.5 down, 1% larger: the pasted object comes
    back where it belongs in the photo (at least 28 dB against it there), and the metrics say
    what the model did, in the photo's pixels."""
    c = _photo_case("coffee", "pasted object", photos.Regeneration(shift=(-8.0, 5.5), scale=1.01))
    found = find_changes(c.original, c.output)
    result, kept = compose(Image.fromarray(c.original), Image.fromarray(c.output), found)
    row = photos.measure(c, photos.Outcome(np.asarray(result), found.alpha.numpy(), kept.whole))
    assert not kept.whole and row["placement_psnr"] > 28 and row["recall"] > 0.95
    assert abs(kept.shift[0] + 8) < 0.2 and abs(kept.shift[1] - 5.5) < 0.2
    assert abs(kept.scale[0] - 1.01) < 1e-3 and abs(kept.scale[1] - 1.01) < 1e-3


def test_what_the_model_did_to_the_colours_is_taken_out_inside_the_edit_too():
    """A tone curve, a saturation change, mixed channels and an offset across the frame: nothing
    but the edit is taken, and the edit is brought into the photo's colours, so its border shows
    no colour step (under a level on average, where the output itself differs by several)."""
    how = photos.Regeneration(tone=0.08, saturation=0.08, mix=0.03, offset=4.0)
    for seed in range(3):
        c = _photo_case("chelsea", "brighten +40", how, seed)
        row = photos.measure(c, photos.product_finder(c.original, c.output))
        assert not row["whole"] and row["recall"] > 0.95 and row["background_exact"] == 1.0
        assert row["seam_step"] < 1.0 < 4 < row["seam_step_output"], row
        untouched = photos.regenerate(c.original.astype(float), how, np.random.default_rng(seed))
        assert np.array_equal(photos.product_finder(c.original, untouched).result, c.original)


def test_a_change_of_20_levels_is_found_under_the_drift_of_a_redrawn_frame():
    for photo in ("astronaut", "coffee", "motorcycle"):
        c = photos.case(photo, "brighten +20", "all, strong", 11)
        assert 24 < photos.untouched_psnr(photos.case(photo, "none", "texture", 11)) < 31
        row = photos.measure(c, photos.product_finder(c.original, c.output))
        assert not row["whole"] and row["recall"] > 0.95 and row["background_exact"] > 0.999


def test_a_brightened_patch_of_sky_is_found_though_it_fills_its_class_of_pixels():
    """The dark, flat pixels of a night sky: a patch of them brightened by 25 is much of that class;
    the drift is still measured from the untouched part of it."""
    original = photos.photo("rocket")
    y, x = np.mgrid[0 : original.shape[0], 0 : original.shape[1]]
    region = np.clip((1 - np.hypot((x - 500) / 55, (y - 60) / 40)) * 20, 0, 1)
    truth = np.clip(original + 25.0 * region[..., None], 0, 255)
    output = photos.regenerate(truth, photos.Regeneration(scale=1.01), np.random.default_rng(0))
    outcome = photos.product_finder(original, output)
    visible = np.abs(np.rint(truth) - original).max(axis=2) > 8
    assert not outcome.whole and (outcome.alpha[visible] >= 0.5).mean() > 0.95


def test_specks_and_a_moved_highlight_are_not_edits():
    """What a decoder leaves: single pixels and 4x4 blots (half a latent pixel) off by 80 levels
    here and there, and a thin bright line redrawn a pixel beside where it was. The photo comes
    back."""
    original = photos.photo("coffee").copy()
    original[100:102, 50:250] = 250  # a thin highlight in the photo
    output = photos.regenerate(original.astype(float), photos.REGENERATIONS["vae"], np.random.default_rng(1))
    output[100:101, 50:250] = output[99:100, 50:250]
    output[102:103, 50:250] = 250  # the highlight, a pixel lower
    rng = np.random.default_rng(2)
    rows, columns = rng.integers(20, original.shape[0] - 20, 40), rng.integers(20, original.shape[1] - 20, 40)
    for row, column in zip(rows, columns, strict=True):
        output[row : row + 4, column : column + 4] = np.clip(output[row : row + 4, column : column + 4] + 80.0, 0, 255)
    rows, columns = rng.integers(20, original.shape[0] - 20, 40), rng.integers(20, original.shape[1] - 20, 40)
    output[rows, columns] = np.clip(output[rows, columns].astype(int) + 80, 0, 255)
    assert np.array_equal(photos.product_finder(original, output).result, original)


def test_the_frames_edge_alone_is_not_an_edit():
    """A model's output is least like the photo along its edge: a band there is not a region."""
    original = photos.photo("chelsea")
    output = original.copy()
    output[:, :5] = np.clip(output[:, :5].astype(int) + 40, 0, 255)
    assert np.array_equal(photos.product_finder(original, output).result, original)


@pytest.mark.parametrize(
    "change,because",
    [
        ("warmer", "the colours of the whole frame changed"),
        ("flip", "no shift and scale explain the frame"),
        ("shift 6%", "no shift and scale explain the frame"),
        ("most of the frame", "it changed"),
    ],
)
def test_what_no_region_can_hold_comes_back_whole(change, because):
    original = photos.photo("astronaut")
    height, width = original.shape[:2]
    output = original.astype(int)
    if change == "warmer":
        output = output + np.array([30, 5, -30])
    elif change == "flip":
        output = output[:, ::-1]
    elif change == "shift 6%":
        output = np.roll(output, round(0.06 * width), axis=1)
    else:  # another picture over the middle 42% of the frame
        top, left = round(0.175 * height), round(0.175 * width)
        output[top : height - top, left : width - left] = photos.photo("coffee")[: height - 2 * top, : width - 2 * left]
    output = np.clip(output, 0, 255).astype(np.uint8)
    result, kept = keep_unedited(Image.fromarray(original), Image.fromarray(np.ascontiguousarray(output)))
    assert kept.whole and kept.reason.startswith(because) and kept.changed_share == 1.0
    assert np.array_equal(np.asarray(result), output)  # the same size: the edit itself


def test_a_change_no_region_covers_returns_the_whole_edit(monkeypatch):
    """The last guard: seeds that the blend does not reach make the whole edit come back (here a
    region finder that misses the brightened region)."""
    import flux.composite
    from flux.composite import _Level, _unexplained

    c = photos.case("astronaut", "brighten +60", "vae", 1)
    assert not find_changes(c.original, c.output).whole_because
    monkeypatch.setattr(flux.composite, "_region", lambda levels, growth: torch.zeros(levels[0].seeds.shape))
    assert find_changes(c.original, c.output).whole_because == "a change was found that no region explains"

    seeds = torch.zeros(32, 32, dtype=torch.bool)
    seeds[20:23, 20:23] = True
    level = _Level(seeds, seeds, torch.zeros(3, 32, 32), torch.ones(3, 32, 32), 7.0)
    alpha = torch.zeros(64, 64)
    assert _unexplained([level], alpha) == 9
    alpha[36:50, 36:50] = 1
    assert _unexplained([level], alpha) == 0


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
    target than the input was, as much as in the plain edit. Where the proxy redrew more than half
    the frame (it moves and repaints both shapes now and then), the whole edit comes back, saying
    so; at least one of the two edits is composited."""
    rng = np.random.default_rng(40 + size[0])
    composited = 0
    for seed in range(2):
        scene = make_scene(rng)
        image, target = keep.upscaled(scene.image, size), keep.upscaled(EDITS[prompt](scene), size)
        plain, kept, report = keep.edit_both_ways(proxy, image, prompt, seed)
        assert kept.shape == image.shape
        if report["whole_edit"]:
            assert report["whole_because"].startswith("it changed") and np.array_equal(kept, plain)
            continue
        composited += 1
        background = ~keep.near(keep.upscaled((scene.circle | scene.square).astype(np.uint8) * 255, size) > 0, 0.2)
        assert np.array_equal(kept[background], image[background])
        edited = (target != image).any(axis=2)
        assert keep.psnr(kept, target, edited) > keep.psnr(image, target, edited) + 5.5
        assert keep.psnr(kept, target, edited) > keep.psnr(plain, target, edited) - 0.5
    assert composited >= 1


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


def test_an_input_beyond_21_to_9_is_refused_when_the_request_is_made(proxy, monkeypatch):
    """The request's own check reads the header: the model is never reached, whichever way EXIF
    would turn the photo (the accepted range is the same both ways)."""
    monkeypatch.setattr("flux.pipeline.edit", lambda *a, **k: pytest.fail("the model was reached"))
    for size in ((4000, 100), (100, 4000)):
        data = image_bytes(Image.new("RGB", size))
        with pytest.raises(InputError, match=f"{size[0]}x{size[1]} input: it is wider or taller than 21:9"):
            EditRequest("x", data, keep_unedited=True)
    with pytest.raises(InputError, match="4000x100 input: it is wider or taller than 21:9"):
        _edit(proxy, np.zeros((100, 4000, 3), np.uint8), "make the circle red", 0, keep_unedited=True)
    EditRequest("x", image_bytes(Image.new("RGB", (2100, 900))), keep_unedited=True)  # 21:9 itself is accepted


def test_the_photo_is_read_as_its_exif_says_and_decoded_at_full_size(proxy):
    """A JPEG of 2560x2048 (both sides past the reduced decode's 2048) turned by EXIF: the result
    is the turned photo at its full size, and away from the shapes its pixels are those of a full
    decode turned by ImageOps.exif_transpose."""
    from PIL import ImageOps

    scene = make_scene(np.random.default_rng(5))
    image = Image.fromarray(keep.upscaled(scene.image, (2560, 2048)))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees when read
    data = image_bytes(image, "JPEG", exif=exif, quality=95)
    from flux.pipeline import run_edit

    result = run_edit(proxy, EditRequest("make the circle red", data, seed=0, check_safety=False, keep_unedited=True))
    full = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data)).convert("RGB")))
    assert result.image.size == (2048, 2560) and full.shape == (2560, 2048, 3)
    far = ~keep.near(scene.circle | scene.square, 0.2)  # at the scene's own size, then scaled up and turned
    background = np.rot90(keep.upscaled(far.astype(np.uint8) * 255, (2560, 2048)) > 0, -1)
    assert background.mean() > 0.2 and np.array_equal(np.asarray(result.image)[background], full[background])


def test_without_the_option_nothing_of_it_runs(proxy, monkeypatch):
    import flux.pipeline

    monkeypatch.setattr(flux.pipeline, "keep_unedited", lambda *a: pytest.fail("composited without the option"))
    image = keep.upscaled(make_scene(np.random.default_rng(2)).image, (640, 640))
    result = _edit(proxy, image, "make the circle red", 1)
    assert result.image.size == (64, 64) and result.report.keep_unedited is None


def test_over_http(tmp_path):
    """With the proxy's weights behind the Cog server: keep_unedited returns the input's size, the
    circle recoloured and every pixel away from the shapes the input's, and reports its region;
    with 16:9 it is refused saying why; without it, the output is the same bytes as with it off."""
    from flux import weights
    from tests.cog_server import cog_server, data_uri, decode_output

    scene = make_scene(np.random.default_rng(11))
    picture = keep.upscaled(scene.image, (900, 600))
    uri = data_uri(image_bytes(Image.fromarray(picture)))
    with cog_server(weights.PROXY_DIR, tmp_path) as server:
        status, body = server.predict(prompt="make the circle red", input_image=uri, seed=1, output_format="png",
                                      keep_unedited=True, disable_safety_checker=True)  # fmt: skip
        assert body["status"] == "succeeded", body
        kept = np.asarray(Image.open(io.BytesIO(decode_output(body["output"]))).convert("RGB"))
        far = ~(keep.upscaled(keep.near(scene.circle | scene.square, 0.2).astype(np.uint8) * 255, (900, 600)) > 0)
        circle = keep.upscaled(scene.circle.astype(np.uint8) * 255, (900, 600)) > 0
        assert kept.shape == picture.shape and np.array_equal(kept[far], picture[far])
        assert np.abs(kept[circle].astype(int) - picture[circle]).mean() > 20
        metrics = body["metrics"]["keep_unedited"]
        assert not metrics["whole_edit"] and 0 < metrics["changed_share"] < 0.5
        assert {"shift_px", "scale", "colour_change"} <= set(metrics)
        status, body = server.predict(prompt="x", input_image=uri, keep_unedited=True, aspect_ratio="16:9")
        assert body["status"] == "failed" and body["error"] == (
            "Prediction failed: Prediction failed: Invalid input: keep_unedited needs aspect_ratio match_input_image: "
            "with 16:9 the output is another frame than the photo's, so no part of it lies over the original"
        )
        outputs = []
        for options in ({}, {"keep_unedited": False}):
            status, body = server.predict(prompt="x", input_image=uri, num_inference_steps=4, seed=3,
                                          output_format="png", disable_safety_checker=True, **options)  # fmt: skip
            outputs.append(decode_output(body["output"]))
        assert outputs[0] == outputs[1] and Image.open(io.BytesIO(outputs[0])).size != (900, 600)


@pytest.mark.parametrize("turn", ["flip h", "flip v", "half turn"])
def test_on_a_photograph_a_flip_comes_back_whole(turn):
    picture = keep.photo(1200, 900, seed=2)
    small = np.asarray(Image.fromarray(picture).resize((1184, 880), Image.Resampling.LANCZOS))
    turned = {"flip h": small[:, ::-1], "flip v": small[::-1], "half turn": small[::-1, ::-1]}[turn]
    result, kept = keep_unedited(Image.fromarray(picture), Image.fromarray(np.ascontiguousarray(turned)))
    assert kept.whole and kept.changed_share > 0.8 and result.size == (1200, 900)
