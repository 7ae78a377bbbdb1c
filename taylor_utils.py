"""TaylorSeer cache: pure tensor math, no knowledge of the model.

On computed steps the cache records the prediction and refreshes its finite-difference
derivatives; on skipped steps it forecasts the prediction with a truncated Taylor series
(see ``docs/method.md``):

    Y(s + k) ~= sum_{i=0..n} Y^(i)(s) * k^i / i!

Derivatives are estimated recursively from the previous computed step:

    d_current[0]   = Y
    d_current[i+1] = (d_current[i] - d_prev[i]) / window

A derivative of order i exists only once i + 1 computed steps have been seen.
The terms are held and accumulated in float32 (or the prediction's dtype where wider).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

ACCELERATION_LEVELS = ("none", "go fast", "go really fast")

# level -> (steps always computed at each end of a REFERENCE_STEPS schedule, pattern over the step
# index in between)
_LEVEL_PATTERNS: dict[str, tuple[int, tuple[bool, ...]]] = {
    "go fast": (4, (False, True)),
    "go really fast": (3, (False, True, False)),
}
REFERENCE_STEPS = 28
# at each end, at least two computed steps: the model changes the image most there, and two
# computed steps give the first finite difference
MIN_EDGE = 2


def edge_steps(level: str, num_steps: int) -> int:
    """Steps always computed at each end: the level's edge at 28 steps, and below 28 steps that edge
    scaled down with the schedule (so that a short schedule saves calls too), at least MIN_EDGE."""
    edge, _ = _LEVEL_PATTERNS[level]
    return max(MIN_EDGE, min(edge, round(edge * num_steps / REFERENCE_STEPS)))


def compute_step_map(level: str, num_steps: int) -> list[bool]:
    """Which steps run the transformer (True) and which are forecast (False).

    The first and last ``edge_steps`` are always computed: the model changes the image most
    there, and the first ones seed the finite differences; in between, the level's pattern.
    """
    if level not in ACCELERATION_LEVELS:
        raise ValueError(f"acceleration must be one of {', '.join(ACCELERATION_LEVELS)}; got {level!r}")
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1; got {num_steps}")
    if level == "none":
        return [True] * num_steps
    edge, pattern = edge_steps(level, num_steps), _LEVEL_PATTERNS[level][1]
    return [i < edge or i >= num_steps - edge or pattern[i % len(pattern)] for i in range(num_steps)]


def compute_step_count(level: str, num_steps: int) -> int:
    """Number of transformer calls a level makes at ``num_steps``."""
    return sum(compute_step_map(level, num_steps))


def _wide_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype == torch.float64 else torch.float32


@dataclass
class TaylorCache:
    """Finite-difference derivatives of one prediction, reset for every edit.

    ``position`` is the coordinate a step lives at: the step index (the method as
    published) or, for example, the timestep; the window and the forecast distance
    are measured in the same unit.
    """

    n_derivatives: int = 1
    # storage and accumulation dtype; None keeps float32 (float64 for float64 predictions)
    dtype: torch.dtype | None = None
    d_current: list[torch.Tensor | None] = field(default_factory=list)
    computed_steps: int = 0
    last_position: float | None = None

    def __post_init__(self) -> None:
        if self.n_derivatives < 0:
            raise ValueError(f"n_derivatives must be >= 0; got {self.n_derivatives}")
        self.reset()

    @property
    def order(self) -> int:
        return self.n_derivatives + 1

    def reset(self) -> None:
        self.d_current = [None] * self.order
        self.computed_steps = 0
        self.last_position = None

    def update(self, prediction: torch.Tensor, position: float) -> None:
        """Record a fully computed prediction made at ``position``.

        Only the latest derivatives are kept between steps (``order`` tensors); the
        previous ones are the current ones until this update replaces them.
        """
        value = prediction.detach().to(self.dtype or _wide_dtype(prediction.dtype))
        window = None if self.last_position is None else position - self.last_position
        if window is not None and window <= 0:
            raise ValueError(f"positions must increase; got {position} after {self.last_position}")
        d_prev = self.d_current
        current: list[torch.Tensor | None] = [None] * self.order
        current[0] = value
        # order i needs i + 1 computed steps: this one plus i earlier ones
        available = min(self.order, self.computed_steps + 1)
        for i in range(available - 1):
            current[i + 1] = (current[i] - d_prev[i]) / window
        self.d_current = current
        self.computed_steps += 1
        self.last_position = position

    def forecast(self, position: float) -> torch.Tensor:
        """Taylor forecast of the prediction at ``position`` from the latest computed step."""
        if self.computed_steps == 0:
            raise RuntimeError("the TaylorSeer cache has no computed step to forecast from")
        k = position - self.last_position
        result = self.d_current[0].clone()
        for i in range(1, self.order):
            term = self.d_current[i]
            if term is None:
                break
            result.add_(term, alpha=k**i / math.factorial(i))
        return result

    def nbytes(self) -> int:
        """Memory held by the cached tensors."""
        return sum(t.numel() * t.element_size() for t in self.d_current if t is not None)
