"""An adaptive schedule: how many steps to forecast next, decided from how well the cache forecast
the step just computed.

At each computed step the loop can ask the cache for its forecast of that step before using the
transformer's prediction, so the forecast's relative error ``e`` at distance ``d`` (steps since the
previous computed one) is known at no extra transformer cost. A Taylor forecast of order ``n``
errs about in proportion to ``distance ** (n + 1)``, so the plan forecasts the next ``s`` steps for
the largest ``s`` (at most ``max_skip``) with ``e * (s / d) ** (n + 1) <= tolerance``; a step whose
forecast would have been poor is followed by computed steps until the forecasts recover.

With ``max_calls`` the plan never makes more transformer calls than that (a fixed level's count):
it keeps the calls the last steps need, and spends the rest no faster than evenly over the steps
left, so a hard edit forecasts further apart rather than running out of calls early.

A quality-lab candidate (``overrides(AdaptivePlan(...))``), measured against the fixed level maps
by ``flux.lab.evaluate``'s schedule curve; not a product level unless that measurement says it
beats them at equal calls. It reaches the product's loop only through what the lab passes in: the
plan is the loop's step map (read once per step, in order), and ``MeasuringCache`` wraps the cache
to measure each forecast error before the cache records the computed prediction.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

import taylor_utils
from flux.edit import DEFAULT_N_DERIVATIVES, ForecastCache, LabOverrides


@dataclass
class AdaptivePlan:
    num_steps: int
    tolerance: float
    # steps always computed at each end, as the fixed levels do: the first ones seed the differences
    edge: int = 3
    max_skip: int = 3
    error_order: int = DEFAULT_N_DERIVATIVES + 1
    max_calls: int | None = None
    next_computed: int = 0
    calls: int = 0
    errors: list[tuple[int, float]] = field(default_factory=list)

    def __len__(self) -> int:
        return self.num_steps

    def __getitem__(self, step: int) -> bool:
        return self.computes(step)

    def computes(self, step: int) -> bool:
        if step < self.edge or step >= self.num_steps - self.edge:
            compute = True
        else:
            budget = self._middle_budget()
            compute = step >= self.next_computed and (budget is None or budget > 0)
        self.calls += compute
        return compute

    def forecasts_after(self, step: int) -> bool:
        return step < self.num_steps - self.edge - 1

    def observe(self, step: int, forecast_error: float, distance: int) -> None:
        self.errors.append((step, forecast_error))
        skip = 0
        while skip < self.max_skip and forecast_error * ((skip + 1) / distance) ** self.error_order <= self.tolerance:
            skip += 1
        left = self.num_steps - self.edge - 1 - step  # forecastable steps after this one
        budget = self._middle_budget()
        if left > 0 and budget is not None:
            # never spend the calls left faster than evenly over the steps left
            skip = max(skip, -(-left // budget) - 1 if budget > 0 else left)
        self.next_computed = step + skip + 1

    def _middle_budget(self) -> int | None:
        """Calls left for the steps between the edges (None: no ceiling)."""
        if self.max_calls is None:
            return None
        return self.max_calls - self.calls - self.edge


class MeasuringCache:
    """A cache that, before recording a computed prediction, tells the plan how far off its own
    forecast of that step was (relative L2 error, at the distance from the step it last recorded).
    Only forecasts from a step after which the plan still forecasts are measured."""

    def __init__(self, inner: ForecastCache, plan: AdaptivePlan):
        self.inner, self.plan, self.last = inner, plan, None

    def reset(self) -> None:
        self.inner.reset()
        self.last = None

    def update(self, prediction: torch.Tensor, position: float) -> None:
        step = int(position)
        if self.last is not None:
            actual = prediction.float()
            error = (self.inner.forecast(position) - actual).norm() / actual.norm()
            self.plan.observe(step, float(error), step - self.last)
        self.last = step if self.plan.forecasts_after(step) else None
        self.inner.update(prediction, position)

    def forecast(self, position: float) -> torch.Tensor:
        return self.inner.forecast(position)

    def nbytes(self) -> int:
        return self.inner.nbytes()


def overrides(plan: AdaptivePlan, cache: ForecastCache | None = None, **fields) -> LabOverrides:
    """The lab overrides that run ``plan`` in the product's loop, with ``cache`` (default TaylorSeer) measured."""
    inner = cache or taylor_utils.TaylorCache(n_derivatives=DEFAULT_N_DERIVATIVES)
    return LabOverrides(cache=MeasuringCache(inner, plan), step_map=plan, **fields)
