import math

import pytest

from flux import sizes
from flux.errors import InputError


@pytest.mark.parametrize("ratio", list(sizes.ASPECT_RATIOS))
def test_every_aspect_ratio(ratio):
    w, h = sizes.output_size(ratio, 640, 480)
    rw, rh = sizes.ASPECT_RATIOS[ratio]
    assert w % 16 == 0 and h % 16 == 0
    assert abs(w * h - 1024 * 1024) / (1024 * 1024) < 0.06
    assert abs(w / h - rw / rh) / (rw / rh) < 0.03


@pytest.mark.parametrize("size", [(333, 517), (64, 64), (1, 1), (1024, 768), (8, 8), (6000, 4000)])
def test_match_input_keeps_aspect_ratio(size):
    w, h = sizes.output_size(sizes.MATCH_INPUT, *size)
    assert w % 16 == 0 and h % 16 == 0
    assert abs(w * h - 1024 * 1024) / (1024 * 1024) < 0.06
    assert abs(math.log((w / h) / (size[0] / size[1]))) < 0.03


@pytest.mark.parametrize("size", [(4000, 300), (4000, 100), (300, 4000)])
def test_extreme_inputs_are_clamped_to_the_widest_choice(size):
    w, h = sizes.output_size(sizes.MATCH_INPUT, *size)
    assert w % 16 == 0 and h % 16 == 0
    assert abs(w * h - 1024 * 1024) / (1024 * 1024) < 0.06
    expected = sizes.MAX_RATIO if size[0] > size[1] else sizes.MIN_RATIO
    assert abs(math.log((w / h) / expected)) < 0.03


def test_unknown_aspect_ratio_is_refused():
    with pytest.raises(InputError, match="aspect_ratio must be one of"):
        sizes.output_size("7:3", 100, 100)


@pytest.mark.parametrize(
    "size,expected", [((1024, 1024), (1024, 1024)), ((4000, 300), (1568, 672)), ((333, 517), (832, 1248))]
)
def test_conditioning_size_is_the_closest_preferred_kontext_resolution(size, expected):
    assert sizes.conditioning_size(*size) == expected
