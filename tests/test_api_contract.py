"""The API contract: the generated schema matches the committed snapshot; breaking changes are caught."""

from __future__ import annotations

import copy
import json

import pytest

from flux import request
from flux.lab.cog_schema import (
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


def test_the_declared_inputs_are_the_requests():
    """predict.py repeats flux/request.py's INPUTS as literals (for cog build): the same names,
    defaults, bounds, choices and lengths."""
    from cog._inspector import create_predictor

    declared = create_predictor("predict", "Predictor").inputs
    assert set(declared) == set(request.INPUTS)
    for name, spec in request.INPUTS.items():
        field = declared[name]
        default = field.default.get_secret_value() if hasattr(field.default, "get_secret_value") else field.default
        if spec.default is not None:
            assert default == (list(spec.default) if isinstance(spec.default, tuple) else spec.default), name
        if spec.low is not None and name != "reference_images":  # a count, not a value: checked by the request
            assert (field.ge, field.le) == (spec.low, spec.high), name
        assert (field.choices or []) == list(spec.choices), name
        assert field.max_length == spec.max_length, name


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
                s["Input"]["properties"].update(depth_map={"type": "string", "description": "m", "x-order": 10}),
                s["Input"]["required"].append("depth_map"),
            ),
            "'depth_map' has no default",
        ),
        (lambda s: s["Input"]["properties"]["prompt"].pop("description"), "'prompt' has no description"),
        (lambda s: s["Output"].update(type="array"), "output changed"),
    ],
)
def test_breaking_changes_are_caught(snapshot, change, message):
    violations = contract_violations(snapshot, _altered(snapshot, change))
    assert any(message in v for v in violations), violations
