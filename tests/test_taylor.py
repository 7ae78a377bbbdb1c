"""TaylorSeer: the step maps, the cache math, and the cache wired into the loop."""

from __future__ import annotations

import math
import random

import pytest
import torch

import taylor_utils
from flux import schedule
from flux.edit import (
    DEFAULT_N_DERIVATIVES,
    LabOverrides,
    edit,
    encode_image,
    encode_prompt,
    initial_noise,
    position_ids,
)
from flux.lab import forecasters
from flux.lab.plans import direct, lab_plan
from flux.request import DEFAULT_GUIDANCE, MAX_STEPS, MIN_STEPS
from tests.conftest import random_image

LEVELS = taylor_utils.ACCELERATION_LEVELS


def test_calls_at_28_steps():
    assert [taylor_utils.compute_step_count(level, 28) for level in LEVELS] == [28, 18, 13]


@pytest.mark.parametrize("level", LEVELS)
def test_maps_for_every_step_count(level):
    for steps in range(MIN_STEPS, MAX_STEPS + 1):
        step_map = taylor_utils.compute_step_map(level, steps)
        assert len(step_map) == steps
        assert all(step_map[:2]) and all(step_map[-2:])  # at least two computed steps at each end
        if level != "none" and steps >= 6:
            assert not all(step_map)  # every level saves calls from 6 steps (go really fast from 5)


def test_edges_scale_down_with_short_schedules_and_stay_at_and_above_28():
    """At 28 steps the maps of the method (first and last 4 or 3 computed); below, the edges shrink
    with the schedule, so that 8 steps cost 6 and 5 calls rather than 8 and 7; above, as at 28."""
    counts = {
        steps: [taylor_utils.compute_step_count(level, steps) for level in LEVELS[1:]] for steps in (8, 12, 16, 20)
    }
    assert counts == {8: [6, 5], 12: [8, 6], 16: [10, 8], 20: [13, 9]}
    go_fast = taylor_utils.compute_step_map("go fast", 28)
    assert all(go_fast[:4]) and all(go_fast[-4:]) and go_fast[4:24] == [False, True] * 10
    for steps in range(29, MAX_STEPS + 1):
        assert [taylor_utils.edge_steps(level, steps) for level in LEVELS[1:]] == [4, 3]
    assert taylor_utils.compute_step_count("go really fast", 5) == 4


def test_unknown_level_is_refused():
    with pytest.raises(ValueError, match="acceleration must be one of"):
        taylor_utils.compute_step_map("go ludicrous", 28)


def _cache_run(values, positions, n, step_map):
    """Feed values at computed positions, forecast the rest; returns the forecasts by index."""
    cache = taylor_utils.TaylorCache(n_derivatives=n)
    out = {}
    for i, compute in enumerate(step_map):
        if compute:
            cache.update(values[i], positions[i])
        else:
            out[i] = cache.forecast(positions[i])
    return out


@pytest.mark.parametrize("trial", range(25))
def test_constant_and_linear_trajectories_are_forecast_exactly(trial):
    rng = random.Random(trial)
    steps = rng.randint(MIN_STEPS, MAX_STEPS)
    level = rng.choice(LEVELS[1:])
    n = rng.randint(1, 3)
    step_map = taylor_utils.compute_step_map(level, steps)
    torch.manual_seed(trial)
    a, b = torch.randn(2, 5, 7, dtype=torch.float64)
    # positions: step indices, or an uneven increasing coordinate (timestep units)
    positions = list(range(steps)) if trial % 2 else sorted(rng.uniform(0, 1000) for _ in range(steps))
    for slope in (0.0, 1.0):
        values = [a + slope * p * b for p in positions]
        for i, forecast in _cache_run(values, positions, n, step_map).items():
            torch.testing.assert_close(forecast, values[i], rtol=1e-9, atol=1e-9)


def _reference_forecast(history, n, k):
    """The formula of docs/method.md, evaluated independently: finite differences over the
    computed steps' (position, value) history, then the truncated Taylor series."""
    derivs_prev = None
    derivs = None
    last_pos = None
    for pos, value in history:
        new = [value]
        if derivs is not None:
            window = pos - last_pos
            for i in range(n):
                if i < len(derivs):
                    new.append((new[i] - derivs[i]) / window)
        derivs_prev, derivs, last_pos = derivs, new[: n + 1], pos
    del derivs_prev
    return sum(d * (k**i) / math.factorial(i) for i, d in enumerate(derivs))


@pytest.mark.parametrize("trial", range(20))
def test_higher_degree_forecast_matches_the_formula(trial):
    rng = random.Random(100 + trial)
    steps = rng.randint(MIN_STEPS, MAX_STEPS)
    level = rng.choice(LEVELS[1:])
    n = rng.randint(0, 3)
    step_map = taylor_utils.compute_step_map(level, steps)
    torch.manual_seed(trial)
    coeffs = torch.randn(4, 3, dtype=torch.float64)
    values = [sum(coeffs[d] * (i / steps) ** d for d in range(4)) for i in range(steps)]
    history = []
    cache = taylor_utils.TaylorCache(n_derivatives=n)
    for i, compute in enumerate(step_map):
        if compute:
            cache.update(values[i], float(i))
            history.append((float(i), values[i]))
        else:
            expected = _reference_forecast(history, n, i - history[-1][0])
            torch.testing.assert_close(cache.forecast(float(i)), expected, rtol=1e-9, atol=1e-12)


def test_derivatives_appear_as_computed_steps_accumulate():
    cache = taylor_utils.TaylorCache(n_derivatives=2)
    cache.update(torch.ones(3), 0.0)
    assert [d is None for d in cache.d_current] == [False, True, True]
    cache.update(torch.ones(3) * 2, 1.0)
    assert [d is None for d in cache.d_current] == [False, False, True]
    cache.update(torch.ones(3) * 4, 2.0)
    assert all(d is not None for d in cache.d_current)
    torch.testing.assert_close(cache.d_current[2], torch.ones(3))


def test_terms_are_held_in_fp32_for_bf16_predictions():
    cache = taylor_utils.TaylorCache(n_derivatives=2)
    for i in range(3):
        cache.update(torch.full((4,), float(i), dtype=torch.bfloat16), float(i))
    assert all(d.dtype == torch.float32 for d in cache.d_current)
    assert cache.forecast(3.0).dtype == torch.float32


def test_cache_holds_at_most_order_predictions():
    cache = taylor_utils.TaylorCache(n_derivatives=2)
    prediction = torch.zeros(10, 64)
    for i in range(6):
        cache.update(prediction, float(i))
    assert cache.nbytes() == 3 * prediction.numel() * 4
    cache.reset()
    assert cache.nbytes() == 0 and cache.computed_steps == 0


def _count_calls(components, run):
    calls = []
    handle = components.transformer.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        result = run()
    finally:
        handle.remove()
    return len(calls), result


def _settings(**kw) -> dict:
    base = dict(prompt="flip it", width=32, height=32, seed=3, num_steps=28)
    base.update(kw)
    return base


def _plan(components, image, settings):
    """The plan of ``settings``, with the conditioning image kept at its own size."""
    return lab_plan(components, image, **settings, condition=image.size)


def _edit(components, image, settings, cache=None):
    return _edit_with(components, image, LabOverrides(cache=cache), settings)


def _edit_with(components, image, lab, settings=None):
    plan = _plan(components, image, settings or _settings())
    return edit(components, image, plan, lab=lab, transformer=direct(components))


def test_calls_counted_on_the_model_at_28_steps(components):
    image = random_image(32, 32)
    counts = [
        _count_calls(components, lambda lv=level: _edit(components, image, _settings(acceleration=lv)))[0]
        for level in LEVELS
    ]
    assert counts == [28, 18, 13]


def test_calls_equal_the_map_for_every_step_count(components):
    image = random_image(16, 16)
    for level in LEVELS:
        for steps in range(MIN_STEPS, MAX_STEPS + 1):
            settings = _settings(acceleration=level, num_steps=steps, width=16, height=16)
            calls, result = _count_calls(components, lambda s=settings: _edit(components, image, s))
            step_map = taylor_utils.compute_step_map(level, steps)
            assert calls == sum(step_map) == result.report.transformer_calls
            assert result.report.forecast_steps == [i for i, c in enumerate(step_map) if not c]


def test_none_is_bit_identical_to_a_loop_without_cache(components):
    """An independent plain Euler loop (no cache, no maps) gives the same bits as "none"."""
    c = components
    image = random_image(48, 32, seed=5)
    settings = _settings(acceleration="none", num_steps=10, width=48, height=32)
    ours = _edit(c, image, settings).latents
    with torch.inference_mode():
        embeds, pooled, text_ids = encode_prompt(c, settings["prompt"])
        image_latents, image_ids = encode_image(c, image)
        latents = initial_noise(c, settings["seed"], 48, 32)
        ids = torch.cat([position_ids(2, 3, 0.0, c.device, c.dtype), image_ids])
        sigmas = schedule.sigmas_for(c.scheduler, 10, latents.shape[1])
        guidance = torch.full([1], DEFAULT_GUIDANCE)
        for i in range(10):
            t = (sigmas[i] * 1000.0).expand(1)
            out = c.transformer(
                hidden_states=torch.cat([latents, image_latents], 1), timestep=t / 1000, guidance=guidance,
                pooled_projections=pooled, encoder_hidden_states=embeds, txt_ids=text_ids, img_ids=ids,
                return_dict=False,
            )[0][:, : latents.shape[1]]  # fmt: skip
            latents = (latents.float() + (sigmas[i + 1].item() - sigmas[i].item()) * out.float()).to(latents.dtype)
    assert torch.equal(ours, latents)


def test_report_and_cache_memory(components):
    image = random_image(32, 32)
    result = _edit(components, image, _settings(acceleration="go fast"))
    report = result.report
    tokens = result.latents.shape[1] * result.latents.shape[2]
    assert report.cache_bytes == 3 * tokens * 4  # order x the target prediction (fp32), conditioning tokens excluded
    assert report.transformer_seconds > 0 and report.forecast_seconds > 0
    assert set(report.seconds) == {"encode", "denoise", "decode"}


def test_levels_differ_but_stay_close_to_none(components):
    image = random_image(32, 32)
    none = _edit(components, image, _settings(acceleration="none")).latents
    fast = _edit(components, image, _settings(acceleration="go fast")).latents
    assert not torch.equal(none, fast)
    assert torch.isfinite(fast).all()


@pytest.mark.parametrize("forecaster", forecasters.FORECASTERS)
@pytest.mark.parametrize("units", forecasters.UNITS)
def test_lab_caches_run_through_the_loop(components, forecaster, units):
    settings = _settings(acceleration="go really fast")
    cache = forecasters.make_cache(components, 28, 32, 32, forecaster=forecaster, n_derivatives=2, units=units)
    result = _edit(components, random_image(32, 32), settings, cache=cache)
    assert result.report.transformer_calls == 13 and torch.isfinite(result.latents).all()


def test_the_default_cache_is_taylorseer_of_the_default_order(components):
    """The loop's default is the product's cache: passing it explicitly changes no bit."""
    image, settings = random_image(32, 32), _settings(acceleration="go fast")
    explicit = taylor_utils.TaylorCache(n_derivatives=DEFAULT_N_DERIVATIVES)
    assert torch.equal(_edit(components, image, settings).latents, _edit(components, image, settings, explicit).latents)


def test_timestep_units_are_the_shifted_schedule(components):
    positions = forecasters.timestep_positions(components, 28, 32, 32)
    sigmas = schedule.sigmas_for(components.scheduler, 28, 4)
    assert positions == [1000.0 * (1.0 - s) for s in sigmas.tolist()]
    assert positions[0] == 0.0 and all(b > a for a, b in zip(positions, positions[1:], strict=False))


@pytest.mark.parametrize("trial", range(10))
def test_newton_interpolation_is_exact_for_polynomials_up_to_its_order(trial):
    rng = random.Random(500 + trial)
    steps = rng.randint(MIN_STEPS, MAX_STEPS)
    n = rng.randint(0, 3)
    step_map = taylor_utils.compute_step_map(rng.choice(LEVELS[1:]), steps)
    torch.manual_seed(trial)
    coeffs = torch.randn(n + 1, 4, dtype=torch.float64)
    positions = sorted(rng.uniform(0, 1) for _ in range(steps))
    values = [sum(coeffs[d] * p**d for d in range(n + 1)) for p in positions]
    cache = forecasters.NewtonCache(n_derivatives=n)
    for i, compute in enumerate(step_map):
        if compute:
            cache.update(values[i], positions[i])
        elif cache.computed_steps > n:
            torch.testing.assert_close(cache.forecast(positions[i]), values[i], rtol=1e-6, atol=1e-8)


def test_adaptive_plan_decides_from_the_measured_forecast_error():
    from flux.lab.adaptive import AdaptivePlan

    plan = AdaptivePlan(num_steps=20, tolerance=0.01, edge=3, max_skip=3, error_order=3)
    assert all(plan.computes(i) for i in range(3)) and plan.computes(17) and plan.computes(19)
    plan.observe(2, 0.001, 1)  # 0.001 * 3**3 = 0.027 > tolerance; 0.001 * 2**3 = 0.008 <= it: skip 2
    assert (plan.computes(3), plan.computes(4), plan.computes(5)) == (False, False, True)
    plan.observe(5, 0.5, 3)  # a poor forecast: compute the next step
    assert plan.computes(6)
    plan.observe(6, 0.0, 1)  # a perfect one: skip as far as allowed
    assert [plan.computes(i) for i in range(7, 11)] == [False, False, False, True]
    assert plan.errors == [(2, 0.001), (5, 0.5), (6, 0.0)]
    assert plan.forecasts_after(15) and not plan.forecasts_after(16)


def test_adaptive_plan_keeps_within_its_call_ceiling():
    """Held to a level's calls, the plan keeps the last steps' calls and paces the rest evenly, even
    when every forecast is poor."""
    from flux.lab.adaptive import AdaptivePlan

    def computed_steps(plan: AdaptivePlan) -> list[int]:
        steps = []
        for i in range(plan.num_steps):
            if plan.computes(i):
                if steps:
                    plan.observe(i, 1.0, i - steps[-1])
                steps.append(i)
        return steps

    assert computed_steps(AdaptivePlan(20, tolerance=0.0)) == list(range(20))
    assert computed_steps(AdaptivePlan(20, tolerance=0.0, max_calls=10)) == [0, 1, 2, 6, 10, 13, 16, 17, 18, 19]
    assert computed_steps(AdaptivePlan(20, tolerance=0.0, max_calls=7)) == [0, 1, 2, 16, 17, 18, 19]
    # the ceiling never adds calls: a plan that forecasts well stays under it
    assert len(computed_steps(AdaptivePlan(20, tolerance=1e9, max_calls=10))) < 10


def test_adaptive_plan_in_the_loop(components):
    """Tolerance 0 computes every step and gives "none" bit for bit; a large one forecasts as far as
    allowed; calls never grow with the tolerance, and each call is counted on the model."""
    from flux.lab.adaptive import AdaptivePlan, overrides

    image = random_image(32, 32)
    none = _edit(components, image, _settings(acceleration="none")).latents
    calls = []
    for tolerance in (0.0, 0.01, 0.1, 1e9):
        plan = AdaptivePlan(28, tolerance)
        lab = overrides(plan)
        counted, result = _count_calls(components, lambda p=lab: _edit_with(components, image, p))
        assert counted == result.report.transformer_calls
        calls.append(counted)
        if tolerance == 0.0:
            # measured at every step the cache could have forecast (from step 1 to the last one that
            # needs the cache, 24: steps 25 to 27 are computed whatever the forecasts)
            assert torch.equal(result.latents, none) and [s for s, _ in plan.errors] == list(range(1, 25))
    assert calls == sorted(calls, reverse=True) and calls[0] == 28
    # 3 computed at each end; in between, 3 forecast then 1 computed (steps 6, 10, ..., 22)
    assert calls[-1] == 3 + len(range(6, 25, 4)) + 3
