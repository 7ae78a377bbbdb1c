"""The Kontext edit: prompt + input image -> edited image, with the project's own denoise loop.

Shapes (B = 1):
    latents        (B, N, 64)   packed 2x2 patches of the 16-channel VAE latent, N = (H/16)*(W/16)
    image_latents  (B, M, 64)   the conditioning image, packed the same way
    ids            (N + M, 3)   rope positions; first coordinate 0 for target tokens, 1 for the image
                                (reference images: see ``encode_conditioning``)
    prompt_embeds  (B, 512, D)  T5;  pooled (B, P) CLIP
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from PIL import Image

import taylor_utils
from flux import images, schedule, sizes
from flux.device import release_memory, synchronize
from flux.errors import EditError
from flux.loading import Components
from flux.report import EditReport, EditResult, LatentHook, StepCallback

log = logging.getLogger(__name__)

T5_MAX_TOKENS = 512
# Two derivative terms: the smallest order that follows the curvature of the trajectory, which
# is what TaylorSeer adds over linear extrapolation (see README, "Acceleration").
DEFAULT_N_DERIVATIVES = 2


@dataclass(frozen=True)
class Sampling:
    """How the loop runs: its number of steps, the guidance the transformer is given, the
    acceleration level (which of the steps run call the transformer), and the strength (1: every
    step from noise; below 1 the last steps only, from the input re-noised: ``schedule.first_step``)."""

    num_steps: int
    guidance: float
    acceleration: str
    strength: float

    @property
    def first_step(self) -> int:
        return schedule.first_step(self.num_steps, self.strength)

    @property
    def steps_run(self) -> int:
        return self.num_steps - self.first_step


@dataclass(frozen=True, kw_only=True)
class EditPlan:
    """One edit as it will run, everything decided: the prompt (clean), the output size, the seed,
    how it samples and where the conditioning images go. What a caller may ask for is checked
    before, in ``flux.request``; the plan is made by ``flux.pipeline.plan_edit`` (the lab makes its
    own, ``flux.lab.plans``)."""

    prompt: str
    width: int
    height: int
    seed: int
    sampling: Sampling
    layout: sizes.ConditioningLayout

    def __post_init__(self) -> None:
        if self.width % sizes.MULTIPLE or self.height % sizes.MULTIPLE:
            raise ValueError(f"width and height must be multiples of {sizes.MULTIPLE}; got {self.width}x{self.height}")


class ForecastCache(Protocol):
    """What the loop needs of a cache: record a computed prediction, forecast a skipped one.
    Positions are step indices."""

    def reset(self) -> None: ...
    def update(self, prediction: torch.Tensor, position: float) -> None: ...
    def forecast(self, position: float) -> torch.Tensor: ...
    def nbytes(self) -> int: ...


@dataclass
class LabOverrides:
    """The one seam through which the quality lab, the benchmarks and the tests vary an edit.
    A request never sets it; every field left None is the product's choice."""

    # default: TaylorSeer with DEFAULT_N_DERIVATIVES, in step units, fp32 terms
    cache: ForecastCache | None = None
    # default: the acceleration level's map; else a computed-step map of length num_steps (a
    # sequence the loop reads once per step, in order, so it may decide as the loop goes)
    step_map: Sequence[bool] | None = None


class _Timer:
    def __init__(self, device: torch.device, into: dict[str, float], name: str):
        self.device, self.into, self.name = device, into, name

    def __enter__(self) -> None:
        synchronize(self.device)
        self.start = time.perf_counter()

    def __exit__(self, *exc) -> None:
        synchronize(self.device)
        self.into[self.name] = self.into.get(self.name, 0.0) + time.perf_counter() - self.start


def base_side(components: Components) -> int:
    """The model's native image side (its VAE's sample_size): 1024 for FLUX.1 Kontext."""
    side = components.vae.config.get("sample_size", sizes.BASE_SIDE)
    return int(side[0] if isinstance(side, list | tuple) else side)


def encode_prompt(components: Components, prompt: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(T5 embeddings (1, 512, D), CLIP pooled (1, P), text ids (512, 3))."""
    clip = components.tokenizer(
        [prompt],
        padding="max_length",
        max_length=components.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    pooled = components.text_encoder(clip.input_ids.to(components.device), output_hidden_states=False).pooler_output
    # 512 for the real model; a small model's tokenizer may declare fewer
    max_tokens = min(T5_MAX_TOKENS, components.tokenizer_2.model_max_length)
    t5 = components.tokenizer_2(
        [prompt], padding="max_length", max_length=max_tokens, truncation=True, return_tensors="pt"
    )
    full_length = len(components.tokenizer_2(prompt).input_ids)
    if full_length > max_tokens:
        log.warning("prompt is %d tokens long; only the first %d are used", full_length, max_tokens)
    embeds = components.text_encoder_2(t5.input_ids.to(components.device), output_hidden_states=False)[0]
    text_ids = torch.zeros(embeds.shape[1], 3, device=components.device, dtype=components.dtype)
    return embeds.to(components.dtype), pooled.to(components.dtype), text_ids


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C): 2x2 patches as tokens."""
    b, ch, h, w = latents.shape
    latents = latents.view(b, ch, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return latents.reshape(b, (h // 2) * (w // 2), ch * 4)


def unpack(latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, N, 4C) -> (B, C, H/8, W/8) for an image of ``height`` x ``width`` pixels."""
    b, _, channels = latents.shape
    h, w = height // sizes.MULTIPLE, width // sizes.MULTIPLE
    latents = latents.view(b, h, w, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return latents.reshape(b, channels // 4, h * 2, w * 2)


def position_ids(
    height: int, width: int, first: float, device: torch.device, dtype: torch.dtype, offset: tuple[int, int] = (0, 0)
) -> torch.Tensor:
    """(h*w, 3) rope positions (first, row, column) of an h x w token grid placed at (row, column) ``offset``."""
    ids = torch.zeros(height, width, 3)
    ids[..., 0] = first
    ids[..., 1] = torch.arange(height)[:, None] + offset[0]
    ids[..., 2] = torch.arange(width)[None, :] + offset[1]
    return ids.reshape(height * width, 3).to(device=device, dtype=dtype)


def encode_image(
    components: Components, image: Image.Image, first: float = 1.0, offset: tuple[int, int] = (0, 0)
) -> tuple[torch.Tensor, torch.Tensor]:
    """Conditioning image (already at its size) -> packed latents (1, M, 64) and ids (M, 3) with
    first coordinate ``first`` (1 for the input image), placed at ``offset`` tokens."""
    pixels = images.to_tensor(image).to(device=components.device, dtype=components.dtype)
    latent = components.vae.encode(pixels).latent_dist.mode()
    latent = (latent - components.vae.config.shift_factor) * components.vae.config.scaling_factor
    _, _, h, w = latent.shape
    return pack(latent), position_ids(h // 2, w // 2, first, components.device, components.dtype, offset)


def offset_placements(grids: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """(row, column) token offsets of token grids (rows, columns) on a growing canvas, in order:
    each goes to the right of what is there when stacking it below would make the canvas taller
    than wide, else below (ComfyUI's default "offset" placement). No two grids overlap."""
    placements, height, width = [], 0, 0
    for rows, columns in grids:
        offset = (0, width) if rows + height > columns + width else (height, 0)
        placements.append(offset)
        height, width = max(height, rows + offset[0]), max(width, columns + offset[1])
    return placements


def encode_conditioning(
    components: Components, image: Image.Image, references: list[Image.Image], layout: sizes.ConditioningLayout
) -> tuple[torch.Tensor, torch.Tensor]:
    """The conditioning tokens (1, M, 64) and their ids (M, 3): the input image and the references at
    their ``layout`` sizes, in its mode. "offset": first coordinate 1, each image placed beside or below on a
    growing canvas; "index": reference k with first coordinate k + 1; "stitch": everything joined
    side by side into one image."""
    first = images.resize(image, *layout.condition)
    if not references:
        return encode_image(components, first)
    parts = [first] + [images.resize(r, *size) for r, size in zip(references, layout.references, strict=True)]
    if layout.mode == "stitch":
        return encode_image(components, images.stitch(parts, layout.stitched))
    if layout.mode == "index":
        encoded = [encode_image(components, part, first=1.0 + k) for k, part in enumerate(parts)]
    else:
        grids = [(p.height // sizes.MULTIPLE, p.width // sizes.MULTIPLE) for p in parts]
        encoded = [
            encode_image(components, part, 1.0, at) for part, at in zip(parts, offset_placements(grids), strict=True)
        ]
    return torch.cat([latents for latents, _ in encoded], dim=1), torch.cat([ids for _, ids in encoded], dim=0)


def initial_noise(components: Components, seed: int, width: int, height: int) -> torch.Tensor:
    """Packed noise from a seeded CPU generator: the same seed gives the same noise on every device."""
    channels = components.transformer.config.in_channels // 4
    shape = (1, channels, height // 8, width // 8)
    noise = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)
    return pack(noise).to(device=components.device, dtype=components.dtype)


def decode(components: Components, latents: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Packed latents -> decoded image tensor (1, 3, H, W) in about [-1, 1]."""
    latent = unpack(latents, height, width)
    latent = latent / components.vae.config.scaling_factor + components.vae.config.shift_factor
    return components.vae.decode(latent, return_dict=False)[0]


@dataclass
class LoopInputs:
    """Everything the denoise loop needs besides the transformer, for one edit (shapes: module docstring)."""

    latents: torch.Tensor
    image_latents: torch.Tensor
    ids: torch.Tensor
    prompt_embeds: torch.Tensor
    pooled: torch.Tensor
    text_ids: torch.Tensor
    sigmas: torch.Tensor  # of the steps run
    guidance: torch.Tensor | None
    noise: torch.Tensor
    source: torch.Tensor | None  # the input at the output's size, where the edit starts from it or keeps it


def prepare(
    components: Components, image: Image.Image, plan: EditPlan, references: list[Image.Image], needs_source: bool
) -> LoopInputs:
    """Encode the prompt and the conditioning images, draw the noise, lay out the positions and
    the sigmas of the steps run; with a strength below 1 the loop starts from the input re-noised
    to the first step's sigma (flow matching: ``(1 - sigma) * input + sigma * noise``)."""
    prompt_embeds, pooled, text_ids = encode_prompt(components, plan.prompt)
    image_latents, image_ids = encode_conditioning(components, image, references, plan.layout)
    noise = latents = initial_noise(components, plan.seed, plan.width, plan.height)
    sigmas = schedule.sigmas_for(components.scheduler, plan.sampling.num_steps, latents.shape[1])
    sigmas = sigmas[plan.sampling.first_step :]
    source = None
    if needs_source or plan.sampling.first_step:
        source = encode_image(components, images.resize(image, plan.width, plan.height))[0]
    if plan.sampling.first_step:
        latents = renoised(source, noise, float(sigmas[0]))
    rows, columns = plan.height // sizes.MULTIPLE, plan.width // sizes.MULTIPLE
    ids = torch.cat([position_ids(rows, columns, 0.0, components.device, components.dtype), image_ids], dim=0)
    guidance = None
    if components.transformer.config.guidance_embeds:
        guidance = torch.full([1], plan.sampling.guidance, device=components.device, dtype=torch.float32)
    return LoopInputs(latents, image_latents, ids, prompt_embeds, pooled, text_ids, sigmas, guidance, noise, source)


def renoised(source: torch.Tensor, noise: torch.Tensor, sigma: float) -> torch.Tensor:
    """The source latents at noise level ``sigma``, as the loop's state is at that sigma."""
    return ((1.0 - sigma) * source.float() + sigma * noise.float()).to(source.dtype)


def keep_source(weights: torch.Tensor, source: torch.Tensor, noise: torch.Tensor, steps: int) -> LatentHook:
    """The hook that puts the source back outside a mask after every step. ``weights``: the mask
    on the latent grid (h, w) in [0, 1]. After step k of ``steps`` a latent pixel follows the
    model where its weight is above 1 - (k + 1) / steps, else it is the source re-noised to the
    step's sigma: white from the first step on, black never (the source exactly at the end),
    grey w for the last w of the steps (a strength of its own)."""
    channels = source.shape[-1] // 4
    packed = pack(weights.to(source.device, torch.float32)[None, None].expand(1, channels, *weights.shape))

    def put_back(k: int, latents: torch.Tensor, sigma: float) -> torch.Tensor:
        follows = packed > 1.0 - (k + 1) / steps
        return torch.where(follows, latents, renoised(source, noise, sigma))

    return put_back


TransformerCall = Callable[..., tuple[torch.Tensor, ...]]


def transformer_prediction(
    components: Components, inputs: LoopInputs, call: TransformerCall
) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """The transformer as the loop sees it: (latents, step) -> the target tokens' prediction.
    Only the target tokens are used and cached: the forecast is elementwise, so caching the
    conditioning tokens too (as the public reference does) changes no target value."""

    def predict(latents: torch.Tensor, step: int) -> torch.Tensor:
        # diffusers passes the scheduler's timestep (sigma * 1000) cast to the latents' dtype and
        # divides it by 1000 again; the same round trip keeps the loop bit for bit with its pipeline
        t = (inputs.sigmas[step] * 1000.0).to(components.device).expand(latents.shape[0]).to(latents.dtype)
        output = call(
            hidden_states=torch.cat([latents, inputs.image_latents], dim=1),
            timestep=t / 1000,
            guidance=None if inputs.guidance is None else inputs.guidance.expand(latents.shape[0]),
            pooled_projections=inputs.pooled,
            encoder_hidden_states=inputs.prompt_embeds,
            txt_ids=inputs.text_ids,
            img_ids=inputs.ids,
        )[0]
        return output[:, : latents.shape[1]]

    return predict


def denoise(
    predict: Callable[[torch.Tensor, int], torch.Tensor],
    latents: torch.Tensor,
    sigmas: torch.Tensor,
    step_map: Sequence[bool],
    cache: ForecastCache,
    report: EditReport,
    on_step: StepCallback | None = None,
    after_step: LatentHook | None = None,
) -> torch.Tensor:
    """The flow-matching Euler loop over ``len(sigmas) - 1`` steps: a computed step runs the
    transformer and records its prediction in the cache, a skipped one is forecast by the cache.
    ``after_step`` sees the latents after each step and may replace them."""
    sigma = sigmas.tolist()
    num_steps = len(sigma) - 1
    device = latents.device
    for i in range(num_steps):
        computed = step_map[i]
        if computed:
            with _Timer(device, report.within_denoise, "transformer"):
                prediction = predict(latents, i)
            report.transformer_calls += 1
            cache.update(prediction, float(i))
            report.cache_bytes = max(report.cache_bytes, cache.nbytes())
        else:
            with _Timer(device, report.within_denoise, "forecast"):
                prediction = cache.forecast(float(i))
            report.forecast_steps.append(i)
        latents = (latents.float() + (sigma[i + 1] - sigma[i]) * prediction.float()).to(latents.dtype)
        if after_step is not None:
            replaced = after_step(i, latents, sigma[i + 1])
            latents = latents if replaced is None else replaced
        if on_step is not None:
            on_step(i, num_steps, computed)
    return latents


def _chained(hooks: list[LatentHook]) -> LatentHook | None:
    """One hook that runs ``hooks`` in order, each on what the one before left (None: no hook)."""
    if len(hooks) <= 1:
        return hooks[0] if hooks else None

    def chained(i: int, latents: torch.Tensor, sigma: float) -> torch.Tensor:
        for hook in hooks:
            replaced = hook(i, latents, sigma)
            latents = latents if replaced is None else replaced
        return latents

    return chained


def _check_finite(tensor: torch.Tensor, what: str) -> None:
    if not torch.isfinite(tensor).all():
        raise EditError(f"the {what} contain NaN or infinite values; no image was produced. Try another seed.")


@torch.inference_mode()
def edit(
    components: Components,
    image: Image.Image,
    plan: EditPlan,
    *,
    transformer: TransformerCall,
    on_step: StepCallback | None = None,
    lab: LabOverrides | None = None,
    references: list[Image.Image] | None = None,
    mask: torch.Tensor | None = None,
    after_step: LatentHook | None = None,
) -> EditResult:
    """Run one edit. ``image`` and ``references`` are RGB images (see ``images.load_image``).
    ``transformer``: how the transformer is called (the product's runtime, on one device or
    several; the lab's ``flux.lab.plans.direct``). ``mask``: where to edit, on the output's latent
    grid (``flux.masking.latent_weights``); the source is put back elsewhere (``keep_source``).
    ``after_step``: see ``denoise``."""
    references = references or []
    lab = lab or LabOverrides()
    sampling = plan.sampling
    steps = sampling.steps_run
    report = EditReport(seed=plan.seed, acceleration=sampling.acceleration, num_steps=steps)
    seconds = report.seconds
    cache = lab.cache or taylor_utils.TaylorCache(n_derivatives=DEFAULT_N_DERIVATIVES)
    cache.reset()
    step_map = lab.step_map or taylor_utils.compute_step_map(sampling.acceleration, steps)
    if len(step_map) != steps:
        raise ValueError(f"a step map needs {steps} entries; got {len(step_map)}")
    try:
        with _Timer(components.device, seconds, "encode"):
            inputs = prepare(components, image, plan, references, needs_source=mask is not None)
        hooks = [after_step] if after_step is not None else []
        if mask is not None:
            hooks.insert(0, keep_source(mask, inputs.source, inputs.noise, steps))
        with _Timer(components.device, seconds, "denoise"):
            prediction = transformer_prediction(components, inputs, transformer)
            latents = denoise(prediction, inputs.latents, inputs.sigmas, step_map, cache, report, on_step,
                              _chained(hooks))  # fmt: skip
        _check_finite(latents, "final latents")
        with _Timer(components.device, seconds, "decode"):
            decoded = decode(components, latents, plan.width, plan.height)
        _check_finite(decoded, "decoded image")
    except torch.OutOfMemoryError:
        cache.reset()
        release_memory(components.device)
        raise EditError(
            "out of GPU memory during the edit; the memory was released. Try a smaller image or fewer steps."
        ) from None
    finally:
        cache.reset()
    return EditResult(image=images.to_pil(decoded), latents=latents, report=report)
