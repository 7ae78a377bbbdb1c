"""The request: every bound a caller can break is checked once, when the request is made, without
decoding an image; the error names the input."""

from __future__ import annotations

import pytest

from flux.errors import InputError
from flux.lora_sources import LoraRequest
from flux.request import MAX_PROMPT_CHARS, MAX_SEED, EditRequest

IMAGE = b"not decoded: nothing here opens the image"


@pytest.mark.parametrize(
    "changes,field,message",
    [
        ({"num_steps": 3}, "num_inference_steps", "must be between 4 and 50; got 3"),
        ({"num_steps": 51}, "num_inference_steps", "must be between 4 and 50; got 51"),
        ({"guidance": 10.5}, "guidance", "must be between 0 and 10"),
        ({"guidance": -0.1}, "guidance", "must be between 0 and 10"),
        ({"seed": -2}, "seed", f"must be between 0 and {MAX_SEED}"),
        ({"seed": MAX_SEED + 1}, "seed", f"must be between 0 and {MAX_SEED}"),
        ({"acceleration": "ludicrous"}, "acceleration", "must be one of none, go fast, go really fast"),
        ({"aspect_ratio": "7:3"}, "aspect_ratio", "must be one of match_input_image, 1:1"),
        ({"output_format": "tiff"}, "output_format", "must be one of webp, jpg, png"),
        ({"output_quality": 101}, "output_quality", "must be between 0 and 100"),
        ({"multi_image_mode": "collage"}, "multi_image_mode", "must be one of offset, stitch, index"),
        ({"references": (IMAGE,) * 4}, "reference_images", "at most 3 reference_images are accepted; got 4"),
        ({"loras": (LoraRequest("a/b", 3.5),)}, "lora_strength", "must be between -1 and 3; got 3.5"),
        ({"loras": (LoraRequest("a/b", 1, "extra_lora_weights"), LoraRequest("c/d", -2, "extra_lora_weights"))},
         "extra_lora_strength", "must be between -1 and 3; got -2"),
        ({"loras": (LoraRequest("x" * 2049),)}, "lora_weights", "is longer than 2048 characters"),
        ({"prompt": "x" * (MAX_PROMPT_CHARS + 1)}, "prompt", "is longer than 10000 characters"),
        ({"prompt": " \x00\t "}, "prompt", "is empty"),
    ],
)  # fmt: skip
def test_each_bound_is_refused_naming_its_input(changes, field, message):
    with pytest.raises(InputError) as info:
        EditRequest(**{"prompt": "make it red", "image": IMAGE, **changes})
    assert info.value.field == field and message in str(info.value)
    assert field in str(info.value)


def test_the_edges_of_every_bound_are_accepted():
    request = EditRequest("  make it\tred ", IMAGE, num_steps=4, guidance=10, seed=MAX_SEED, output_quality=0,
                          references=(IMAGE,) * 3, loras=(LoraRequest("a/b", -1), LoraRequest("c/d", 3, "extra_lora_weights")))  # fmt: skip
    assert request.prompt == "make it red" and EditRequest("x", IMAGE, seed=0, num_steps=50).seed == 0


def test_tokens_never_appear_in_the_request_repr():
    assert "hf_SECRET" not in repr(EditRequest("x", IMAGE, hf_api_token="hf_SECRET", civitai_api_token="civ"))


def test_replicates_go_fast_and_other_hosts_names():
    from flux.request import go_fast_level, one_image, one_meaning

    assert (go_fast_level(True), go_fast_level(False), go_fast_level("")) == ("go really fast", "none", None)
    with pytest.raises(InputError, match="go_fast must be true or false"):
        go_fast_level("yes")
    level = one_meaning("acceleration", "go fast", "go fast", "go_fast", False, "none")
    assert level == "none"  # acceleration left at its default: go_fast decides
    assert one_meaning("acceleration", "none", "go fast", "go_fast", False, "none") == "none"  # both agree
    assert one_meaning("acceleration", "go really fast", "go fast", "go_fast", "", None) == "go really fast"
    with pytest.raises(InputError) as info:
        one_meaning("acceleration", "go really fast", "go fast", "go_fast", False, "none")
    assert (
        str(info.value)
        == ('go_fast=false asks for acceleration="none", but acceleration is "go really fast"; send one of them')
        and info.value.field == "go_fast"
    )
    one_image(num_outputs=1, n=1)
    with pytest.raises(InputError, match="num_images=4: this container returns one image per prediction"):
        one_image(num_outputs=1, num_images=4)


def test_minus_one_is_a_random_seed():
    assert EditRequest("x", IMAGE, seed=-1).seed is None and EditRequest("x", IMAGE).seed is None
