"""What a caller asks for: one ``EditRequest``, built by predict.py and by the command line from their
inputs, checked once when it is made (every bound a request has is here) without touching the
model or decoding an image, and passed whole to ``flux.pipeline.run_edit``.

predict.py repeats the bounds and defaults as literals in its ``Input()`` declarations, because
cog's schema generator reads only literals there; tests/test_predict.py holds the two together.
"""

from __future__ import annotations

import json
import pathlib
import unicodedata
from dataclasses import dataclass, field

import taylor_utils
from flux import images, sizes
from flux.errors import InputError
from flux.lora_sources import MAX_SOURCE_CHARS, LoraRequest

DEFAULT_STEPS = 28
MIN_STEPS, MAX_STEPS = taylor_utils.MIN_STEPS, taylor_utils.MAX_STEPS
DEFAULT_GUIDANCE = 2.5
MIN_GUIDANCE, MAX_GUIDANCE = 0.0, 10.0
ACCELERATION_LEVELS = taylor_utils.ACCELERATION_LEVELS
DEFAULT_ACCELERATION = "go fast"
# Where reference images go in the conditioning sequence (the released model was not trained for
# several images; these are the placements in use, see README "Several input images").
MULTI_IMAGE_MODES = ("offset", "stitch", "index")
DEFAULT_MULTI_IMAGE_MODE = "offset"
# The noise generator (torch's CPU Mersenne Twister) keeps only the low 32 bits of a seed, so
# 0..2**32-1 is the whole range of distinct seeds; anything outside it would alias one inside.
MAX_SEED = 2**32 - 1
RANDOM_SEED = -1  # what a caller sends (or leaves) for a random seed; None means the same
# T5 reads at most 512 tokens; a prompt this long is far past that already
MAX_PROMPT_CHARS = 10_000
OUTPUT_FORMATS = tuple(images.OUTPUT_FORMATS)
DEFAULT_OUTPUT_FORMAT = "webp"
DEFAULT_OUTPUT_QUALITY = 80
MIN_LORA_STRENGTH, MAX_LORA_STRENGTH = -1.0, 3.0
MAX_REFERENCES = sizes.MAX_REFERENCES

ImageSource = pathlib.Path | bytes


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
    output_format: str = DEFAULT_OUTPUT_FORMAT
    output_quality: int = DEFAULT_OUTPUT_QUALITY
    check_safety: bool = True
    loras: tuple[LoraRequest, ...] = ()
    references: tuple[ImageSource, ...] = field(default=(), repr=False)
    multi_image_mode: str = DEFAULT_MULTI_IMAGE_MODE
    # the caller's own tokens for LoRA downloads, each sent to its service only
    hf_api_token: str | None = field(default=None, repr=False)
    civitai_api_token: str | None = field(default=None, repr=False)
    # the original at its own size with only what the edit changed replaced (flux.composite)
    keep_unedited: bool = False

    def __post_init__(self) -> None:
        _not_longer("prompt", self.prompt, MAX_PROMPT_CHARS)
        object.__setattr__(self, "prompt", clean_prompt(self.prompt))
        if not self.prompt:
            raise InputError(
                "prompt is empty (control characters and spaces do not count); say what to change in the image",
                "prompt",
            )
        _one_of("aspect_ratio", self.aspect_ratio, sizes.ASPECT_RATIO_CHOICES)
        _within("num_inference_steps", self.num_steps, MIN_STEPS, MAX_STEPS)
        _within("guidance", self.guidance, MIN_GUIDANCE, MAX_GUIDANCE)
        if self.seed == RANDOM_SEED:
            object.__setattr__(self, "seed", None)
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise InputError(f"seed must be between 0 and {MAX_SEED}, or {RANDOM_SEED} (or left out) for a random one; "
                             f"got {self.seed}", "seed")  # fmt: skip
        _one_of("acceleration", self.acceleration, ACCELERATION_LEVELS)
        _one_of("output_format", self.output_format, OUTPUT_FORMATS)
        _within("output_quality", self.output_quality, 0, 100)
        _one_of("multi_image_mode", self.multi_image_mode, MULTI_IMAGE_MODES)
        if len(self.references) > MAX_REFERENCES:
            raise InputError(f"at most {MAX_REFERENCES} reference_images are accepted; got {len(self.references)}",
                             "reference_images")  # fmt: skip
        for lora in self.loras:
            _not_longer(lora.field, lora.source, MAX_SOURCE_CHARS)
            _within(lora.field.replace("weights", "strength"), lora.strength, MIN_LORA_STRENGTH, MAX_LORA_STRENGTH)
        if self.keep_unedited:
            _frames_correspond(self)


def _frames_correspond(request: EditRequest) -> None:
    """keep_unedited puts the edit back into the original's frame: only where the output is that
    frame (match_input_image), and not where the conditioning joins several images into one."""
    if request.aspect_ratio != sizes.MATCH_INPUT:
        raise InputError(
            f"keep_unedited needs aspect_ratio match_input_image: with {request.aspect_ratio} the output is another "
            "frame than the photo's, so no part of it lies over the original",
            "keep_unedited",
        )
    if request.references and request.multi_image_mode == "stitch":
        raise InputError(
            "keep_unedited cannot be used with reference_images in stitch mode: the model sees the images joined "
            "side by side, so its output does not lie over the input image's frame; use offset or index",
            "keep_unedited",
        )


def check_frame_for_keep_unedited(width: int, height: int) -> None:
    """An input more extreme than 21:9 or 9:21 is edited at that clamped ratio: its output is not its frame."""
    if not sizes.MIN_RATIO <= width / height <= sizes.MAX_RATIO:
        raise InputError(
            f"keep_unedited cannot be used with this {width}x{height} input: it is wider or taller than 21:9, so it "
            "is edited at 21:9 (or 9:21), another frame than the photo's",
            "keep_unedited",
        )


def _one_of(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise InputError(f"{name} must be one of {', '.join(choices)}; got {value!r}", name)


def _within(name: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise InputError(f"{name} must be between {low:g} and {high:g}; got {value:g}", name)


def _not_longer(name: str, text: str, limit: int) -> None:
    if len(text) > limit:
        raise InputError(f"{name} is longer than {limit} characters; got {len(text)}", name)


# --- other hosts' names for the same inputs ----------------------------------------------------

# Replicate's hosted FLUX.1 Kontext [dev] takes go_fast: true is its 13-call map at 28 steps (this
# container's "go really fast"), false computes every step
GO_FAST_LEVELS = {True: "go really fast", False: "none"}


def go_fast_level(go_fast: bool | str) -> str | None:
    """The acceleration Replicate's ``go_fast`` asks for; None where it was not given (an empty string)."""
    if go_fast == "":
        return None
    if not isinstance(go_fast, bool):
        raise InputError(f"go_fast must be true or false (or left out); got {go_fast!r}", "go_fast")
    return GO_FAST_LEVELS[go_fast]


def one_meaning(name: str, value: object, default: object, alias: str, sent: object, meant: object) -> object:
    """What a caller meant by an input this container names ``name`` and another host names
    ``alias``: ``sent`` is what came under the alias, ``meant`` the same in this container's terms
    (None where the alias was left at its default). The alias's meaning where only it was set,
    ``value`` otherwise; both set to different values is refused."""
    if meant is None or meant == value:
        return value
    if value != default:
        raise InputError(
            f"{alias}={json.dumps(sent)} asks for {name}={json.dumps(meant)}, but {name} is {json.dumps(value)}; "
            "send one of them",
            alias,
        )
    return meant


def one_image(**counts: int) -> None:
    """Other hosts' counts of outputs (num_outputs, num_images, n): this container returns one image."""
    for name, count in counts.items():
        if count != 1:
            raise InputError(
                f"{name}={count}: this container returns one image per prediction; send {count} predictions "
                "(with different seeds) instead",
                name,
            )
