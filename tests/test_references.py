"""Several input images: where each reference's tokens go, the token budget, bad references, and
no compilation during a request whatever their number and sizes (the committed proxy, base side 64)."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

from flux import sizes
from flux.config import FastPathConfig
from flux.edit import edit, encode_image
from flux.errors import InputError
from flux.fast import compile_transformer
from flux.lab.plans import direct, lab_plan
from flux.loading import load_components
from flux.request import EditRequest
from flux.weights import PROXY_DIR
from tests.conftest import image_bytes, model_of, random_image
from tests.counting import COUNTING


@pytest.fixture(scope="module")
def proxy():
    return load_components(PROXY_DIR)


def _capture(c, references, mode, condition=(64, 64)):
    """The transformer's inputs at its first call: (hidden_states shape, img_ids), and the result."""
    seen = {}

    def hook(module, args, kwargs):
        if not seen:
            seen["hidden"] = kwargs["hidden_states"].shape
            seen["ids"] = kwargs["img_ids"].clone()
            seen["latents"] = kwargs["hidden_states"].clone()

    handle = c.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        image = random_image(64, 64)
        plan = lab_plan(c, image, "make the circle red", 64, 64, seed=1, num_steps=4, mode=mode,
                        references=references, condition=condition)  # fmt: skip
        result = edit(c, image, plan, references=references, transformer=direct(c))
    finally:
        handle.remove()
    return seen, result


def _grid(first: float, rows: range, cols: range) -> set[tuple[float, int, int]]:
    return {(first, r, c) for r in rows for c in cols}


# a wide and a tall reference; with two references each gets half of a 64x64 image's area:
# 128x64 (ratio 2) -> 64x32 pixels = 2x4 tokens; 32x96 (ratio 1/3, clamped to 9:21) -> 32x64 = 4x2 tokens
WIDE, TALL = random_image(128, 64, seed=2), random_image(32, 96, seed=3)
TARGET = 4 * 4  # 64x64 output: 4x4 tokens


def _conditioning_ids(seen) -> list[tuple[float, int, int]]:
    return [tuple(int(v) if i else float(v) for i, v in enumerate(row)) for row in seen["ids"][TARGET:].tolist()]


def test_reference_sizes_share_one_image_budget():
    assert sizes.reference_size(128, 64, 2, base=64) == (64, 32)
    assert sizes.reference_size(32, 96, 2, base=64) == (32, 64)
    for count in (1, 2, 3):
        total = sum(sizes.tokens(*sizes.reference_size(w, h, count)) for w, h in [(1000, 1000)] * count)
        assert total <= sizes.tokens(1024, 1024) * 1.1  # about one image's 4096 tokens, whatever the count


def test_offset_mode_places_references_beside_or_below_without_overlap(proxy):
    seen, _ = _capture(proxy, [WIDE, TALL], "offset")
    ids = _conditioning_ids(seen)
    # input 4x4 at (0, 0); the wide 2x4 goes below (stacking keeps the canvas no taller than wide):
    # rows 4-5; the tall 4x2 would make it taller than wide below, so it goes right: columns 4-5
    expected = _grid(1.0, range(4), range(4)) | _grid(1.0, range(4, 6), range(4)) | _grid(1.0, range(4), range(4, 6))
    assert len(ids) == 16 + 8 + 8 == len(set(ids))  # no two tokens share a position: no overlap
    assert set(ids) == expected
    assert seen["hidden"][1] == TARGET + 32
    assert torch.all(seen["ids"][:TARGET, 0] == 0)


def test_index_mode_gives_each_reference_its_own_first_coordinate(proxy):
    seen, _ = _capture(proxy, [WIDE, TALL], "index")
    expected = _grid(1.0, range(4), range(4)) | _grid(2.0, range(2), range(4)) | _grid(3.0, range(4), range(2))
    assert set(_conditioning_ids(seen)) == expected and len(_conditioning_ids(seen)) == 32


def test_stitch_mode_makes_one_conditioning_image_of_the_expected_size(proxy):
    seen, _ = _capture(proxy, [WIDE, TALL], "stitch")
    # 64x64 + 64x32 + 32x64 side by side at height 64: 64 + 128 + 32 = 224 x 64 pixels, over twice a
    # 64x64 image's area (8192), so scaled by sqrt(8192 / 14336) to 169x48 -> 176x48: 3x11 tokens
    assert sizes.stitched_size([(64, 64), (64, 32), (32, 64)], base=64) == (176, 48)
    assert set(_conditioning_ids(seen)) == _grid(1.0, range(3), range(11))
    assert seen["hidden"][1] == TARGET + 33


def test_without_references_the_inputs_are_those_of_one_image(proxy):
    seen, result = _capture(proxy, [], "offset")
    latents, ids = encode_image(proxy, random_image(64, 64))
    assert torch.equal(seen["ids"][TARGET:], ids) and torch.equal(seen["latents"][:, TARGET:], latents)
    _, with_refs = _capture(proxy, [WIDE], "offset")
    assert with_refs.report.cache_bytes == result.report.cache_bytes  # the cache holds target tokens only


def test_four_references_are_refused():
    with pytest.raises(InputError, match="at most 3 reference_images"):
        EditRequest("x", image_bytes(random_image(64, 64)), references=(image_bytes(WIDE),) * 4)


@pytest.mark.parametrize(
    "data,message",
    [
        (b"", r"reference_images\[1\] is empty"),
        (b"not an image at all", r"reference_images\[1\] is not a readable image"),
        ("bomb", r"reference_images\[1\] declares far too many pixels|reference_images\[1\] is \d+x\d+ pixels"),
    ],
)
def test_bad_references_fail_clearly(tmp_path, data, message):
    from flux.pipeline import run_edit

    if data == "bomb":
        from tests.test_images import png_header_only

        data = png_header_only(30000, 30000)
    good, bad = tmp_path / "good.png", tmp_path / "bad.png"
    good.write_bytes(image_bytes(random_image(64, 64)))
    bad.write_bytes(data)
    model = model_of(load_components(PROXY_DIR))
    with pytest.raises(InputError, match=message):
        run_edit(model, EditRequest("make the circle red", good, num_steps=4, seed=1, references=(good, bad)))


def test_references_never_compile_during_a_request(tmp_path):
    c = load_components(PROXY_DIR)
    torch._dynamo.reset()
    compile_transformer(c.transformer, FastPathConfig.defaults(compile_backend="flux_test_counting"))
    image = random_image(64, 64)
    settings = dict(prompt="make the circle red", width=64, height=64, seed=1, num_steps=4)
    edit(c, image, lab_plan(c, image, **settings), transformer=direct(c))  # the warm-up: compiles
    plan = lab_plan(c, image, **settings, references=[WIDE])
    edit(c, image, plan, references=[WIDE], transformer=direct(c))
    graphs = COUNTING.graphs
    with torch._dynamo.config.patch(error_on_recompile=True):
        for mode in ("offset", "index", "stitch"):
            for refs in ([WIDE], [TALL, WIDE], [random_image(300, 20), TALL, random_image(7, 7)]):
                runs = COUNTING.runs
                image = random_image(90, 40)
                plan = lab_plan(c, image, **settings, mode=mode, references=refs)
                edit(c, image, plan, references=refs, transformer=direct(c))
                assert COUNTING.runs - runs >= 4
    assert COUNTING.graphs == graphs
    torch._dynamo.reset()
