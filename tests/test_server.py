"""The real Cog HTTP server process on 127.0.0.1 with the tiny model, end to end."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from flux import sizes
from flux.lab.tiny import TINY_SIDE
from flux.request import MAX_SEED
from tests.cog_server import cog_server, data_uri, decode_output
from tests.conftest import image_bytes, random_image

INPUTS = [
    "prompt", "input_image", "aspect_ratio", "num_inference_steps", "guidance", "seed", "acceleration",
    "output_format", "output_quality", "disable_safety_checker", "lora_weights", "lora_strength",
    "extra_lora_weights", "extra_lora_strength", "reference_images", "multi_image_mode", "hf_api_token",
    "civitai_api_token",
]  # fmt: skip


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
    assert props["seed"]["nullable"] is True and "default" not in props["seed"]
    assert (props["seed"]["minimum"], props["seed"]["maximum"]) == (0, MAX_SEED)
    assert schemas["aspect_ratio"]["enum"] == list(sizes.ASPECT_RATIO_CHOICES)
    assert schemas["acceleration"]["enum"] == ["none", "go fast", "go really fast"]
    assert schemas["output_format"]["enum"] == ["webp", "jpg", "png"]
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
    expected_calls = {"none": 12, "go fast": 10, "go really fast": 8}[acceleration]
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
    with cog_server(flagging_weights, tmp_path) as flagged:
        status, body = flagged.predict(prompt="x", input_image=png_uri, num_inference_steps=4, seed=1)
        assert body["status"] == "failed" and body.get("output") is None
        assert "safety checker flagged" in body["error"]


@pytest.mark.parametrize("seed", [-1, MAX_SEED + 1, 2**63, 2**64])
def test_seeds_outside_the_generator_range_get_422_naming_seed(server, png_uri, seed):
    """These seeds used to alias others (-1 gave the image of 4294967295, 2**32 that of 0) or crash."""
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
    """What a client sees: coglet's own prefix, the error class, then the project's one-sentence message."""
    status, body = server.predict(prompt="\x00", input_image=png_uri, num_inference_steps=4, seed=1)
    prefix = "Prediction failed: Prediction failed: InputError: "
    assert body["error"].startswith(prefix), body["error"]
    message = body["error"][len(prefix) :]
    assert message.startswith("prompt is empty") and "Error" not in message


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
    assert status == 422 and "reference_images" in str(body)  # the schema's maxItems
    broken = data_uri(b"\x89PNG\r\n\x1a\nnot really", "image/png")
    status, body = server.predict(
        prompt="x", input_image=png_uri, reference_images=[png_uri, broken], num_inference_steps=4
    )
    assert body["status"] == "failed" and "reference_images[1] is not a readable image" in body["error"]
    status, body = server.predict(prompt="x", input_image=png_uri, num_inference_steps=4, seed=1)
    assert body["status"] == "succeeded"
