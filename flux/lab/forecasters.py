"""The quality lab's alternatives to the product's forecast, each a cache the edit loop accepts
through ``flux.edit.LabOverrides``: Newton interpolation, and positions in timestep units.

The loop hands a cache the step index as the position; ``TimestepUnits`` maps it to the timestep
(1000 * (1 - sigma)), which is uneven under the shifted schedule.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

import taylor_utils
from flux import schedule, sizes
from flux.loading import Components

FORECASTERS = ("taylor", "newton")
UNITS = ("steps", "timesteps")


@dataclass
class NewtonCache:
    """Extrapolation through the last ``n_derivatives + 1`` computed predictions (Newton's divided
    differences on their actual positions): exact for trajectories that are polynomials of degree
    up to ``n_derivatives``, where TaylorSeer's backward differences are only first-order accurate.
    A candidate improvement measured by the quality lab, not the product's method.
    """

    n_derivatives: int = 1
    dtype: torch.dtype | None = None
    points: list[tuple[float, torch.Tensor]] = field(default_factory=list)
    computed_steps: int = 0

    @property
    def order(self) -> int:
        return self.n_derivatives + 1

    def reset(self) -> None:
        self.points = []
        self.computed_steps = 0

    def update(self, prediction: torch.Tensor, position: float) -> None:
        if self.points and position <= self.points[-1][0]:
            raise ValueError(f"positions must increase; got {position} after {self.points[-1][0]}")
        wide = torch.float64 if prediction.dtype == torch.float64 else torch.float32
        value = prediction.detach().to(self.dtype or wide)
        self.points = [*self.points, (position, value)][-self.order :]
        self.computed_steps += 1

    def forecast(self, position: float) -> torch.Tensor:
        if not self.points:
            raise RuntimeError("the cache has no computed step to forecast from")
        # Lagrange form of the interpolating polynomial, evaluated at ``position``
        xs = [x for x, _ in self.points]
        result = torch.zeros_like(self.points[0][1])
        for j, (xj, yj) in enumerate(self.points):
            weight = 1.0
            for m, xm in enumerate(xs):
                if m != j:
                    weight *= (position - xm) / (xj - xm)
            result.add_(yj, alpha=weight)
        return result

    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for _, v in self.points)


@dataclass
class TimestepUnits:
    """A cache whose positions are timesteps: the loop's step index i becomes ``positions[i]``."""

    cache: taylor_utils.TaylorCache | NewtonCache
    positions: list[float]

    def reset(self) -> None:
        self.cache.reset()

    def update(self, prediction: torch.Tensor, position: float) -> None:
        self.cache.update(prediction, self.positions[int(position)])

    def forecast(self, position: float) -> torch.Tensor:
        return self.cache.forecast(self.positions[int(position)])

    def nbytes(self) -> int:
        return self.cache.nbytes()


def timestep_positions(c: Components, num_steps: int, width: int, height: int) -> list[float]:
    """1000 * (1 - sigma) at each step of the schedule the edit will use for a width x height output."""
    sigmas = schedule.sigmas_for(c.scheduler, num_steps, (width // sizes.MULTIPLE) * (height // sizes.MULTIPLE))
    return [1000.0 * (1.0 - s) for s in sigmas.tolist()]


def make_cache(
    c: Components,
    num_steps: int,
    width: int,
    height: int,
    forecaster: str = "taylor",
    n_derivatives: int = 2,
    units: str = "steps",
    dtype: torch.dtype | None = None,
):
    """A cache for the loop: TaylorSeer (the product's) or Newton, in step or timestep units."""
    if forecaster not in FORECASTERS:
        raise ValueError(f"forecaster must be one of {', '.join(FORECASTERS)}; got {forecaster!r}")
    if units not in UNITS:
        raise ValueError(f"units must be one of {', '.join(UNITS)}; got {units!r}")
    kind = taylor_utils.TaylorCache if forecaster == "taylor" else NewtonCache
    cache = kind(n_derivatives=n_derivatives, dtype=dtype)
    if units == "timesteps":
        return TimestepUnits(cache, timestep_positions(c, num_steps, width, height))
    return cache
