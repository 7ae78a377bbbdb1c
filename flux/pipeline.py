"""The whole product path shared by the command line and the Cog predictor:
check the weights, load the model, parse the input, size the output, edit, check safety."""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from flux import images, sizes, weights
from flux.edit import EditResult, EditSettings, StepCallback, edit
from flux.errors import EditError
from flux.loading import Components, load_components
from flux.safety import SafetyChecker, is_flagged, load_safety_checker

log = logging.getLogger(__name__)


@dataclass
class Model:
    components: Components
    safety: SafetyChecker | None
    weights_dir: Path
    load_seconds: float


def load_model(weights_dir: str | Path, with_safety: bool = True) -> Model:
    """Verify the tree against its manifest (fails listing what is missing), then load it."""
    weights.require_complete(weights_dir)
    start = time.perf_counter()
    components = load_components(weights_dir)
    safety = load_safety_checker(weights_dir, components.device, components.dtype) if with_safety else None
    return Model(components, safety, Path(weights_dir), time.perf_counter() - start)


def new_seed() -> int:
    return secrets.randbelow(2**32)


def run_edit(
    model: Model,
    image_source: str | Path | bytes,
    prompt: str,
    aspect_ratio: str = sizes.MATCH_INPUT,
    num_steps: int = 28,
    guidance: float = 2.5,
    seed: int | None = None,
    acceleration: str = "go fast",
    check_safety: bool = True,
    on_step: StepCallback | None = None,
    **settings,
) -> EditResult:
    """One edit from an image file (or its bytes); a seed of None draws a random one, 0 is a seed."""
    image = images.load_image(image_source)
    width, height = sizes.output_size(aspect_ratio, *image.size)
    seed = new_seed() if seed is None else int(seed)
    log.info("seed %d, %dx%d output, acceleration %r, %d steps", seed, width, height, acceleration, num_steps)
    result = edit(
        model.components,
        image,
        EditSettings(
            prompt=prompt, width=width, height=height, seed=seed, num_steps=num_steps, guidance=guidance,
            acceleration=acceleration, **settings,
        ),
        on_step=on_step,
    )  # fmt: skip
    if check_safety and model.safety is not None:
        start = time.perf_counter()
        flagged = is_flagged(model.safety, result.image)
        result.report.seconds["safety"] = time.perf_counter() - start
        if flagged:
            raise EditError(
                "the safety checker flagged the edited image as possibly not safe for work, so it is not returned. "
                "Try a different prompt or seed."
            )
    return result
