"""The whole product path shared by the command line and the Cog predictor:
check the weights, load the model, parse the input, size the output, edit, check safety."""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from flux import images, parallel, settings, sizes, weights
from flux.device import freeze_loaded_objects, release_memory
from flux.edit import (
    DEFAULT_ACCELERATION,
    DEFAULT_GUIDANCE,
    DEFAULT_MULTI_IMAGE_MODE,
    DEFAULT_STEPS,
    MAX_SEED,
    EditResult,
    EditSettings,
    StepCallback,
    base_side,
    edit,
)
from flux.errors import EditError, InputError
from flux.fast import FastSettings, optimize, warm_up_sizes
from flux.fetch import FetchReport, fetch
from flux.loading import Components, load_components
from flux.lora import LoraState
from flux.lora_sources import MAX_STRENGTH, MIN_STRENGTH, NO_TOKENS, LoraRequest, LoraTokens, describe, fetch_lora
from flux.parallel import Workers
from flux.safety import SafetyChecker, is_flagged, load_safety_checker

log = logging.getLogger(__name__)

# T5 reads at most 512 tokens; a prompt this long is far past that already
MAX_PROMPT_CHARS = 10_000


@dataclass
class Model:
    components: Components
    safety: SafetyChecker | None
    weights_dir: Path
    seconds: dict[str, float] = field(default_factory=dict)
    fast_path: dict[str, object] = field(default_factory=dict)
    loras: LoraState | None = None
    workers: Workers | None = None  # the other ranks of a context-parallel edit

    def __post_init__(self) -> None:
        self.loras = self.loras or lora_state(self.components, self.fast_path)

    def healthy(self) -> bool:
        """Whether the model can edit: always on one device; across several, while every worker lives
        and no collective has failed."""
        return self.workers is None or self.workers.healthy()


def lora_state(components: Components, fast_path: dict[str, object]) -> LoraState:
    """The transformer's LoRA state, as the fast path set it up (side branches, FP8)."""
    rank = fast_path.get("lora_branch_rank", 0)
    return LoraState(components.transformer, rank if isinstance(rank, int) else 0, fast_path.get("fp8") is True)


def fetch_missing_weights(weights_dir: str | Path) -> FetchReport | None:
    """Fetch a missing or incomplete tree when a source is configured: a mirror or weights CDN
    (WEIGHTS_BASE_URL) or the Hub (HF_TOKEN). Parallel, resumable, every file verified before it
    reaches its final path. Without a source, nothing is fetched (the check then says what is missing)."""
    if not weights.problems(weights_dir):
        return None
    base_url = settings.get("WEIGHTS_BASE_URL") or None
    if base_url is None and not settings.get("HF_TOKEN"):
        return None
    manifest = weights.manifest_for(weights_dir)
    where = base_url or "the Hugging Face Hub"
    log.info("weights in %s are incomplete: fetching them from %s", weights_dir, where)
    report = fetch(weights_dir, manifest, base_url=base_url)
    rate = report.bytes_downloaded / max(report.seconds, 1e-9) / 1e6
    print(
        f"fetched {len(report.downloaded)} files ({report.bytes_downloaded / 1e9:.2f} GB) from {where} in "
        f"{report.seconds:.1f}s ({rate:.1f} MB/s), {len(report.skipped)} already verified"
    )
    return report


def load_model(weights_dir: str | Path, with_safety: bool = True, fast: bool = True, warm: bool = True) -> Model:
    """Fetch missing weights if a source is set, verify the tree against its manifest (fails listing
    what is missing), load it, apply the fast path; where that compiled the transformer and ``warm``,
    compile its graph now (``warm_up``) rather than in the first request."""
    start = time.perf_counter()
    fetched = fetch_missing_weights(weights_dir)
    seconds = {"fetch": time.perf_counter() - start} if fetched else {}
    start = time.perf_counter()
    weights.require_complete(weights_dir)
    seconds["check"] = time.perf_counter() - start
    start = time.perf_counter()
    components = load_components(weights_dir)
    safety = load_safety_checker(weights_dir, components.device, components.dtype) if with_safety else None
    seconds["load"] = time.perf_counter() - start
    model = Model(components, safety, Path(weights_dir), seconds)
    ranks = settings.get_int("FLUX_CONTEXT_PARALLEL")
    if fast or ranks > 1:
        speed_up(model, ranks, warm=warm)
    freeze_loaded_objects()
    return model


def speed_up(model: Model, ranks: int = 1, fast: FastSettings | None = None, warm: bool = True) -> None:
    """Apply the fast path to a loaded model; with ``ranks`` > 1 first start the other ranks
    (flux.parallel, loading the transformer from ``model.weights_dir``) and send them every
    transformer call; where the transformer was compiled and ``warm``, compile its graph now
    (``warm_up``, on every rank) rather than in the first request."""
    components = model.components
    if ranks > 1:
        model.workers = parallel.start(ranks, model.weights_dir, components.device)
    start = time.perf_counter()
    model.fast_path = optimize(components, fast, parallel=ranks)
    model.loras = lora_state(components, model.fast_path)
    model.seconds["fast_path"] = time.perf_counter() - start
    if model.workers is not None:
        components.transformer.register_forward_pre_hook(
            torch._dynamo.disable(model.workers.forward_hook), with_kwargs=True
        )
        parallel.one_call_at_a_time(components.transformer, model.workers.lock)
    if warm and "compile" in model.fast_path:
        warm_up(model, warm_up_sizes(base_side(components)))


def warm_up(model: Model, output_sizes: list[tuple[int, int]]) -> float:
    """One short edit per output size (with a same-sized input), so compiled kernels exist before the first request."""
    start = time.perf_counter()
    for width, height in output_sizes:
        image = Image.new("RGB", (width, height), (128, 128, 128))
        settings = EditSettings(prompt="warm up", width=width, height=height, seed=0, num_steps=4)
        edit(model.components, image, settings)
    model.seconds["warm_up"] = time.perf_counter() - start
    return model.seconds["warm_up"]


def use_loras(
    model: Model, loras: list[LoraRequest], tokens: LoraTokens = NO_TOKENS
) -> tuple[list[dict], dict[str, float]]:
    """Merge the request's LoRAs into the transformer (or restore the base weights when it has none);
    returns what was used and the seconds spent fetching, loading and merging."""
    for request in loras:
        if not MIN_STRENGTH <= request.strength <= MAX_STRENGTH:
            field_name = request.field.replace("weights", "strength")
            raise InputError(f"{field_name} must be between {MIN_STRENGTH} and {MAX_STRENGTH}; got {request.strength}")
    used, seconds, paths = [], {"lora_fetch": 0.0, "lora_load": 0.0}, []
    wanted = []
    for request in loras:
        start = time.perf_counter()
        path, downloaded = fetch_lora(request.source, request.field, tokens)
        paths.append(path)
        seconds["lora_fetch"] += time.perf_counter() - start
        lora, load_seconds = model.loras.converted(path, request.source, request.field)
        seconds["lora_load"] += load_seconds
        wanted.append((lora, request.strength))
        used.append({"source": describe(request.source), "strength": request.strength, "downloaded": downloaded,
                     "layers": len(lora.layers)})  # fmt: skip
        log.info(
            "%s %s at strength %g (%d layers)",
            request.field,
            describe(request.source),
            request.strength,
            len(lora.layers),
        )
    seconds["lora_merge"] = model.loras.apply(wanted)
    if model.workers is not None:
        model.workers.apply_loras([(str(path), r.source, r.strength) for path, r in zip(paths, loras, strict=True)])
    return used, (seconds if loras or seconds["lora_merge"] else {})


def check_request(prompt: str, references: list) -> None:
    """The checks that cost nothing, made before any input is decoded."""
    if len(references) > sizes.MAX_REFERENCES:
        raise InputError(f"at most {sizes.MAX_REFERENCES} reference_images are accepted; got {len(references)}")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise InputError(f"prompt is longer than {MAX_PROMPT_CHARS} characters; got {len(prompt)}")


def output_size(
    model: Model, aspect_ratio: str, image: Image.Image, references: list[Image.Image], mode: str
) -> tuple[int, int]:
    """The output size (sizes.output_size); across several devices, the nearest one whose tokens split evenly."""
    base = base_side(model.components)
    width, height = sizes.output_size(aspect_ratio, *image.size, base)
    if model.workers is None:
        return width, height
    condition = sizes.conditioning_tokens(
        sizes.conditioning_size(*image.size, base), [r.size for r in references], mode, base
    )
    return sizes.divisible_output_size(width, height, condition, model.workers.size)


def new_seed() -> int:
    return secrets.randbelow(MAX_SEED + 1)


def run_edit(
    model: Model,
    image_source: str | Path | bytes,
    prompt: str,
    aspect_ratio: str = sizes.MATCH_INPUT,
    num_steps: int = DEFAULT_STEPS,
    guidance: float = DEFAULT_GUIDANCE,
    seed: int | None = None,
    acceleration: str = DEFAULT_ACCELERATION,
    check_safety: bool = True,
    on_step: StepCallback | None = None,
    loras: list[LoraRequest] | None = None,
    references: list[str | Path | bytes] | None = None,
    multi_image_mode: str = DEFAULT_MULTI_IMAGE_MODE,
    lora_tokens: LoraTokens = NO_TOKENS,
) -> EditResult:
    """One edit from an image file (or its bytes); a seed of None draws a random one, 0 is a seed.
    Seeds run from 0 to MAX_SEED; each gives its own noise. ``references``: up to 3 more images.
    Every check is made once, before the work it guards: the free ones before any image is decoded,
    the settings (EditSettings) before any LoRA is fetched. The device's cached memory is released
    after the edit, whatever happened."""
    references = references or []
    check_request(prompt, references)
    try:
        image = images.load_image(image_source)
        reference_images = [images.load_image(r, f"reference_images[{i}]") for i, r in enumerate(references)]
        width, height = output_size(model, aspect_ratio, image, reference_images, multi_image_mode)
        seed = new_seed() if seed is None else int(seed)
        settings = EditSettings(
            prompt=prompt, width=width, height=height, seed=seed, num_steps=num_steps, guidance=guidance,
            acceleration=acceleration, multi_image_mode=multi_image_mode,
        )  # fmt: skip
        lora_report, lora_seconds = use_loras(model, loras or [], lora_tokens)
        log.info("seed %d, %dx%d output, acceleration %r, %d steps", seed, width, height, acceleration, num_steps)
        if model.workers is None:
            result = edit(model.components, image, settings, on_step=on_step, references=reference_images)
        else:  # a cancel must not land inside a call the workers are making too
            result = parallel.stop_at_a_step_on_cancel(
                lambda step: edit(model.components, image, settings, on_step=step, references=reference_images),
                on_step,
            )
        result.report.loras = lora_report
        result.report.seconds.update(lora_seconds)
        if check_safety and model.safety is not None:
            _refuse_if_flagged(model.safety, result)
        return result
    except EditError:
        raise
    except RuntimeError as exc:  # a collective failed: say so, and refuse the edits that would follow
        if model.workers is not None and model.workers.is_failure(exc):
            raise model.workers.failed(exc) from None
        raise
    finally:
        release_memory(model.components.device)


def _refuse_if_flagged(safety: SafetyChecker, result: EditResult) -> None:
    start = time.perf_counter()
    flagged = is_flagged(safety, result.image)
    result.report.seconds["safety"] = time.perf_counter() - start
    if flagged:
        raise EditError(
            "the safety checker flagged the edited image as possibly not safe for work, so it is not returned. "
            "Try a different prompt or seed."
        )
