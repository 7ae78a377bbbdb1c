"""The one place that decides image sizes: the output size and the conditioning size."""

from __future__ import annotations

import math
from dataclasses import dataclass

from flux.errors import InputError

# Multiple of every side: 8x VAE downsampling times the 2x2 latent packing.
MULTIPLE = 16
# The model's native side: FLUX.1 Kontext works at about 1024x1024 (its VAE's sample_size);
# a small trained proxy declares a smaller one, and every size below scales with it.
BASE_SIDE = 1024

ASPECT_RATIOS: dict[str, tuple[int, int]] = {
    "1:1": (1, 1),
    "16:9": (16, 9),
    "21:9": (21, 9),
    "3:2": (3, 2),
    "2:3": (2, 3),
    "4:5": (4, 5),
    "5:4": (5, 4),
    "3:4": (3, 4),
    "4:3": (4, 3),
    "9:16": (9, 16),
    "9:21": (9, 21),
}
MATCH_INPUT = "match_input_image"
ASPECT_RATIO_CHOICES = (MATCH_INPUT, *ASPECT_RATIOS)

# The widest and tallest outputs: the extremes of the explicit choices.
MAX_RATIO = 21 / 9
MIN_RATIO = 9 / 21

# (width, height) pairs Kontext was trained on, as Black Forest Labs and diffusers list them.
PREFERRED_KONTEXT_RESOLUTIONS: tuple[tuple[int, int], ...] = (
    (672, 1568),
    (688, 1504),
    (720, 1456),
    (752, 1392),
    (800, 1328),
    (832, 1248),
    (880, 1184),
    (944, 1104),
    (1024, 1024),
    (1104, 944),
    (1184, 880),
    (1248, 832),
    (1328, 800),
    (1392, 752),
    (1456, 720),
    (1504, 688),
    (1568, 672),
)


def _snap(value: float) -> int:
    return max(MULTIPLE, round(value / MULTIPLE) * MULTIPLE)


def size_for_ratio(ratio: float, base: int = BASE_SIDE) -> tuple[int, int]:
    """(width, height) of about base x base pixels with width/height close to ``ratio``, multiples of 16."""
    ratio = min(max(ratio, MIN_RATIO), MAX_RATIO)
    return _snap(base * math.sqrt(ratio)), _snap(base / math.sqrt(ratio))


def output_size(aspect_ratio: str, input_width: int, input_height: int, base: int = BASE_SIDE) -> tuple[int, int]:
    """Output (width, height): about 1 MP (base x base), multiples of 16.

    ``match_input_image`` keeps the input's aspect ratio, clamped to the range of the
    explicit choices (9:21 to 21:9) so that extreme inputs still give a usable image.
    """
    if aspect_ratio == MATCH_INPUT:
        if input_width < 1 or input_height < 1:
            raise InputError(f"input image has no pixels ({input_width}x{input_height})")
        return size_for_ratio(input_width / input_height, base)
    if aspect_ratio not in ASPECT_RATIOS:
        raise InputError(f"aspect_ratio must be one of {', '.join(ASPECT_RATIO_CHOICES)}; got {aspect_ratio!r}")
    w, h = ASPECT_RATIOS[aspect_ratio]
    return size_for_ratio(w / h, base)


def conditioning_size(input_width: int, input_height: int, base: int = BASE_SIDE) -> tuple[int, int]:
    """The preferred Kontext resolution closest in aspect ratio to the input (as diffusers picks it),
    scaled to the model's base side."""
    ratio = input_width / input_height
    _, width, height = min((abs(ratio - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS)
    if base == BASE_SIDE:
        return width, height
    return _snap(width * base / BASE_SIDE), _snap(height * base / BASE_SIDE)


# Several input images. Each reference adds its tokens to the conditioning sequence, and attention
# cost grows with the square of the sequence, so all references together get the token budget of
# one image at the model's side (4096 tokens for FLUX.1 Kontext): the conditioning stays within
# twice one image's tokens whatever their number and sizes.
MAX_REFERENCES = 3


def tokens(width: int, height: int) -> int:
    """Transformer tokens of an image: one per 16x16 pixels (8x VAE, 2x2 packing)."""
    return (width // MULTIPLE) * (height // MULTIPLE)


def reference_size(width: int, height: int, count: int, base: int = BASE_SIDE) -> tuple[int, int]:
    """A reference's size: its aspect ratio (clamped to 9:21..21:9) at 1/count of base x base pixels."""
    ratio = min(max(width / height, MIN_RATIO), MAX_RATIO)
    side = base / math.sqrt(count)
    return _snap(side * math.sqrt(ratio)), _snap(side / math.sqrt(ratio))


def stitched_size(parts: list[tuple[int, int]], base: int = BASE_SIDE) -> tuple[int, int]:
    """The one conditioning image that joins ``parts`` side by side at the first one's height,
    scaled down to at most twice base x base pixels (the same budget as separate references)."""
    height = parts[0][1]
    width = sum(round(w * height / h) for w, h in parts)
    scale = min(1.0, math.sqrt(2 * base * base / (width * height)))
    return _snap(width * scale), _snap(height * scale)


@dataclass(frozen=True)
class ConditioningLayout:
    """Where the conditioning images go (``mode``, one of the multi-image modes) and their sizes: the
    input image's, each reference's (the references share one image's token budget), and in stitch
    mode with references the size of the one image they are all joined into. Decided once
    (``conditioning_layout``) and used by the edit and by the several-device split alike."""

    mode: str
    condition: tuple[int, int]
    references: tuple[tuple[int, int], ...] = ()
    stitched: tuple[int, int] | None = None

    @property
    def tokens(self) -> int:
        """How many conditioning tokens the transformer sees."""
        if self.stitched is not None:
            return tokens(*self.stitched)
        return sum(tokens(w, h) for w, h in (self.condition, *self.references))


def conditioning_layout(
    input_size: tuple[int, int],
    reference_sizes: list[tuple[int, int]],
    mode: str,
    base: int = BASE_SIDE,
    condition: tuple[int, int] | None = None,
    reference_base: int | None = None,
) -> ConditioningLayout:
    """The layout for an input image and references of these sizes, for a model whose side is
    ``base``: the input at the preferred Kontext resolution (or ``condition``), each reference at
    1/k of ``reference_base`` (default ``base``) squared, stitched side by side in ``stitch`` mode."""
    side = reference_base or base
    condition = condition or conditioning_size(*input_size, base)
    references = tuple(reference_size(w, h, len(reference_sizes), side) for w, h in reference_sizes)
    stitched = stitched_size([condition, *references], side) if mode == "stitch" and references else None
    return ConditioningLayout(mode, condition, references, stitched)


def divisible_output_size(width: int, height: int, other_tokens: int, ranks: int) -> tuple[int, int]:
    """The output size nearest (width, height) in aspect ratio, then in area, whose tokens plus
    ``other_tokens`` divide by ``ranks`` (context parallelism splits the token axis evenly); the
    size itself where it already does. At most 4 tokens (64 pixels) off on either side."""
    rows, columns = height // MULTIPLE, width // MULTIPLE
    if (rows * columns + other_tokens) % ranks == 0:
        return width, height
    candidates = [
        (abs(math.log(c * rows / (r * columns))), abs(r * c - rows * columns), r, c)
        for r in range(max(1, rows - 4), rows + 5)
        for c in range(max(1, columns - 4), columns + 5)
        if (r * c + other_tokens) % ranks == 0
    ]
    if not candidates:
        raise InputError(f"no output size near {width}x{height} splits evenly over {ranks} ranks")
    _, _, r, c = min(candidates)
    return c * MULTIPLE, r * MULTIPLE
