"""The sampling schedule: resolution-shifted sigmas of the flow-matching Euler sampler, as FLUX dev uses."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler


def calculate_shift(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """mu of the time shift: linear in the number of target tokens (0.5 at 256, 1.15 at 4096)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + base_shift - slope * base_seq_len


def sigmas_for(scheduler: FlowMatchEulerDiscreteScheduler, num_steps: int, image_seq_len: int) -> torch.Tensor:
    """(num_steps + 1,) float32 sigmas from 1 towards 0, shifted for ``image_seq_len`` target tokens.

    The scheduler's own shift function is used, so the schedule is the reference one.
    """
    config = scheduler.config
    mu = calculate_shift(
        image_seq_len,
        config.get("base_image_seq_len", 256),
        config.get("max_image_seq_len", 4096),
        config.get("base_shift", 0.5),
        config.get("max_shift", 1.15),
    )
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)
    return scheduler.sigmas.to(torch.float32).clone()


def first_step(num_steps: int, strength: float) -> int:
    """The step a partial edit starts at, as diffusers' img2img pipelines choose it: the last
    ``num_steps * strength`` steps are run (rounded up), from the input re-noised to that step's
    sigma. Strength 1 runs every step; 0.88 at 28 steps starts at step 3 (25 steps run); 0 runs none."""
    return int(max(num_steps - num_steps * strength, 0))
