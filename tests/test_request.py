"""The request: every bound a caller can break is checked once, when the request is made, without
decoding an image; the error names the input."""

from __future__ import annotations

import pytest

from flux.errors import InputError
from flux.lora_sources import LoraRequest
from flux.request import INPUTS, MAX_PROMPT_CHARS, MAX_SEED, EditRequest, request_from

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


def _sent(**inputs):
    return request_from({"prompt": "make it red", "input_image": IMAGE, **inputs}, lambda value, name: value)


# one past an edge: a whole number's next one, a decimal's next hundredth
def _past(value, step):
    return value + step


@pytest.mark.parametrize("name", [n for n, spec in INPUTS.items() if spec.low is not None and n != "reference_images"])
def test_every_bound_holds_at_its_edge_and_refuses_one_past_it(name):
    """From the one place the bounds live: each range's two ends are accepted, one past each is
    refused naming the input (a seed of -1 is the random one; other hosts' counts of images are
    refused with their own message)."""
    spec = INPUTS[name]
    step = 1 if isinstance(spec.default, int) else 0.01
    lora = {name.replace("strength", "weights"): "a/b"} if name.endswith("lora_strength") else {}
    for edge in (spec.low, spec.high):
        _sent(**{name: edge}, **lora)
    for past in (_past(spec.low, -step), _past(spec.high, step)):
        with pytest.raises(InputError) as info:
            _sent(**{name: past}, **lora)
        assert info.value.field == name, (name, past)


@pytest.mark.parametrize("name", [n for n, spec in INPUTS.items() if spec.max_length is not None])
def test_every_length_holds_at_its_edge_and_refuses_one_past_it(name):
    limit = INPUTS[name].max_length
    edge = "a/b" + "x" * (limit - 3) if "lora" in name else "x" * limit
    assert len(edge) == limit
    _sent(**{name: edge})
    with pytest.raises(InputError, match=f"is longer than {limit} characters; got {limit + 1}") as info:
        _sent(**{name: edge + "x"})
    assert info.value.field == name


def test_every_choice_is_accepted_and_nothing_else():
    for name in (n for n, spec in INPUTS.items() if spec.choices):
        for choice in INPUTS[name].choices:
            _sent(**{name: choice})
        with pytest.raises(InputError, match=f"{name} must be one of") as info:
            _sent(**{name: INPUTS[name].choices[0] + "x"})
        assert info.value.field == name


def test_reference_images_up_to_their_count():
    assert len(_sent(reference_images=[IMAGE] * INPUTS["reference_images"].high).references) == 3
    with pytest.raises(InputError, match="at most 3 reference_images are accepted; got 4"):
        _sent(reference_images=[IMAGE] * 4)


def test_the_edges_of_every_bound_are_accepted():
    request = EditRequest("  make it\tred ", IMAGE, num_steps=4, guidance=10, seed=MAX_SEED, output_quality=0,
                          references=(IMAGE,) * 3, loras=(LoraRequest("a/b", -1), LoraRequest("c/d", 3, "extra_lora_weights")))  # fmt: skip
    assert request.prompt == "make it red" and EditRequest("x", IMAGE, seed=0, num_steps=50).seed == 0


def test_tokens_never_appear_in_the_request_repr():
    assert "hf_SECRET" not in repr(EditRequest("x", IMAGE, hf_api_token="hf_SECRET", civitai_api_token="civ"))


def test_replicates_go_fast_and_other_hosts_names():
    assert _sent(go_fast=True).acceleration == "go really fast" and _sent(go_fast=False).acceleration == "none"
    assert _sent(go_fast="").acceleration == "go fast"
    with pytest.raises(InputError, match="go_fast must be true or false"):
        _sent(go_fast="yes")
    with pytest.raises(InputError, match="go_fast must be true or false"):
        _sent(go_fast=1)
    assert _sent(go_fast=False, acceleration="none").acceleration == "none"  # both agree
    with pytest.raises(InputError) as info:
        _sent(go_fast=False, acceleration="go really fast")
    assert (
        str(info.value)
        == ('go_fast=false asks for acceleration="none", but acceleration is "go really fast"; send one of them')
        and info.value.field == "go_fast"
    )
    assert _sent(steps=6).num_steps == 6 and _sent(guidance_scale=6.0).guidance == 6.0
    assert _sent(enable_safety_checker=False).check_safety is False and _sent().check_safety is True
    assert _sent(enable_safety_checker=False, disable_safety_checker=True).check_safety is False
    with pytest.raises(InputError, match="steps=6 asks for num_inference_steps=6, but num_inference_steps is 8"):
        _sent(steps=6, num_inference_steps=8)
    _sent(num_outputs=1, n=1)
    with pytest.raises(InputError, match="num_images=4: this container returns one image per prediction") as info:
        _sent(num_outputs=1, num_images=4)
    assert info.value.field == "num_images"


def test_files_and_tokens_are_read_by_the_caller_given_reader():
    read = []
    request = request_from({"prompt": "x", "input_image": "in", "reference_images": ["a", "b"], "hf_api_token": " t ",
                            "lora_weights": " a/b ", "extra_lora_weights": "  "},
                           lambda value, name: read.append((value, name)) or b"bytes")  # fmt: skip
    assert read == [("in", "input_image"), ("a", "reference_images[0]"), ("b", "reference_images[1]")]
    assert request.hf_api_token == "t" and request.civitai_api_token is None
    assert [(lora.source, lora.field) for lora in request.loras] == [("a/b", "lora_weights")]
    with pytest.raises(ValueError, match="not inputs of this container: colour"):
        request_from({"prompt": "x", "input_image": "in", "colour": "red"}, lambda value, name: value)


def test_minus_one_is_a_random_seed():
    assert EditRequest("x", IMAGE, seed=-1).seed is None and EditRequest("x", IMAGE).seed is None
