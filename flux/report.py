"""What one edit reports and returns, and the hooks a caller may give its loop: the types the edit,
the runtimes and the pipeline share (none of them imports another for these)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from PIL import Image


@dataclass
class EditReport:
    """What an edit did: calls, forecasts and time per phase (seconds)."""

    seed: int
    acceleration: str
    num_steps: int
    transformer_calls: int = 0
    forecast_steps: list[int] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)  # per phase: encode, denoise, decode, ...
    within_denoise: dict[str, float] = field(default_factory=dict)  # seconds in the transformer and in forecasts
    cache_bytes: int = 0
    loras: list[dict] = field(default_factory=list)  # the LoRAs merged for this edit (set by the pipeline)
    keep_unedited: dict | None = None  # what keep_unedited did (set by the pipeline)
    mask: dict | None = None  # where a masked edit ran and what it covered (set by the pipeline)

    @property
    def transformer_seconds(self) -> float:
        return self.within_denoise.get("transformer", 0.0)

    @property
    def forecast_seconds(self) -> float:
        return self.within_denoise.get("forecast", 0.0)

    def all_seconds(self) -> dict[str, float]:
        """Seconds per phase, and within denoise those in the transformer and in forecasts."""
        return {**self.seconds, "transformer": self.transformer_seconds, "forecast": self.forecast_seconds}

    def metrics(self) -> dict[str, object]:
        """What a prediction reports to its caller (Cog's metrics), by name."""
        metrics: dict[str, object] = {"seed": self.seed, "acceleration": self.acceleration, "steps": self.num_steps,
                                      "transformer_calls": self.transformer_calls}  # fmt: skip
        metrics.update({f"seconds.{phase}": round(seconds, 4) for phase, seconds in self.all_seconds().items()})
        if self.loras:
            metrics["loras"] = self.loras
        if self.keep_unedited:
            metrics["keep_unedited"] = self.keep_unedited
        if self.mask is not None:
            metrics["mask"] = self.mask
        return metrics

    def summary(self) -> str:
        phases = ", ".join(f"{k} {v:.2f}s" for k, v in self.all_seconds().items())
        return (
            f"seed {self.seed}, acceleration {self.acceleration!r}: {self.transformer_calls} transformer calls, "
            f"{len(self.forecast_steps)} forecast steps of {self.num_steps}; {phases}"
        )


@dataclass
class EditResult:
    image: Image.Image
    latents: torch.Tensor
    report: EditReport


StepCallback = Callable[[int, int, bool], None]
# What a caller may do to the state after each step (a masked edit puts the source's latents back
# outside its mask): (step index, the latents after it, the sigma they are at) -> the latents the
# loop goes on from, or None to go on from them unchanged.
LatentHook = Callable[[int, torch.Tensor, float], "torch.Tensor | None"]
