"""The API contract: the generated schema matches the committed snapshot; breaking changes are caught."""

from __future__ import annotations

import copy
import json

import pytest

from flux import request, sizes
from flux.cog_schema import (
    SNAPSHOT_PATH,
    UNREAD,
    contract_violations,
    openapi_schema,
    static_input_problems,
    static_inputs,
)


@pytest.fixture(scope="module")
def current():
    return openapi_schema()


@pytest.fixture(scope="module")
def snapshot():
    return json.loads(SNAPSHOT_PATH.read_text())


def test_generated_schema_matches_the_snapshot(current, snapshot):
    # Regenerate deliberately with: python scripts/openapi_schema.py --snapshot
    assert current == snapshot
    assert contract_violations(snapshot, current) == []


def test_every_input_has_a_description(current):
    for name, prop in current["components"]["schemas"]["Input"]["properties"].items():
        assert prop.get("description"), name


def test_no_input_claims_null_and_every_optional_one_has_a_default(current):
    """coglet validates with plain JSON Schema, which does not know OpenAPI's nullable: an input
    marked nullable would still refuse a JSON null. So none is: every optional input has a
    default a client can send back as it is."""
    schema = current["components"]["schemas"]["Input"]
    assert "nullable" not in json.dumps(schema)
    assert schema["required"] == ["prompt", "input_image"]
    assert all("default" in prop for name, prop in schema["properties"].items() if name not in schema["required"])
    assert schema["properties"]["seed"]["default"] == -1 and schema["properties"]["reference_images"]["default"] == []


def test_cog_build_reads_every_input_as_it_runs():
    """cog build generates the schema from predict.py's text: every Input() argument must be one it
    can read (a literal, or a name bound to one at the top of predict.py), and read the same."""
    assert static_input_problems() == []


def test_what_cog_build_cannot_read_is_caught():
    source = """
from flux.request import DEFAULT_STEPS
HELP = "a help text"
WRAPPED = (
    "a help text in parentheses"
)
class Predictor:
    def run(self, a: int = Input(description=f"from {DEFAULT_STEPS}", default=DEFAULT_STEPS, ge=4, le=10_000),
            b: str = Input(description="one" " two", choices=list(LEVELS), default="x"),
            c: str = Input(description=HELP, choices=["x", "y"], default="y", max_length=2**11),
            d: float = Input(description="esc\\aped", ge=-1, le=3.5, default=1.0),
            e: int = Input(description=WRAPPED, default=(3))): ...
"""
    read = static_inputs(source)
    assert read["a"] == {"description": UNREAD, "default": UNREAD, "ge": 4, "le": UNREAD}
    assert read["b"] == {"description": UNREAD, "choices": UNREAD, "default": "x"}
    assert read["c"] == {"description": "a help text", "choices": ["x", "y"], "default": "y", "max_length": UNREAD}
    assert read["d"] == {"description": "esc\\aped", "ge": -1, "le": 3.5, "default": 1.0}
    assert read["e"] == {"description": UNREAD, "default": UNREAD}


def test_the_declared_bounds_are_the_requests():
    """predict.py repeats flux/request.py's bounds as literals (for cog build); they are the same."""
    from cog._inspector import create_predictor

    f = create_predictor("predict", "Predictor").inputs
    assert f["prompt"].max_length == request.MAX_PROMPT_CHARS
    assert (
        f["aspect_ratio"].choices == list(sizes.ASPECT_RATIO_CHOICES) and f["aspect_ratio"].default == sizes.MATCH_INPUT
    )
    for name in ("num_inference_steps", "steps"):
        assert (f[name].ge, f[name].le, f[name].default) == (
            request.MIN_STEPS,
            request.MAX_STEPS,
            request.DEFAULT_STEPS,
        )
    for name in ("guidance", "guidance_scale"):
        assert (f[name].ge, f[name].le, f[name].default) == (
            request.MIN_GUIDANCE, request.MAX_GUIDANCE, request.DEFAULT_GUIDANCE
        )  # fmt: skip
    assert (f["seed"].ge, f["seed"].le, f["seed"].default) == (
        request.RANDOM_SEED,
        request.MAX_SEED,
        request.RANDOM_SEED,
    )
    assert f["acceleration"].choices == list(request.ACCELERATION_LEVELS)
    assert f["acceleration"].default == request.DEFAULT_ACCELERATION
    assert f["output_format"].choices == list(request.OUTPUT_FORMATS)
    assert (f["output_format"].default, f["output_quality"].default) == (
        request.DEFAULT_OUTPUT_FORMAT, request.DEFAULT_OUTPUT_QUALITY
    )  # fmt: skip
    assert f["multi_image_mode"].choices == list(request.MULTI_IMAGE_MODES)
    assert f["multi_image_mode"].default == request.DEFAULT_MULTI_IMAGE_MODE
    for name in ("lora_weights", "extra_lora_weights"):
        assert f[name].max_length == request.MAX_SOURCE_CHARS
    for name in ("lora_strength", "extra_lora_strength"):
        assert (f[name].ge, f[name].le) == (request.MIN_LORA_STRENGTH, request.MAX_LORA_STRENGTH)


def _altered(schema, change):
    altered = copy.deepcopy(schema)
    change(altered["components"]["schemas"])
    return altered


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda s: s["Input"]["properties"].pop("guidance"), "'guidance' was removed"),
        (
            lambda s: s["Input"]["properties"].update(cfg=s["Input"]["properties"].pop("guidance")),
            "'guidance' was removed",
        ),
        (lambda s: s["Input"]["properties"]["num_inference_steps"].update(type="number"), "changed type"),
        (lambda s: s["acceleration"]["enum"].remove("go really fast"), "lost choices"),
        (
            lambda s: (
                s["Input"]["properties"].update(mask={"type": "string", "description": "m", "x-order": 10}),
                s["Input"]["required"].append("mask"),
            ),
            "'mask' has no default",
        ),
        (lambda s: s["Input"]["properties"]["prompt"].pop("description"), "'prompt' has no description"),
        (lambda s: s["Output"].update(type="array"), "output changed"),
    ],
)
def test_breaking_changes_are_caught(snapshot, change, message):
    violations = contract_violations(snapshot, _altered(snapshot, change))
    assert any(message in v for v in violations), violations
