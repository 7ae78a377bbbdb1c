"""The API contract: the generated schema matches the committed snapshot; breaking changes are caught."""

from __future__ import annotations

import copy
import json

import pytest

from flux.cog_schema import SNAPSHOT_PATH, contract_violations, openapi_schema


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


def test_seed_is_optional(current):
    schema = current["components"]["schemas"]["Input"]
    assert "seed" not in schema["required"]
    assert schema["properties"]["seed"]["nullable"] is True


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
