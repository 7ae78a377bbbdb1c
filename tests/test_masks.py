"""Masked edits: the mask read as the caller means it, the loop keeping the source outside it, the
crop around it on a large photo, and the photo at its own size with its pixels exactly outside the
mask's feather; strength; through the pipeline, the command line and the Cog server."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

import taylor_utils
from flux import images, masking, schedule
from flux.edit import keep_source
from flux.errors import InputError
from flux.lab import keep
from flux.lab.scenes import RED, make_scene
from flux.request import EditRequest, request_from
from tests.conftest import image_bytes

CIRCLE = "make the circle red"


@pytest.fixture(scope="module")
def proxy():
    return keep.proxy_model()


def _png(array: np.ndarray) -> bytes:
    return image_bytes(Image.fromarray(array))


def _scene(seed: int, size: tuple[int, int]):
    """A held-out scene upscaled to ``size``: (picture, circle mask 0/255, square mask 0/255)."""
    scene = make_scene(np.random.default_rng(seed))
    shapes = [keep.upscaled((m * 255).astype(np.uint8), size) for m in (scene.circle, scene.square)]
    return keep.upscaled(scene.image, size), *shapes


def _masked(proxy, picture, mask, prompt=CIRCLE, seed=1, **options):
    from flux.pipeline import run_edit

    mask_data = mask if isinstance(mask, bytes) else _png(mask)
    request = EditRequest(prompt, _png(picture), seed=seed, check_safety=False, mask=mask_data, **options)
    return run_edit(proxy, request)


def _beyond_feather(mask: np.ndarray, result) -> np.ndarray:
    """Where the photo must be exact: beyond the reach the edit reported, one pixel more."""
    reach = result.report.mask["feather_px"] + 1
    return ~keep.near(mask > 0, reach / min(mask.shape))


# --- reading the mask --------------------------------------------------------------------------


def test_white_edits_black_keeps_grey_is_kept_as_grey():
    levels = np.array([[0, 128, 255, 64]], np.uint8).repeat(2, 0)
    mask = images.load_mask(_png(np.stack([levels] * 3, -1)), (4, 2))
    assert mask.mode == "L" and np.array_equal(np.asarray(mask), levels)


def test_a_mask_of_only_transparency_reads_transparent_as_edit_and_other_transparency_as_black():
    alpha = np.array([[0, 255], [128, 255]], np.uint8)
    only_alpha = np.dstack([np.zeros((2, 2, 3), np.uint8), alpha])  # black everywhere, a hole in it
    mask = images.load_mask(image_bytes(Image.fromarray(only_alpha, "RGBA")), (2, 2))
    assert np.array_equal(np.asarray(mask), 255 - alpha)
    strokes = np.dstack([np.full((2, 2, 3), 255, np.uint8), alpha])
    strokes[0, 1, :3] = 0  # colours differ: the picture is the mask, transparency over black
    mask = images.load_mask(image_bytes(Image.fromarray(strokes, "RGBA")), (2, 2))
    assert np.array_equal(np.asarray(mask), [[0, 0], [128, 255]])


def test_any_size_of_the_same_shape_is_resized_by_area_and_another_shape_is_refused():
    small = np.zeros((2, 4), np.uint8)
    small[:, :2] = 255
    mask = np.asarray(images.load_mask(_png(np.stack([small] * 3, -1)), (400, 200)))
    assert mask.shape == (200, 400) and mask[:, :150].min() == 255 and mask[:, 250:].max() == 0
    fine = np.zeros((40, 80), np.uint8)
    fine[:, ::2] = 255  # stripes one pixel wide: by area, a half grey, never thresholded
    mask = np.asarray(images.load_mask(_png(np.stack([fine] * 3, -1)), (40, 20)))
    assert np.abs(mask.astype(int) - 128).max() <= 1
    assert images.load_mask(_png(np.zeros((75, 101, 3), np.uint8)), (1000, 750)).size == (1000, 750)  # rounding
    with pytest.raises(InputError, match="mask is 100x100, another aspect ratio than the 1000x750 input image"):
        images.load_mask(_png(np.zeros((100, 100, 3), np.uint8)), (1000, 750))


def test_the_mask_is_read_as_its_exif_says():
    mask = np.zeros((20, 40), np.uint8)
    mask[:, :10] = 255  # the left quarter, before the turn
    buffer = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # turn 90 degrees clockwise to display
    Image.fromarray(mask).save(buffer, "JPEG", exif=exif, quality=100)
    turned = np.asarray(images.load_mask(buffer.getvalue(), (20, 40)))
    assert turned.shape == (40, 20) and turned[:8].min() > 200 and turned[12:].max() < 50


def test_a_mask_is_sent_as_a_data_uri_or_a_url():
    data = _png(np.zeros((2, 2, 3), np.uint8))
    assert masking.mask_source("") is None and masking.mask_source("  ") is None
    assert masking.mask_source("data:image/png;base64," + base64.b64encode(data).decode()) == data
    assert masking.mask_source("https://example.com/m.png") == "https://example.com/m.png"
    for bad, message in (("data:image/png;base64,@@@", "base64 data is not valid"),
                         ("/etc/hostname", "must be a data URI or an http")):  # fmt: skip
        with pytest.raises(InputError, match=message):
            masking.mask_source(bad)


def test_other_hosts_names_for_the_mask_and_one_of_them_at_a_time():
    uri = "data:image/png;base64," + base64.b64encode(_png(np.zeros((32, 32, 3), np.uint8))).decode()
    picture = _png(np.zeros((32, 32, 3), np.uint8))
    for name in ("mask", "mask_image", "mask_url"):
        request = request_from({"prompt": "x", "input_image": picture, name: uri}, lambda value, _: value)
        assert request.mask == base64.b64decode(uri.split(",", 1)[1])
    with pytest.raises(InputError, match='mask_url="data:image/png;base64,iVBORw0KGgoAAAANSU..." asks for mask'):
        request_from({"prompt": "x", "input_image": picture, "mask": "https://example.com/other.png", "mask_url": uri},
                     lambda value, _: value)  # fmt: skip


@pytest.mark.parametrize(
    "options,message",
    [
        ({"aspect_ratio": "16:9"}, "mask needs aspect_ratio match_input_image"),
        ({"references": (b"x",), "multi_image_mode": "stitch"}, "mask cannot be used with reference_images in stitch mode"),
        ({"strength": 1.5}, "strength must be between 0 and 1; got 1.5"),
    ],
)  # fmt: skip
def test_what_cannot_be_masked_is_refused_when_the_request_is_made(options, message):
    picture, circle, _ = _scene(3, (64, 48))
    with pytest.raises(InputError, match=message):
        EditRequest("x", _png(picture), mask=_png(circle), **options)
    with pytest.raises(InputError, match="mask is 64x64, another aspect ratio than the 64x48 input image"):
        EditRequest("x", _png(picture), mask=_png(np.zeros((64, 64, 3), np.uint8)))


# --- where it edits ------------------------------------------------------------------------------


def test_the_crop_holds_the_mask_with_context_at_the_models_resolution_inside_the_frame():
    mask = Image.new("L", (6000, 4000))
    mask.paste(255, (5800, 100, 5900, 300))  # a 100x200 mark near the right edge
    left, top, right, bottom = masking.crop_box(mask, 1024)
    assert left >= 0 and right == 6000 and 0 <= top < 100 and bottom > 300  # shifted inside the frame
    assert (right - left) * (bottom - top) >= 1024 * 1024 * 0.99
    assert 9 / 21 <= (right - left) / (bottom - top) <= 21 / 9
    big = Image.new("L", (3000, 2000))
    big.paste(255, (500, 500, 2500, 1500))  # half the frame: the crop would be most of it
    assert masking.crop_box(big, 1024) is None
    wide = Image.new("L", (8000, 3000))
    wide.paste(255, (3000, 1400, 4000, 1420))  # a thin line: context above and below it too
    left, top, right, bottom = masking.crop_box(wide, 1024)
    assert left <= 2500 and right >= 4500 and bottom - top >= 1000 and (right - left) / (bottom - top) <= 21 / 9


def test_the_mask_reaches_the_latent_grid_by_area_widened_for_the_decoder():
    mask = Image.new("L", (128, 64))
    mask.paste(255, (60, 20, 64, 24))  # a 4x4 mark: half of one latent pixel
    weights = masking.latent_weights(mask, 128, 64)
    assert weights.shape == (8, 16)
    assert weights.max().item() == pytest.approx(0.25, abs=0.01)  # by area, not thresholded away
    assert (weights > 0).sum().item() == (2 * masking.WIDEN + 1) ** 2  # widened by WIDEN each way


def test_the_stitch_reaches_no_further_than_it_reports_on_a_frame_past_the_working_size():
    """A 3000x2500 frame (more than the 4 megapixels the border is worked out at): beyond the
    reported reach the photo's pixels exactly; well inside the mask the edit's; the border between
    is feathered, reaching past the mask's edge."""
    photo = np.random.default_rng(0).integers(0, 256, (2500, 3000, 3), dtype=np.uint8)
    mask = Image.new("L", (3000, 2500))
    mask.paste(255, (700, 600, 2300, 1900))
    out = np.asarray(masking.stitch(Image.fromarray(photo), Image.new("RGB", (1200, 1000), (255, 0, 0)), mask, None))
    radius, reach = masking.feather((3000, 2500), None)
    assert radius > 1 and 25 < reach < 0.02 * 2500
    marked = np.asarray(mask) > 0
    beyond = ~keep.near(marked, (reach + 1) / 2500)
    assert np.array_equal(out[beyond], photo[beyond])
    assert (out[700 + 100 : 1900 - 100, 800:2200] == (255, 0, 0)).all()
    assert not np.array_equal(out[595, 1000:2000], photo[595, 1000:2000])  # the feather, 5 px outside


def test_the_loop_keeps_the_source_outside_the_mask_and_grey_from_partway():
    source, noise = torch.full((1, 4, 64), 2.0), torch.full((1, 4, 64), -1.0)
    weights = torch.tensor([[0.0, 1.0, 0.5, 0.0]]).repeat(4, 1)  # (h, w) = (4, 4) latent pixels: 4 tokens
    steps = 10
    hook = keep_source(weights.repeat_interleave(2, 0)[:4], source, noise, steps)
    model = torch.zeros(1, 4, 64)
    follows = []
    for k in range(steps):
        sigma = 1 - (k + 1) / steps
        out = hook(k, model, sigma)
        follows.append((out == 0).float().mean().item())
        kept = out[out != 0]
        assert torch.allclose(kept, torch.tensor((1 - sigma) * 2.0 - sigma))  # the source at this sigma
    assert follows[0] == pytest.approx(0.25) and follows[-1] == pytest.approx(0.5)  # grey joins halfway
    assert follows[4] == pytest.approx(0.25) and follows[5] == pytest.approx(0.5)


def test_strength_runs_the_last_steps_and_each_level_over_them():
    assert schedule.first_step(28, 1.0) == 0 and schedule.first_step(28, 0.88) == 3
    assert schedule.first_step(28, 0.5) == 14 and schedule.first_step(28, 0.0) == 28
    assert schedule.first_step(28, 0.01) == 27  # any strength above 0 runs a step


# --- with the proxy ------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(1000, 750), (3000, 2000)])
def test_a_masked_edit_changes_the_circle_and_leaves_the_rest_exact(proxy, size):
    """The circle's mask and "make the circle red" on a held-out scene: the output is the photo's
    size, the circle moves towards red, every pixel beyond the feather is the photo's; with an
    instruction about the square, the square (outside the mask) stays exactly as it was."""
    picture, circle, square = _scene(905, size)
    result = _masked(proxy, picture, circle)
    out = np.asarray(result.image)
    assert out.shape == picture.shape
    inside, outside = circle > 0, _beyond_feather(circle, result)
    assert outside.mean() > 0.8 and np.array_equal(out[outside], picture[outside])
    before, after = (np.abs(a[inside].astype(float) - RED).mean() for a in (picture, out))
    assert after < before - 30
    metrics = result.report.metrics()["mask"]
    assert metrics["feather_px"] <= 0.06 * min(size) and 0 < metrics["share"] < 0.2
    other = np.asarray(_masked(proxy, picture, circle, prompt="make the square blue").image)
    assert np.array_equal(other[square > 0], picture[square > 0])


def test_crop_and_stitch_on_a_large_photo(proxy):
    """A small mark on a 3000x2000 photo: the edit runs on a crop around it, reported with the size
    it ran at, and the result is the photo at 3000x2000 with everything beyond the feather exact."""
    picture, circle, _ = _scene(900, (3000, 2000))
    result = _masked(proxy, picture, circle)
    metrics = result.report.metrics()["mask"]
    left, top, right, bottom = metrics["crop"]
    assert (right - left) * (bottom - top) < 0.5 * 3000 * 2000 and metrics["edit_size"] == [64, 64]
    ys, xs = np.nonzero(circle)
    assert left <= xs.min() and xs.max() < right and top <= ys.min() and ys.max() < bottom
    out = np.asarray(result.image)
    assert out.shape == (2000, 3000, 3)
    outside = _beyond_feather(circle, result)
    assert np.array_equal(out[outside], picture[outside])
    assert np.abs(out[circle > 0].astype(float) - RED).mean() < np.abs(picture[circle > 0].astype(float) - RED).mean()


def test_a_grey_mask_changes_less_than_white_and_more_than_none(proxy):
    picture, circle, _ = _scene(905, (1000, 750))
    inside = circle > 0
    changes = []
    for level in (255, 128):
        out = np.asarray(_masked(proxy, picture, (circle > 0).astype(np.uint8) * level).image)
        changes.append(np.abs(out[inside].astype(float) - picture[inside]).mean())
    assert changes[0] > changes[1] > 0


def test_strength_half_changes_less_with_fewer_calls(proxy, monkeypatch):
    from flux.pipeline import run_edit

    picture, circle, _ = _scene(905, (1000, 750))
    inside = circle > 0
    runs = {}
    for strength in (1.0, 0.5):
        runs[strength] = _masked(proxy, picture, circle, strength=strength, acceleration="go fast")
    changes = {s: np.abs(np.asarray(r.image)[inside].astype(float) - picture[inside]).mean() for s, r in runs.items()}
    assert changes[0.5] < changes[1.0]
    for strength, result in runs.items():
        steps = 28 - schedule.first_step(28, strength)
        assert result.report.num_steps == steps
        assert result.report.transformer_calls == taylor_utils.compute_step_count("go fast", steps)
    # without a mask too; and 0 returns the input without the model
    plain = run_edit(proxy, EditRequest(CIRCLE, _png(picture), seed=1, check_safety=False, strength=0.5))
    assert plain.report.transformer_calls == taylor_utils.compute_step_count("go fast", 14)
    monkeypatch.setattr("flux.pipeline.edit", lambda *a, **k: pytest.fail("the model ran"))
    none = run_edit(proxy, EditRequest(CIRCLE, _png(picture), check_safety=False, strength=0.0))
    assert np.array_equal(np.asarray(none.image), picture) and none.report.transformer_calls == 0


def test_all_black_returns_the_photo_without_the_model_and_all_white_is_the_plain_edit(proxy, monkeypatch):
    from flux.pipeline import run_edit

    picture, circle, _ = _scene(7, (640, 480))
    plain = run_edit(proxy, EditRequest(CIRCLE, _png(picture), seed=3, check_safety=False))
    white = _masked(proxy, picture, np.full_like(picture, 255), seed=3)
    assert white.image.tobytes() == plain.image.tobytes() and torch.equal(white.latents, plain.latents)
    monkeypatch.setattr("flux.pipeline.edit", lambda *a, **k: pytest.fail("the model ran"))
    black = _masked(proxy, picture, np.zeros_like(picture))
    assert np.array_equal(np.asarray(black.image), picture) and black.report.transformer_calls == 0
    assert black.report.metrics()["mask"] == {"share": 0.0}


@pytest.mark.parametrize("level", ["none", "go fast", "go really fast"])
def test_every_level_and_a_reference_work_with_a_mask(proxy, level):
    picture, circle, _ = _scene(905, (1000, 750))
    reference = _png(keep.upscaled(make_scene(np.random.default_rng(1)).image, (200, 200)))
    result = _masked(proxy, picture, circle, acceleration=level, references=(reference,))
    assert result.report.transformer_calls == taylor_utils.compute_step_count(level, 28)
    outside = _beyond_feather(circle, result)
    assert np.array_equal(np.asarray(result.image)[outside], picture[outside])


def test_a_lora_changes_the_masked_region_and_nothing_beyond_the_feather(proxy, tmp_path, monkeypatch):
    from flux.config import Config
    from flux.lab.loras import make_lora, write_lora
    from flux.lora_sources import LoraRequest
    from tests.conftest import model_of
    from tests.weights_server import serve_tree

    monkeypatch.setenv("FLUX_LORA_CACHE", str(tmp_path / "cache"))
    (tmp_path / "site").mkdir()
    write_lora(tmp_path / "site" / "l.safetensors", make_lora(proxy.components.transformer, "peft", rank=4, seed=1))
    model = model_of(proxy.components, Config.from_env())
    picture, circle, _ = _scene(905, (1000, 750))
    plain = _masked(model, picture, circle)
    with serve_tree(tmp_path / "site") as (url, _):
        with_lora = _masked(model, picture, circle, loras=(LoraRequest(f"{url}/l.safetensors", 0.8),))
    _masked(model, picture, circle)  # the LoRA taken off again for the tests after this one
    assert with_lora.report.loras and with_lora.image.tobytes() != plain.image.tobytes()
    outside = _beyond_feather(circle, with_lora)
    assert np.array_equal(np.asarray(with_lora.image)[outside], picture[outside])


def test_a_mask_url_is_fetched_under_the_address_rule(proxy, tmp_path, monkeypatch):
    """A mask sent as a URL is fetched when the edit runs, from an address the rule allows (the
    tests allow 127.0.0.1); from another (an internal address, a name resolving to one), it is
    refused naming the mask, and no connection is attempted (the resolver and sockets patched)."""
    import socket

    from flux.config import Config
    from flux.pipeline import run_edit
    from tests.conftest import model_of
    from tests.weights_server import serve_tree

    attempts, resolve, connect = [], socket.getaddrinfo, socket.socket.connect

    def getaddrinfo(host, port, *args, **kwargs):
        if host == "internal.test":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.1", port))]
        return resolve(host, port, *args, **kwargs)

    def guarded_connect(sock, address):
        attempts.append(address[0])
        if address[0] != "127.0.0.1":
            raise ConnectionRefusedError("the test's socket patch lets nothing leave the machine")
        return connect(sock, address)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    picture, circle, _ = _scene(905, (320, 240))
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "m.png").write_bytes(_png(circle))
    model = model_of(proxy.components, Config.from_env())
    with serve_tree(tmp_path / "site") as (url, log):
        request = EditRequest(CIRCLE, _png(picture), seed=1, check_safety=False, mask=f"{url}/m.png")
        result = run_edit(model, request)
    assert result.image.size == (320, 240) and result.report.mask["share"] > 0
    assert attempts and set(attempts) == {"127.0.0.1"}
    attempts.clear()
    for refused in ("http://10.0.0.1/m.png", "http://internal.test/m.png"):
        request = EditRequest(CIRCLE, _png(picture), check_safety=False, mask=refused)
        with pytest.raises(InputError, match=f"mask: could not fetch the mask from {refused}"):
            run_edit(model, request)
    assert attempts == []


def test_without_a_mask_nothing_of_it_runs(proxy, monkeypatch):
    import flux.pipeline

    monkeypatch.setattr(flux.masking, "stitch", lambda *a: pytest.fail("stitched without a mask"))
    monkeypatch.setattr(flux.pipeline.images, "load_mask", lambda *a: pytest.fail("a mask was read"))
    picture, _, _ = _scene(2, (640, 480))
    result = flux.pipeline.run_edit(proxy, EditRequest(CIRCLE, _png(picture), seed=1, check_safety=False, mask=None))
    assert result.image.size != (640, 480) and result.report.mask is None and "mask" not in result.report.metrics()


# --- through the Cog server and the command line -----------------------------------------------


def test_over_http(tmp_path):
    """With the proxy's weights behind the Cog server: a masked edit returns the input's size with
    every pixel beyond the feather the input's; an all-black mask returns the input's pixels without
    a transformer call; a mask of another shape is refused saying so; an empty mask is no mask (the
    same bytes); the schema and the server agree that the mask is an optional, non-null text."""
    from flux import weights
    from tests.cog_server import cog_server, data_uri, decode_output

    picture, circle, _ = _scene(905, (900, 600))
    uri = data_uri(_png(picture))

    def decoded(body) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(decode_output(body["output"]))).convert("RGB"))

    base = dict(prompt=CIRCLE, input_image=uri, seed=1, output_format="png", disable_safety_checker=True)
    with cog_server(weights.PROXY_DIR, tmp_path) as server:
        status, schema = server.get("/openapi.json")
        inputs = schema["components"]["schemas"]["Input"]
        assert inputs["properties"]["mask"]["type"] == "string" and inputs["properties"]["mask"]["default"] == ""
        assert "nullable" not in inputs["properties"]["mask"] and "mask" not in inputs["required"]
        assert (inputs["properties"]["strength"]["minimum"], inputs["properties"]["strength"]["maximum"]) == (0, 1)
        status, body = server.predict(**base, mask=None)
        assert status == 422 and body["detail"][0]["loc"][-1] == "mask"

        status, body = server.predict(**base, mask=data_uri(_png(circle)))
        assert body["status"] == "succeeded", body
        out = decoded(body)
        outside = ~keep.near(circle > 0, (body["metrics"]["mask"]["feather_px"] + 1) / 600)
        assert out.shape == picture.shape and np.array_equal(out[outside], picture[outside])
        assert body["metrics"]["mask"]["edit_size"] and body["metrics"]["transformer_calls"] == 18

        status, body = server.predict(**base, mask=data_uri(_png(np.zeros_like(picture))))
        assert np.array_equal(decoded(body), picture) and body["metrics"]["transformer_calls"] == 0

        status, body = server.predict(**base, mask=data_uri(_png(np.zeros((100, 100, 3), np.uint8))))
        assert (
            body["status"] == "failed"
            and "mask is 100x100, another aspect ratio than the 900x600 input image" in (body["error"])
        )
        plain = [server.predict(**base, **extra)[1]["output"] for extra in ({}, {"mask": ""})]
        assert plain[0] == plain[1]


def test_mask_and_strength_on_the_command_line(tmp_path):
    """--strength out of bounds and a --mask of another shape are refused before anything loads;
    a masked edit writes the photo at its own size, exact beyond the feather."""
    from tests.test_cli import run_cli

    picture, circle, _ = _scene(905, (640, 480))
    (tmp_path / "in.png").write_bytes(_png(picture))
    (tmp_path / "mask.png").write_bytes(_png(circle))
    (tmp_path / "square.png").write_bytes(_png(np.zeros((64, 64, 3), np.uint8)))
    (tmp_path / "no-weights").mkdir()
    base = ["edit", "--image", str(tmp_path / "in.png"), "--prompt", CIRCLE, "--out", str(tmp_path / "out.png")]
    for extra, message in ((["--strength", "1.5"], "error: --strength must be between 0 and 1; got 1.5"),
                           (["--mask", str(tmp_path / "square.png")], "error: --mask is 64x64, another aspect ratio"),
                           (["--mask", str(tmp_path / "none.png")], "No such file or directory")):  # fmt: skip
        result = run_cli(*base, "--weights", str(tmp_path / "no-weights"), *extra)
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert "incomplete" not in result.stderr and not (tmp_path / "out.png").exists()
    result = run_cli(*base, "--proxy", "--mask", str(tmp_path / "mask.png"), "--strength", "0.88", "--seed", "1",
                     "--no-safety-checker")  # fmt: skip
    assert result.returncode == 0, result.stderr
    out = np.asarray(Image.open(tmp_path / "out.png").convert("RGB"))
    assert out.shape == picture.shape
    far = ~keep.near(circle > 0, 0.2)
    assert np.array_equal(out[far], picture[far]) and not np.array_equal(out, picture)


def test_a_mask_and_a_strength_never_recompile_the_compiled_transformer(tiny_weights):
    """Compiled (dynamo, eager backend), one graph serves the plain edit, a masked one and a
    partial one at every level: the mask acts on the latents between calls, the strength on which
    sigmas the calls see."""
    import torch._dynamo

    from flux.edit import edit
    from flux.lab.plans import direct, lab_plan
    from flux.loading import load_components
    from tests.conftest import random_image

    c = load_components(tiny_weights)
    torch._dynamo.reset()
    c.transformer.compile(backend="eager", dynamic=False)
    image = random_image(32, 32)
    mask = Image.new("L", (32, 32))
    mask.paste(255, (8, 8, 20, 20))
    weights = masking.latent_weights(mask, 32, 32)
    settings = dict(prompt="x", width=32, height=32, seed=1, num_steps=8, condition=(32, 32))
    edit(c, image, lab_plan(c, image, **settings, acceleration="none"), transformer=direct(c))  # compiles once
    with torch._dynamo.config.patch(error_on_recompile=True):
        for level in ("none", "go fast", "go really fast"):
            for strength, with_mask in ((1.0, True), (0.5, False), (0.5, True)):
                plan = lab_plan(c, image, **settings, acceleration=level, strength=strength)
                result = edit(c, image, plan, transformer=direct(c), mask=weights if with_mask else None)
                assert torch.isfinite(result.latents).all()
    torch._dynamo.reset()
