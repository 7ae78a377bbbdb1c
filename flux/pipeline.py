"""The whole product path shared by the command line and the Cog predictor: at setup, fetch and
check the weights, load the model and make the transformer fast (``load_model``); per request,
decode the images, decide the sizes, apply the LoRAs, edit and check safety (``run_edit``)."""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass, field

import torch
from PIL import Image

from flux import images, masking, parallel, sizes, weights
from flux.composite import keep_unedited
from flux.config import Config
from flux.device import dtype_for, freeze_loaded_objects, pick_device, release_memory
from flux.edit import EditPlan, Sampling, base_side, edit
from flux.errors import EditError
from flux.fast import warm_up_sizes
from flux.fetch import FetchReport, WeightsRemote, fetch
from flux.loading import Components, load_components
from flux.lora_sources import LoraStore, describe
from flux.report import EditReport, EditResult, StepCallback
from flux.request import DEFAULT_GUIDANCE, DEFAULT_MULTI_IMAGE_MODE, MAX_SEED, EditRequest
from flux.runtime import LoraFile, TransformerRuntime, start_local
from flux.safety import SafetyChecker, is_flagged, load_safety_checker

log = logging.getLogger(__name__)


@dataclass
class Model:
    """A model ready for requests: the configuration it was set up with, its components, the
    transformer runtime (on one device or several: the pipeline does not know which), the
    safety checker, and where LoRAs come from."""

    config: Config
    components: Components
    runtime: TransformerRuntime
    safety: SafetyChecker | None
    loras: LoraStore
    seconds: dict[str, float] = field(default_factory=dict)

    def healthy(self) -> bool:
        """Whether the model can edit (on several devices: while every worker lives)."""
        return self.runtime.healthy()

    def close(self) -> None:
        self.runtime.close()


def fetch_missing_weights(config: Config) -> FetchReport | None:
    """Fetch a missing or incomplete tree when a source is configured: a mirror or weights CDN
    (WEIGHTS_BASE_URL) or the Hub (HF_TOKEN). Parallel, resumable, every file verified before it
    reaches its final path. Without a source, nothing is fetched (the check then says what is missing)."""
    if not weights.problems(config.weights_dir) or not (config.weights_base_url or config.hf_token):
        return None
    where = config.weights_base_url or "the Hugging Face Hub"
    log.info("weights in %s are incomplete: fetching them from %s", config.weights_dir, where)
    report = fetch(config.weights_dir, weights.manifest_for(config.weights_dir), WeightsRemote.from_config(config))
    rate = report.bytes_downloaded / max(report.seconds, 1e-9) / 1e6
    print(
        f"fetched {len(report.downloaded)} files ({report.bytes_downloaded / 1e9:.2f} GB) from {where} in "
        f"{report.seconds:.1f}s ({rate:.1f} MB/s), {len(report.skipped)} already verified"
    )
    return report


def start_runtime(config: Config, device: torch.device, dtype: torch.dtype) -> TransformerRuntime:
    """The transformer ready on one device, or across FLUX_CONTEXT_PARALLEL of them."""
    if config.context_parallel > 1:
        return parallel.start(config, device, dtype)
    return start_local(config.weights_dir, device, dtype, config.fast)


def load_model(config: Config, with_safety: bool = True, warm: bool = True) -> Model:
    """Fetch missing weights if a source is set, verify the tree against its manifest (a SetupError
    lists what is missing), load it with the transformer made fast; where that compiled the
    transformer and ``warm``, compile its graph now (``warm_up``) rather than in the first request."""
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    if fetch_missing_weights(config) is not None:
        seconds["fetch"] = time.perf_counter() - start
    start = time.perf_counter()
    weights.require_complete(config.weights_dir)
    seconds["check"] = time.perf_counter() - start
    start = time.perf_counter()
    device = pick_device(config.device)
    dtype = dtype_for(device)
    runtime = start_runtime(config, device, dtype)
    try:
        components = load_components(config.weights_dir, device, dtype, transformer=runtime.transformer)
        safety = load_safety_checker(config.weights_dir, device, dtype) if with_safety else None
    except BaseException:
        runtime.close()
        raise
    seconds["load"] = time.perf_counter() - start - runtime.decided.seconds
    seconds["fast_path"] = runtime.decided.seconds
    loras = LoraStore.from_config(config)
    loras.clean_partials()  # a worker killed mid-download leaves its partial file behind
    model = Model(config, components, runtime, safety, loras, seconds)
    if warm and runtime.decided.compiled is not None:
        warm_up(model, warm_up_sizes(base_side(components)))
    freeze_loaded_objects()
    return model


def warm_up(model: Model, output_sizes: list[tuple[int, int]]) -> float:
    """One short edit per output size (with a same-sized input), so compiled kernels exist before the first request."""
    start = time.perf_counter()
    base = base_side(model.components)
    for width, height in output_sizes:
        image = Image.new("RGB", (width, height), (128, 128, 128))
        layout = sizes.conditioning_layout(image.size, [], DEFAULT_MULTI_IMAGE_MODE, base)
        plan = EditPlan(prompt="warm up", width=width, height=height, seed=0,
                        sampling=Sampling(4, DEFAULT_GUIDANCE, "none", 1.0), layout=layout)  # fmt: skip
        edit(model.components, image, plan, transformer=model.runtime)
    model.seconds["warm_up"] = time.perf_counter() - start
    return model.seconds["warm_up"]


def plan_edit(model: Model, request: EditRequest, image: Image.Image, references: list[Image.Image]) -> EditPlan:
    """The edit as it will run: the conditioning layout, the output size the runtime serves (on
    several devices, the nearest whose tokens split evenly), the seed (drawn when none was given)."""
    base = base_side(model.components)
    layout = sizes.conditioning_layout(image.size, [r.size for r in references], request.multi_image_mode, base)
    asked = sizes.output_size(request.aspect_ratio, *image.size, base)
    width, height = model.runtime.servable_size(*asked, layout.tokens)
    sampling = Sampling(request.num_steps, request.guidance, request.acceleration, request.strength)
    return EditPlan(prompt=request.prompt, width=width, height=height, seed=_seed(request), sampling=sampling,
                    layout=layout)  # fmt: skip


def _seed(request: EditRequest) -> int:
    return secrets.randbelow(MAX_SEED + 1) if request.seed is None else request.seed


def use_loras(model: Model, request: EditRequest) -> tuple[list[dict], dict[str, float]]:
    """Fetch the request's LoRAs and apply them (none: the exact base weights); returns what was
    used and the seconds spent fetching, converting and merging."""
    tokens = model.loras.tokens_for(request.hf_api_token, request.civitai_api_token)
    files, used, fetch_seconds = [], [], 0.0
    for lora in request.loras:
        start = time.perf_counter()
        path, downloaded = model.loras.fetch(lora.source, lora.field, tokens)
        fetch_seconds += time.perf_counter() - start
        files.append(LoraFile(path, lora.source, lora.strength, lora.field))
        used.append({"source": describe(lora.source), "strength": lora.strength, "downloaded": downloaded})
    applied = model.runtime.apply_loras(files)
    for entry, layers, lora in zip(used, applied.layers, request.loras, strict=True):
        entry["layers"] = layers
        log.info("%s %s at strength %g (%d layers)", lora.field, entry["source"], lora.strength, layers)
    seconds = {"lora_fetch": fetch_seconds, "lora_load": applied.load_seconds, "lora_merge": applied.merge_seconds}
    return used, (seconds if request.loras or applied.merge_seconds else {})


def run_edit(model: Model, request: EditRequest, on_step: StepCallback | None = None) -> EditResult:
    """One edit. The request was checked when it was made; here the images are decoded (before any
    LoRA is fetched), and the device's cached memory is released after the edit, whatever happened.
    With a mask, ``keep_unedited`` or strength 0 the input is decoded at full size and the result
    is the photo at its own size: with a mask the edit of the region it marks (of a crop around it
    on a large photo) stitched back; with keep_unedited what the edit changed put back into it;
    where nothing is to be edited (an all-black mask, strength 0) the photo itself, without a
    transformer call."""
    try:
        image = images.load_image(request.image, reduce=not request.at_photo_size)
        mask = _load_mask(model, request, image.size)
        references = [images.load_image(r, f"reference_images[{i}]") for i, r in enumerate(request.references)]
        coverage = masking.coverage(mask) if mask is not None else None
        if request.strength == 0 or coverage == (0, 0):
            return _unedited(image, request)
        if coverage == (255, 255):
            mask = None  # all of it: the plain edit
        box = masking.crop_box(mask, base_side(model.components)) if mask is not None else None
        region = image.crop(box) if box else image
        plan = plan_edit(model, request, region, references)
        lora_report, lora_seconds = use_loras(model, request)
        log.info("seed %d, %dx%d output, acceleration %r, %d steps", plan.seed, plan.width, plan.height,
                 plan.sampling.acceleration, plan.sampling.steps_run)  # fmt: skip
        weights = None
        if mask is not None:
            weights = masking.latent_weights(mask.crop(box) if box else mask, plan.width, plan.height)
        result = model.runtime.run(
            lambda step: edit(model.components, region, plan, on_step=step, references=references,
                              transformer=model.runtime, mask=weights),
            on_step,
        )  # fmt: skip
        result.report.loras = lora_report
        result.report.seconds.update(lora_seconds)
        if mask is not None:
            _stitch(image, mask, box, result)
        elif request.keep_unedited:
            _keep_unedited(image, result)
        if request.check_safety and model.safety is not None:
            _refuse_if_flagged(model.safety, result)
        return result
    finally:
        release_memory(model.components.device)


def _load_mask(model: Model, request: EditRequest, size: tuple[int, int]) -> Image.Image | None:
    """The request's mask at the photo's size (fetched first where it was sent as a URL)."""
    if request.mask is None:
        return None
    source = request.mask
    if isinstance(source, str):
        source = masking.fetch_mask(source, model.config.fetch_policy, model.config.fetch_limits())
    return images.load_mask(source, size)


def _unedited(image: Image.Image, request: EditRequest) -> EditResult:
    """The photo as it came, where nothing is to be edited: no transformer call, no safety check
    (nothing was made)."""
    log.info("nothing to edit (%s): the input is returned", "strength 0" if request.strength == 0 else "all-black mask")
    report = EditReport(seed=_seed(request), acceleration=request.acceleration, num_steps=0)
    if request.mask is not None:
        report.mask = {"share": 0.0}
    return EditResult(image=image, latents=torch.zeros(0), report=report)


def _stitch(photo: Image.Image, mask: Image.Image, box: masking.Box | None, result: EditResult) -> None:
    start = time.perf_counter()
    edit_size = result.image.size
    result.image = masking.stitch(photo, result.image, mask, box)
    result.report.seconds["stitch"] = time.perf_counter() - start
    histogram = mask.histogram()
    result.report.mask = {
        "share": round(1 - histogram[0] / (photo.width * photo.height), 4),
        "crop": list(box or (0, 0, *photo.size)),
        "edit_size": list(edit_size),
        "feather_px": round(masking.feather(photo.size, box)[1], 1),
    }


def _keep_unedited(original: Image.Image, result: EditResult) -> None:
    start = time.perf_counter()
    result.image, kept = keep_unedited(original, result.image)
    result.report.seconds["keep_unedited"] = time.perf_counter() - start
    result.report.keep_unedited = kept.metrics()


def _refuse_if_flagged(safety: SafetyChecker, result: EditResult) -> None:
    start = time.perf_counter()
    flagged = is_flagged(safety, result.image)
    result.report.seconds["safety"] = time.perf_counter() - start
    if flagged:
        raise EditError(
            "the safety checker flagged the edited image as possibly not safe for work, so it is not returned. "
            "Try a different prompt or seed."
        )
