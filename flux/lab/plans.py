"""The lab's and the tests' way to an edit: a plan with the request's defaults and the conditioning
layout decided from the images as a request's is (or pinned: ``condition``, ``reference_base``),
and the transformer called directly in this process."""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image

from flux import sizes
from flux.edit import EditPlan, Sampling, TransformerCall, base_side
from flux.loading import Components
from flux.request import (
    DEFAULT_ACCELERATION,
    DEFAULT_GUIDANCE,
    DEFAULT_MULTI_IMAGE_MODE,
    DEFAULT_STEPS,
    DEFAULT_STRENGTH,
)
from flux.runtime import LocalRuntime


def lab_plan(
    components: Components,
    image: Image.Image,
    prompt: str,
    width: int,
    height: int,
    seed: int,
    *,
    num_steps: int = DEFAULT_STEPS,
    guidance: float = DEFAULT_GUIDANCE,
    acceleration: str = DEFAULT_ACCELERATION,
    strength: float = DEFAULT_STRENGTH,
    mode: str = DEFAULT_MULTI_IMAGE_MODE,
    references: Sequence[Image.Image] = (),
    condition: tuple[int, int] | None = None,
    reference_base: int | None = None,
) -> EditPlan:
    """The plan of an edit of ``image`` (with ``references``) to a ``width`` x ``height`` output.
    ``condition``: the input's conditioning size (default: the preferred Kontext resolution);
    ``reference_base``: the side whose square the references share (default: the model's)."""
    layout = sizes.conditioning_layout(
        image.size, [r.size for r in references], mode, base_side(components), condition, reference_base
    )
    return EditPlan(prompt=prompt, width=width, height=height, seed=seed,
                    sampling=Sampling(num_steps, guidance, acceleration, strength), layout=layout)  # fmt: skip


def direct(components: Components) -> TransformerCall:
    """The components' transformer called as it is, in this process: the one-device runtime's call."""
    return LocalRuntime(components.transformer)
