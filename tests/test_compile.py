"""The shape policy: after setup(), no request compiles anything, whatever its sizes and settings,
and every transformer call runs through the compiled graph (never an eager fallback)."""

from __future__ import annotations

import random

import pytest
import torch
import torch._dynamo

import taylor_utils
from flux import sizes
from flux.config import FastPathConfig
from flux.edit import edit
from flux.fast import compile_transformer, warm_up_sizes
from flux.lab.plans import direct, lab_plan
from flux.loading import load_components
from tests.conftest import random_image
from tests.counting import COUNTING
from tests.test_predict import DEFAULTS, make_predictor


@pytest.fixture
def compiled_predictor(tiny_weights, tmp_path, monkeypatch):
    torch._dynamo.reset()
    monkeypatch.setenv("FLUX_COMPILE", "1")
    monkeypatch.setenv("FLUX_COMPILE_BACKEND", "flux_test_counting")
    monkeypatch.setenv("FLUX_OUTPUT_DIR", str(tmp_path / "outputs"))
    predictor = make_predictor(tiny_weights, monkeypatch)
    yield predictor
    torch._dynamo.reset()


def _requests(rng: random.Random) -> list[dict]:
    """Every explicit aspect ratio, and match_input_image at extreme, tiny and random input sizes,
    with seed, guidance, prompt, level and step count varied too."""
    inputs = [(1, 1), (4000, 300), (300, 4000), (5000, 40), (16, 16), (1023, 1025)]
    inputs += [(rng.randint(8, 2500), rng.randint(8, 2500)) for _ in range(3)]
    requests = [dict(aspect_ratio=sizes.MATCH_INPUT, size=size) for size in inputs]
    requests += [
        dict(aspect_ratio=ratio, size=(rng.randint(8, 1500), rng.randint(8, 1500))) for ratio in sizes.ASPECT_RATIOS
    ]
    for i, request in enumerate(requests):
        request.update(
            seed=rng.randint(0, 2**32 - 1), guidance=rng.uniform(0, 10), prompt=f"edit number {i}",
            acceleration=taylor_utils.ACCELERATION_LEVELS[i % 3], num_inference_steps=rng.choice([4, 5, 6]),
        )  # fmt: skip
    return requests


def test_no_request_compiles_and_every_call_is_compiled(compiled_predictor, tmp_path):
    predictor = compiled_predictor
    assert predictor.model.runtime.decided.compiled.shapes == "dynamic"
    assert "warm_up" in predictor.model.seconds
    graphs_after_setup = COUNTING.graphs
    assert graphs_after_setup >= 1
    requests = _requests(random.Random(14))
    assert len(requests) >= 20
    output_sizes = set()
    for request in requests:
        path = tmp_path / "in.png"
        random_image(*request.pop("size"), seed=request["seed"] % 1000).save(path)
        runs_before = COUNTING.runs
        with torch._dynamo.config.patch(error_on_recompile=True):
            out = predictor.predict(input_image=path, **{**DEFAULTS, "disable_safety_checker": True, **request})
        calls = taylor_utils.compute_step_count(request["acceleration"], request["num_inference_steps"])
        # every transformer call ran the compiled graph (at least once: one graph, or its pieces)
        assert COUNTING.runs - runs_before >= calls
        assert COUNTING.graphs == graphs_after_setup, f"a request compiled a graph: {request}"
        from PIL import Image

        with Image.open(out) as image:
            output_sizes.add(image.size)
    assert len(output_sizes) >= 10  # many distinct token counts went through the one graph


def test_static_policy_compiles_per_size_which_is_why_it_is_not_the_default(tiny_weights):
    """The baseline the GPU check measures: a new size is a new graph, compiled in the request."""
    c = load_components(tiny_weights)
    torch._dynamo.reset()
    before = COUNTING.graphs
    compile_transformer(
        c.transformer, FastPathConfig.defaults(compile_backend="flux_test_counting", compile_shapes="static")
    )
    settings = dict(prompt="x", seed=1, num_steps=4)
    for width, height in [(32, 32), (48, 32), (32, 64)]:
        image = random_image(width, height)
        plan = lab_plan(c, image, width=width, height=height, **settings, condition=(width, height))
        edit(c, image, plan, transformer=direct(c))
    assert COUNTING.graphs - before == 3
    torch._dynamo.reset()


def test_warm_up_sizes_are_two_token_counts_at_the_model_side():
    square, wide = warm_up_sizes(1024)
    assert square == (1024, 1024) and wide == sizes.output_size("16:9", 1, 1)
    assert warm_up_sizes(64) == [sizes.output_size(r, 1, 1, 64) for r in ("1:1", "16:9")]


def test_inductor_compiles_real_code_at_two_sizes_and_matches_eager(tiny_weights):
    """Real code generation on the CPU (inductor, dynamic shapes): two sizes, one graph, output
    equal to the eager transformer within 1e-4 (fp32)."""
    c = load_components(tiny_weights)
    eager = {}
    cases = [(48, 32), (32, 64)]
    settings = dict(prompt="make it red", seed=3, num_steps=4, acceleration="none")
    for width, height in cases:
        image = random_image(width, height, seed=width)
        plan = lab_plan(c, image, width=width, height=height, **settings, condition=(width, height))
        eager[(width, height)] = edit(c, image, plan, transformer=direct(c)).latents
    torch._dynamo.reset()
    frames_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compile_transformer(c.transformer, FastPathConfig.defaults(compile_backend="inductor"))
    for i, (width, height) in enumerate(cases):
        image = random_image(width, height, seed=width)
        plan = lab_plan(c, image, width=width, height=height, **settings, condition=(width, height))
        # the first size compiles; the second must run on what was compiled
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            compiled = edit(c, image, plan, transformer=direct(c)).latents
        assert (compiled - eager[(width, height)]).abs().max().item() <= 1e-4
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - frames_before >= 1
    assert c.transformer._compiled_call_impl is not None
    torch._dynamo.reset()
