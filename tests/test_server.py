"""The real Cog HTTP server process on 127.0.0.1 with the tiny model, end to end."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from flux import sizes
from flux.lab.tiny import TINY_SIDE
from flux.request import MAX_SEED
from tests.cog_server import cog_server, data_uri, decode_output
from tests.conftest import image_bytes, random_image

INPUTS = [
    "prompt", "input_image", "mask", "aspect_ratio", "num_inference_steps", "guidance", "strength", "seed",
    "acceleration", "go_fast", "output_format", "output_quality", "disable_safety_checker", "keep_unedited",
    "lora_weights", "lora_strength", "extra_lora_weights", "extra_lora_strength", "reference_images",
    "multi_image_mode", "hf_api_token", "civitai_api_token", "num_outputs", "num_images", "n", "guidance_scale",
    "steps", "enable_safety_checker", "mask_image", "mask_url",
]  # fmt: skip
# what coglet writes before the project's message, and the words the project's error classes show
PREFIX = "Prediction failed: Prediction failed: "


@pytest.fixture(scope="module")
def server(tiny_weights, tmp_path_factory):
    with cog_server(tiny_weights, tmp_path_factory.mktemp("server")) as s:
        yield s


@pytest.fixture(scope="module")
def png_uri():
    return data_uri(image_bytes(random_image(320, 240)))


def test_health_and_schema(server):
    status, health = server.get("/health-check")
    assert status == 200 and health["status"] == "READY"
    status, schema = server.get("/openapi.json")
    assert status == 200
    schemas = schema["components"]["schemas"]
    props = schemas["Input"]["properties"]
    assert sorted(props, key=lambda name: props[name]["x-order"]) == INPUTS
    assert schemas["Input"]["required"] == ["prompt", "input_image"]
    assert props["num_inference_steps"] == {**props["num_inference_steps"], "default": 28, "minimum": 4, "maximum": 50}
    assert props["guidance"]["default"] == 2.5 and props["guidance"]["maximum"] == 10
    assert props["output_quality"]["default"] == 80
    assert props["seed"]["default"] == -1 and "nullable" not in str(schema)
    assert (props["seed"]["minimum"], props["seed"]["maximum"]) == (-1, MAX_SEED)
    assert schemas["aspect_ratio"]["enum"] == list(sizes.ASPECT_RATIO_CHOICES)
    assert schemas["acceleration"]["enum"] == ["none", "go fast", "go really fast"]
    assert schemas["output_format"]["enum"] == ["webp", "jpg", "png", "jpeg"]
    assert props["acceleration"]["default"] == "go fast"


@pytest.mark.parametrize(
    "aspect_ratio,output_format,acceleration",
    [("match_input_image", "png", "none"), ("16:9", "jpg", "go fast"), ("9:21", "webp", "go really fast")],
)
def test_predictions_return_decodable_images(server, png_uri, aspect_ratio, output_format, acceleration):
    status, body = server.predict(
        prompt="make it red", input_image=png_uri, aspect_ratio=aspect_ratio, output_format=output_format,
        acceleration=acceleration, num_inference_steps=12, seed=5,
    )  # fmt: skip
    assert status == 200 and body["status"] == "succeeded", body
    with Image.open(io.BytesIO(decode_output(body["output"]))) as image:
        assert image.format == {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}[output_format]
        assert image.size == sizes.output_size(aspect_ratio, 320, 240, TINY_SIDE)
    expected_calls = {"none": 12, "go fast": 8, "go really fast": 6}[acceleration]
    metrics = body["metrics"]
    assert metrics["transformer_calls"] == expected_calls
    assert metrics["seed"] == 5 and metrics["acceleration"] == acceleration
    assert set(metrics["seconds"]) >= {"encode", "denoise", "decode"}
    assert "seed 5" in body["logs"]


@pytest.mark.parametrize(
    "field,value", [("num_inference_steps", 99), ("aspect_ratio", "7:3"), ("acceleration", "go ludicrous")]
)
def test_invalid_inputs_get_422_naming_the_field(server, png_uri, field, value):
    status, body = server.predict(prompt="x", input_image=png_uri, **{field: value})
    assert status == 422
    assert field in str(body)


def test_failed_prediction_leaves_the_server_healthy(server, png_uri):
    status, body = server.predict(prompt="x", input_image=data_uri(b"\x89PNG\r\n\x1a\nnot really", "image/png"))
    assert status == 200 and body["status"] == "failed"
    assert "input_image" in body["error"] and "Traceback" not in body["error"]
    assert server.settled_health() == "READY"
    status, body = server.predict(prompt="x", input_image=png_uri, num_inference_steps=4, seed=1)
    assert body["status"] == "succeeded"


def test_same_seed_same_bytes(server, png_uri):
    outputs = []
    for _ in range(2):
        status, body = server.predict(
            prompt="x", input_image=png_uri, num_inference_steps=4, seed=11, output_format="png"
        )
        assert body["status"] == "succeeded"
        outputs.append(decode_output(body["output"]))
    assert outputs[0] == outputs[1]


def test_random_seed_is_logged_and_reported(server, png_uri):
    status, body = server.predict(prompt="x", input_image=png_uri, num_inference_steps=4)
    assert body["status"] == "succeeded"
    assert f"seed {body['metrics']['seed']}" in body["logs"]


@pytest.mark.parametrize("path", ["/etc/hostname", "../weights/model_index.json"])
def test_path_strings_are_refused_over_http(server, path):
    status, body = server.predict(prompt="x", input_image=path)
    assert body["status"] == "failed"
    assert "uploaded file" in body["error"]


def test_no_deprecation_warnings_at_start(server):
    assert "deprecated" not in server.log().lower()


def test_flagged_image_fails_over_http(flagging_weights, tmp_path, png_uri):
    """Weights whose checker flags every image: the edit fails, unless the checker is turned off,
    by this container's disable_safety_checker or by fal's enable_safety_checker=false."""
    with cog_server(flagging_weights, tmp_path) as flagged:
        for checked in ({}, {"enable_safety_checker": True}):
            status, body = flagged.predict(prompt="x", input_image=png_uri, num_inference_steps=4, seed=1, **checked)
            assert body["status"] == "failed" and body.get("output") is None
            assert "safety checker flagged" in body["error"]
        for unchecked in ({"disable_safety_checker": True}, {"enable_safety_checker": False}):
            status, body = flagged.predict(prompt="x", input_image=png_uri, num_inference_steps=4, seed=1, **unchecked)
            assert body["status"] == "succeeded" and body["output"], (unchecked, body)


def test_null_for_any_optional_input_is_refused_naming_it(server, png_uri):
    """No input is nullable: a JSON null in any optional input is HTTP 422 naming that input, and
    nothing runs."""
    status, schema = server.get("/openapi.json")
    optional = set(schema["components"]["schemas"]["Input"]["properties"]) - {"prompt", "input_image"}
    assert len(optional) == len(INPUTS) - 2
    for name in sorted(optional):
        status, body = server.predict(prompt="x", input_image=png_uri, **{name: None})
        assert status == 422 and name in json.dumps(body), (name, status, body)


@pytest.mark.parametrize("seed", [-2, MAX_SEED + 1, 2**63, 2**64])
def test_seeds_outside_the_generator_range_get_422_naming_seed(server, png_uri, seed):
    """These seeds used to alias others (2**32 gave the image of 0) or crash; -1 is a random seed."""
    status, body = server.predict(prompt="x", input_image=png_uri, num_inference_steps=4, seed=seed)
    assert status == 422 and "seed" in str(body)


def test_seeds_at_both_ends_run_report_themselves_and_differ(server, png_uri):
    outputs = {}
    for seed in (0, MAX_SEED):
        status, body = server.predict(
            prompt="x", input_image=png_uri, num_inference_steps=4, seed=seed, output_format="png"
        )
        assert body["status"] == "succeeded", body
        assert body["metrics"]["seed"] == seed and isinstance(body["metrics"]["seed"], int)
        assert f"seed {seed}," in body["logs"]
        outputs[seed] = decode_output(body["output"])
    assert outputs[0] != outputs[MAX_SEED]


@pytest.mark.parametrize("prompt", ["\x00", "\x00\x01\x1b", " \t\n\x7f "])
def test_prompts_of_control_characters_only_are_refused(server, png_uri, prompt):
    status, body = server.predict(prompt=prompt, input_image=png_uri, num_inference_steps=4, seed=1)
    assert body["status"] == "failed"
    assert "prompt is empty" in body["error"] and "Traceback" not in body["error"]


def test_failure_text_is_the_project_message_behind_the_cog_server_prefix(server, png_uri):
    """What a client sees: coglet's own prefix, the kind of failure in words, then the project's
    one-sentence message; no Python class name anywhere."""
    status, body = server.predict(prompt="\x00", input_image=png_uri, num_inference_steps=4, seed=1)
    assert body["error"] == PREFIX + (
        "Invalid input: prompt is empty (control characters and spaces do not count); say what to change in the image"
    )
    status, body = server.predict(
        prompt="x", input_image=data_uri(image_bytes(random_image(16, 16), "BMP"), "image/bmp")
    )
    assert body["error"] == PREFIX + (
        "Invalid input: input_image format BMP is not supported; send a jpeg, png, gif or webp file"
    )
    assert "Error" not in body["error"]


@pytest.mark.parametrize("mode", ["offset", "stitch", "index"])
def test_reference_images_as_data_uris(server, png_uri, mode):
    references = [
        data_uri(image_bytes(random_image(200, 100, seed=4))),
        data_uri(image_bytes(random_image(90, 160, seed=5))),
    ]
    status, body = server.predict(
        prompt="put the person in the outfit", input_image=png_uri, reference_images=references,
        multi_image_mode=mode, num_inference_steps=4, seed=2,
    )  # fmt: skip
    assert status == 200 and body["status"] == "succeeded", body
    with Image.open(io.BytesIO(decode_output(body["output"]))) as image:
        assert image.size == sizes.output_size("match_input_image", 320, 240, TINY_SIDE)


def test_bad_reference_images_over_http(server, png_uri):
    status, body = server.predict(
        prompt="x", input_image=png_uri, reference_images=[png_uri] * 4, num_inference_steps=4
    )
    assert body["status"] == "failed" and "at most 3 reference_images are accepted; got 4" in body["error"]
    broken = data_uri(b"\x89PNG\r\n\x1a\nnot really", "image/png")
    status, body = server.predict(
        prompt="x", input_image=png_uri, reference_images=[png_uri, broken], num_inference_steps=4
    )
    assert body["status"] == "failed" and "reference_images[1] is not a readable image" in body["error"]
    status, body = server.predict(prompt="x", input_image=png_uri, num_inference_steps=4, seed=1)
    assert body["status"] == "succeeded"


@pytest.mark.parametrize(
    "inputs,calls,level",
    [
        ({"go_fast": False}, 28, "none"),
        ({"go_fast": True}, 13, "go really fast"),
        ({}, 18, "go fast"),
        ({"go_fast": True, "acceleration": "go really fast"}, 13, "go really fast"),
        ({"go_fast": False, "acceleration": "none"}, 28, "none"),
    ],
)
def test_replicate_go_fast_means_what_it_means_on_replicate(server, png_uri, inputs, calls, level):
    status, body = server.predict(prompt="x", input_image=png_uri, seed=3, **inputs)
    assert status == 200 and body["status"] == "succeeded", body
    assert body["metrics"]["transformer_calls"] == calls and body["metrics"]["acceleration"] == level


def test_go_fast_and_acceleration_that_disagree_are_refused(server, png_uri):
    status, body = server.predict(prompt="x", input_image=png_uri, go_fast=False, acceleration="go really fast")
    assert body["status"] == "failed" and body["error"] == PREFIX + (
        'Invalid input: go_fast=false asks for acceleration="none", but acceleration is "go really fast"; '
        "send one of them"
    )
    status, body = server.predict(prompt="x", input_image=png_uri, go_fast="yes")
    assert body["status"] == "failed" and "go_fast must be true or false (or left out)" in body["error"]


def test_other_hosts_names_are_honoured_or_refused_never_dropped(server, png_uri):
    """fal's guidance_scale and enable_safety_checker, Together's steps: the same edit as this
    container's names; more than one image (num_outputs, num_images, n): refused with HTTP 422."""

    def edit(**inputs):
        status, body = server.predict(prompt="x", input_image=png_uri, seed=7, output_format="png", **inputs)
        assert body["status"] == "succeeded", body
        return decode_output(body["output"]), body["metrics"]

    assert edit(guidance_scale=6.0, num_inference_steps=6)[0] == edit(guidance=6.0, num_inference_steps=6)[0]
    assert edit(steps=6, acceleration="none")[1]["transformer_calls"] == 6
    status, body = server.predict(prompt="x", input_image=png_uri, steps=6, num_inference_steps=8)
    assert body["status"] == "failed" and "steps=6 asks for num_inference_steps=6" in body["error"]
    for name in ("num_outputs", "num_images", "n"):
        status, body = server.predict(prompt="x", input_image=png_uri, **{name: 4})
        assert status == 422 and name in str(body)


def test_every_default_in_the_schema_can_be_sent_back(server, png_uri):
    """What a client generated from /openapi.json sends: every optional input at the default the
    schema gives (no input is nullable, so none is sent as null); the edit runs."""
    status, schema = server.get("/openapi.json")
    props = schema["components"]["schemas"]["Input"]["properties"]
    defaults = {name: prop["default"] for name, prop in props.items() if "default" in prop}
    assert set(defaults) == set(props) - {"prompt", "input_image"}
    status, body = server.predict(prompt="x", input_image=png_uri, **{**defaults, "num_inference_steps": 4})
    assert status == 200 and body["status"] == "succeeded", body
    assert body["metrics"]["acceleration"] == "go fast" and 0 <= body["metrics"]["seed"] <= MAX_SEED


def test_a_jpeg_with_a_second_picture_and_jpeg_as_the_format(server):
    from tests.test_images import mpo_bytes

    status, body = server.predict(prompt="x", input_image=data_uri(mpo_bytes(), "image/jpeg"), num_inference_steps=4,
                                  output_format="jpeg")  # fmt: skip
    assert status == 200 and body["status"] == "succeeded", body
    assert Image.open(io.BytesIO(decode_output(body["output"]))).format == "JPEG"
