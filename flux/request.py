"""What a caller asks for: one ``EditRequest``, built by predict.py and by the command line from their
inputs, checked once when it is made (every bound a request has is here) without touching the
model or decoding an image's pixels, and passed whole to ``flux.pipeline.run_edit``.

``INPUTS`` is what a caller may send, with defaults and bounds; ``request_from`` turns what was
sent into a request, for predict.py and the command line alike.
"""

from __future__ import annotations

import json
import pathlib
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import taylor_utils
from flux import images, masking, sizes
from flux.errors import InputError
from flux.lora_sources import LoraRequest, lora_requests

# Every input a caller can send (predict.py's names), with its default and bounds: the one place
# they are written. predict.py's Input() declarations repeat them as literals (cog build reads
# literals only) and tests/test_api_contract.py holds the two together; the command line takes
# its defaults from here.


@dataclass(frozen=True)
class Spec:
    """One input: its default, and what bounds it (a closed range, a choice, a length)."""

    default: object
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] = ()
    max_length: int | None = None


# The noise generator (torch's CPU Mersenne Twister) keeps only the low 32 bits of a seed, so
# 0..2**32-1 is the whole range of distinct seeds; anything outside it would alias one inside.
MAX_SEED = 2**32 - 1
RANDOM_SEED = -1  # what a caller sends (or leaves) for a random seed; None means the same
# Where reference images go in the conditioning sequence (the released model was not trained for
# several images; these are the placements in use, see README "Several input images").
MULTI_IMAGE_MODES = ("offset", "stitch", "index")
OUTPUT_FORMATS = tuple(images.OUTPUT_FORMATS)
ACCELERATION_LEVELS = taylor_utils.ACCELERATION_LEVELS
_STEPS = Spec(28, 4, 50)
_GUIDANCE = Spec(2.5, 0.0, 10.0)
_LORA_SOURCE = Spec("", max_length=2048)
_LORA_STRENGTH = Spec(1.0, -1.0, 3.0)
_ONE_IMAGE = Spec(1, 1, 1)
INPUTS: dict[str, Spec] = {
    "prompt": Spec(None, max_length=10_000),  # T5 reads at most 512 tokens: far past that already
    "input_image": Spec(None),
    "aspect_ratio": Spec(sizes.MATCH_INPUT, choices=sizes.ASPECT_RATIO_CHOICES),
    "num_inference_steps": _STEPS,
    "guidance": _GUIDANCE,
    "seed": Spec(RANDOM_SEED, RANDOM_SEED, MAX_SEED),
    "acceleration": Spec("go fast", choices=ACCELERATION_LEVELS),
    "go_fast": Spec(""),
    "output_format": Spec("webp", choices=OUTPUT_FORMATS),
    "output_quality": Spec(80, 0, 100),
    "disable_safety_checker": Spec(False),
    "keep_unedited": Spec(False),
    "mask": Spec(""),  # a data URI or an http(s) URL; empty: none
    "strength": Spec(1.0, 0.0, 1.0),
    "lora_weights": _LORA_SOURCE,
    "lora_strength": _LORA_STRENGTH,
    "extra_lora_weights": _LORA_SOURCE,
    "extra_lora_strength": _LORA_STRENGTH,
    "reference_images": Spec((), 0, sizes.MAX_REFERENCES),  # the bounds of their count
    "multi_image_mode": Spec("offset", choices=MULTI_IMAGE_MODES),
    "hf_api_token": Spec(""),
    "civitai_api_token": Spec(""),
    # other hosts' names for the same inputs (see ALIASES) and their counts of images
    "num_outputs": _ONE_IMAGE,
    "num_images": _ONE_IMAGE,
    "n": _ONE_IMAGE,
    "guidance_scale": _GUIDANCE,
    "steps": _STEPS,
    "enable_safety_checker": Spec(True),
    "mask_image": Spec(""),
    "mask_url": Spec(""),
}
DEFAULT_STEPS = _STEPS.default
MIN_STEPS, MAX_STEPS = _STEPS.low, _STEPS.high
DEFAULT_GUIDANCE = _GUIDANCE.default
DEFAULT_ACCELERATION = INPUTS["acceleration"].default
DEFAULT_MULTI_IMAGE_MODE = INPUTS["multi_image_mode"].default
MAX_PROMPT_CHARS = INPUTS["prompt"].max_length
DEFAULT_STRENGTH = INPUTS["strength"].default

ImageSource = pathlib.Path | bytes
MaskSource = ImageSource | str  # str: an http(s) URL, fetched when the edit runs


def clean_prompt(prompt: str) -> str:
    """The prompt without control characters (tabs and line breaks become spaces), trimmed."""
    kept = (" " if ch.isspace() else ch for ch in prompt if ch.isspace() or unicodedata.category(ch) != "Cc")
    return "".join(kept).strip()


@dataclass(frozen=True)
class EditRequest:
    """One edit as a caller asked for it. Made only through its checks: an InputError naming the
    input says what is wrong. ``prompt`` is kept clean (``clean_prompt``); a ``seed`` of None (or
    -1) is drawn at random when the edit runs (0 is a seed)."""

    prompt: str
    image: ImageSource = field(repr=False)
    aspect_ratio: str = sizes.MATCH_INPUT
    num_steps: int = DEFAULT_STEPS
    guidance: float = DEFAULT_GUIDANCE
    seed: int | None = None
    acceleration: str = DEFAULT_ACCELERATION
    output_format: str = INPUTS["output_format"].default
    output_quality: int = INPUTS["output_quality"].default
    check_safety: bool = True
    loras: tuple[LoraRequest, ...] = ()
    references: tuple[ImageSource, ...] = field(default=(), repr=False)
    multi_image_mode: str = DEFAULT_MULTI_IMAGE_MODE
    # the caller's own tokens for LoRA downloads, each sent to its service only
    hf_api_token: str | None = field(default=None, repr=False)
    civitai_api_token: str | None = field(default=None, repr=False)
    # the original at its own size with only what the edit changed replaced (flux.composite)
    keep_unedited: bool = False
    # where to edit (flux.masking); the result is the original at its own size
    mask: MaskSource | None = field(default=None, repr=False)
    strength: float = DEFAULT_STRENGTH

    def __post_init__(self) -> None:
        _check("prompt", self.prompt)
        object.__setattr__(self, "prompt", clean_prompt(self.prompt))
        if not self.prompt:
            raise InputError(
                "prompt is empty (control characters and spaces do not count); say what to change in the image",
                "prompt",
            )
        if self.seed == RANDOM_SEED:
            object.__setattr__(self, "seed", None)
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise InputError(f"seed must be between 0 and {MAX_SEED}, or {RANDOM_SEED} (or left out) for a random one; "
                             f"got {self.seed}", "seed")  # fmt: skip
        for name, value in (("aspect_ratio", self.aspect_ratio), ("num_inference_steps", self.num_steps),
                            ("guidance", self.guidance), ("acceleration", self.acceleration),
                            ("output_format", self.output_format), ("output_quality", self.output_quality),
                            ("multi_image_mode", self.multi_image_mode), ("strength", self.strength)):  # fmt: skip
            _check(name, value)
        if len(self.references) > INPUTS["reference_images"].high:
            raise InputError(f"at most {INPUTS['reference_images'].high} reference_images are accepted; "
                             f"got {len(self.references)}", "reference_images")  # fmt: skip
        for lora in self.loras:
            _check(lora.field, lora.source)
            _check(lora.field.replace("weights", "strength"), lora.strength)
        framed = [name for name, wanted in (("mask", self.mask is not None), ("keep_unedited", self.keep_unedited))
                  if wanted]  # fmt: skip
        for name in framed:
            _frames_correspond(self, name)
        if framed:  # the input's header, read once (no pixel decoded)
            size = images.header_size(self.image, "input_image")
            _within_ratio(size, framed[0])
            if self.mask is not None and not isinstance(self.mask, str):
                _mask_may_fit(self.mask, size)

    @property
    def at_photo_size(self) -> bool:
        """Whether the result is the photo at its own size (so the input is decoded at full size)."""
        return self.keep_unedited or self.mask is not None or self.strength == 0


def _check(name: str, value: object) -> None:
    """``value`` within what INPUTS says ``name`` accepts (an InputError naming it otherwise)."""
    spec = INPUTS[name]
    if spec.choices and value not in spec.choices:
        raise InputError(f"{name} must be one of {', '.join(spec.choices)}; got {value!r}", name)
    if spec.low is not None and not spec.low <= value <= spec.high:
        raise InputError(f"{name} must be between {spec.low:g} and {spec.high:g}; got {value:g}", name)
    if spec.max_length is not None and len(value) > spec.max_length:
        raise InputError(f"{name} is longer than {spec.max_length} characters; got {len(value)}", name)


def _frames_correspond(request: EditRequest, name: str) -> None:
    """A mask and keep_unedited put the edit back into the original's frame: only where the output
    is that frame (match_input_image, and an input within 21:9 and 9:21: ``_within_ratio``), and
    not where the conditioning joins several images into one."""
    if request.aspect_ratio != sizes.MATCH_INPUT:
        raise InputError(
            f"{name} needs aspect_ratio match_input_image: with {request.aspect_ratio} the output is another "
            "frame than the photo's, so no part of it lies over the original",
            name,
        )
    if request.references and request.multi_image_mode == "stitch":
        raise InputError(
            f"{name} cannot be used with reference_images in stitch mode: the model sees the images joined "
            "side by side, so its output does not lie over the input image's frame; use offset or index",
            name,
        )


def _within_ratio(size: tuple[int, int], name: str) -> None:
    """An input more extreme than 21:9 or 9:21 is edited at that clamped ratio (the range is the
    same both ways, so the header's size answers before any EXIF rotation)."""
    width, height = size
    if not sizes.MIN_RATIO <= width / height <= sizes.MAX_RATIO:
        raise InputError(
            f"{name} cannot be used with this {width}x{height} input: it is wider or taller than 21:9, so it "
            "is edited at 21:9 (or 9:21), another frame than the photo's",
            name,
        )


def _mask_may_fit(mask: ImageSource, size: tuple[int, int]) -> None:
    """A mask file is an image, and its aspect ratio is the input's (``size``) either way round (EXIF
    may turn either; ``images.load_mask`` checks it exactly once both are decoded)."""
    width, height = size
    mask_width, mask_height = images.header_size(mask, "mask")
    if not any(images.same_aspect((mask_width, mask_height), size) for size in ((width, height), (height, width))):
        raise InputError(
            f"mask is {mask_width}x{mask_height}, another aspect ratio than the {width}x{height} input image; "
            "send a mask of the input image's shape (any size)",
            "mask",
        )


# --- from what a caller sent to the request ------------------------------------------------------

# Other hosts' names for this container's inputs: alias -> (this container's name, what the alias's
# value means in this container's terms). Replicate's go_fast: true is its 13-call map at 28 steps
# (this container's "go really fast"), false computes every step; fal's enable_safety_checker is
# the opposite of disable_safety_checker.
GO_FAST_LEVELS = {True: "go really fast", False: "none"}
ALIASES: dict[str, tuple[str, Callable[[object], object]]] = {
    "steps": ("num_inference_steps", lambda steps: steps),
    "guidance_scale": ("guidance", lambda scale: scale),
    "go_fast": ("acceleration", lambda go_fast: GO_FAST_LEVELS[go_fast]),
    "enable_safety_checker": ("disable_safety_checker", lambda enable: not enable),
    "mask_image": ("mask", lambda mask: mask),
    "mask_url": ("mask", lambda mask: mask),
}
# other hosts' counts of output images: this container returns one image per prediction
IMAGE_COUNTS = ("num_outputs", "num_images", "n")


def request_from(sent: Mapping[str, object], read_file: Callable[[object, str], ImageSource]) -> EditRequest:
    """The request for what a caller sent, by predict.py's input names (an input left out takes its
    default from INPUTS): other hosts' names resolved, the LoRA list and the files read (through
    ``read_file(value, input name)``), every bound checked. predict.py and the command line both
    make their requests here."""
    unknown = set(sent) - set(INPUTS)
    if unknown:
        raise ValueError(f"not inputs of this container: {', '.join(sorted(unknown))}")
    inputs = {name: sent.get(name, spec.default) for name, spec in INPUTS.items()}
    for name in IMAGE_COUNTS:
        if inputs[name] != 1:
            raise InputError(f"{name}={inputs[name]}: this container returns one image per prediction; send "
                             f"{inputs[name]} predictions (with different seeds) instead", name)  # fmt: skip
    if inputs["go_fast"] != "" and not isinstance(inputs["go_fast"], bool):
        raise InputError(f"go_fast must be true or false (or left out); got {inputs['go_fast']!r}", "go_fast")
    for alias, (name, meaning) in ALIASES.items():
        if inputs[alias] == INPUTS[alias].default:
            continue  # the alias left out: this container's input decides
        _check(alias, inputs[alias])
        meant = meaning(inputs[alias])
        if inputs[name] != INPUTS[name].default and inputs[name] != meant:
            raise InputError(f"{alias}={_shown(inputs[alias])} asks for {name}={_shown(meant)}, but {name} is "
                             f"{_shown(inputs[name])}; send one of them", alias)  # fmt: skip
        inputs[name] = meant
    return EditRequest(
        prompt=inputs["prompt"], image=read_file(inputs["input_image"], "input_image"),
        aspect_ratio=inputs["aspect_ratio"], num_steps=inputs["num_inference_steps"], guidance=inputs["guidance"],
        seed=inputs["seed"], acceleration=inputs["acceleration"], output_format=inputs["output_format"],
        output_quality=inputs["output_quality"], check_safety=not inputs["disable_safety_checker"],
        loras=lora_requests((inputs["lora_weights"], inputs["lora_strength"], "lora_weights"),
                            (inputs["extra_lora_weights"], inputs["extra_lora_strength"], "extra_lora_weights")),
        references=tuple(read_file(r, f"reference_images[{i}]") for i, r in enumerate(inputs["reference_images"])),
        multi_image_mode=inputs["multi_image_mode"], hf_api_token=_token(inputs["hf_api_token"]),
        civitai_api_token=_token(inputs["civitai_api_token"]), keep_unedited=inputs["keep_unedited"],
        mask=_mask(inputs["mask"], read_file), strength=inputs["strength"],
    )  # fmt: skip


def _mask(value: object, read_file: Callable[[object, str], ImageSource]) -> MaskSource | None:
    """The mask as sent: text (a data URI, an http(s) URL, or empty for none) or a file (the command line's)."""
    if isinstance(value, str):
        return masking.mask_source(value)
    return read_file(value, "mask")


def _shown(value: object) -> str:
    """A value as JSON, a long text (a data URI) cut short."""
    if isinstance(value, str) and len(value) > 60:
        value = value[:40] + "..."
    return json.dumps(value)


def _token(value: object) -> str | None:
    """A token as sent (text, or a secret that hides it: cog's Secret), None where blank."""
    text = value.get_secret_value() if hasattr(value, "get_secret_value") else value
    return text.strip() or None if isinstance(text, str) else None
