"""Keep the unedited: the caller's original photo, at its own size, with only the region the edit
changed replaced by the edited pixels (``keep_unedited``).

The edit's output is the input's frame at about one megapixel (``aspect_ratio`` match_input_image).
The changed region is found there, the working resolution: the original resized to the output's
size against the output, after what a model does to an area it did not edit is taken out (a shift of
a pixel or three, found by alignment; a global colour shift, by each channel's median difference;
VAE noise and softened edges, by blurring both before comparing). Where the blurred difference
passes a threshold, specks are opened away, the region is widened by a margin and its border
feathered: that is the blend's alpha. The full-size image is touched once: outside the region's
bounding box the original's pixels are copied as they are, inside it the output, resized to the
original's size, is blended over them a band of rows at a time (memory stays bounded at 64
megapixels). Where the region covers most of the frame (a style change, a flip, an inversion),
the whole output is returned, resized to the original's size: no seam.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

log = logging.getLogger(__name__)

# blurred difference (0-255, the largest of the three channels) above which a pixel counts as
# changed; docs/quality.md ("Keep the unedited") measures the choice
THRESHOLD = 40.0
SHIFT_SEARCH = 3  # pixels, at the working resolution
COLOUR_SHIFT = 16.0  # the largest global colour shift (0-255) taken out before comparing
WHOLE_ABOVE = 0.5  # share of the frame above which the whole edit is returned
BAND_ROWS = 512  # rows of the full-size image blended at a time


@dataclass(frozen=True)
class Kept:
    """What keep_unedited did: the share of the frame taken from the edit (its changed region,
    widened and feathered) and whether the whole edit was returned instead."""

    changed_share: float
    whole: bool


@dataclass(frozen=True)
class Scale:
    """The region finder's sizes for a working image whose shorter side is ``side`` pixels."""

    blur: float  # sigma of the blur before comparing
    opening: int  # radius of the opening that removes specks
    margin: int  # how far the region is widened
    feather: float  # sigma of the feathered border

    @classmethod
    def for_side(cls, side: int) -> Scale:
        margin = max(2, round(side / 32))
        return cls(blur=max(1.0, side / 256), opening=max(1, round(side / 128)), margin=margin, feather=margin / 2)


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of (C, H, W), separable, edges reflected."""
    radius = max(1, int(3 * sigma))
    taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=torch.float32) / sigma) ** 2)
    taps = (taps / taps.sum()).to(x.dtype)
    channels = x.shape[0]
    x = F.pad(x[None], (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, taps.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    return F.conv2d(x, taps.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)[0]


def _dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """(H, W) widened by a square of side 2 * radius + 1, one axis at a time."""
    if not radius:
        return mask
    widened = F.max_pool2d(mask[None, None], (2 * radius + 1, 1), stride=1, padding=(radius, 0))
    return F.max_pool2d(widened, (1, 2 * radius + 1), stride=1, padding=(0, radius))[0, 0]


def _erode(mask: torch.Tensor, radius: int) -> torch.Tensor:
    return 1 - _dilate(1 - mask, radius)


def _shift(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """(C, H, W) moved by (dy, dx) pixels, edges repeated."""
    _, height, width = x.shape
    rows = (torch.arange(height) - dy).clamp(0, height - 1)
    columns = (torch.arange(width) - dx).clamp(0, width - 1)
    return x[:, rows][:, :, columns]


def _alignment(reference: torch.Tensor, edited: torch.Tensor, search: int) -> tuple[int, int]:
    """The whole-pixel shift of ``reference`` that best matches ``edited``: the smallest mean
    difference over the best-matching three quarters of the pixels (an edited region is a minority
    it leaves out); no shift unless one matches clearly better (flat areas match at any shift).
    Compared on a grid of pixels (every one up to 256 a side, then sparser)."""
    _, height, width = edited.shape
    step = max(1, min(height, width) // 256)
    rows, columns = torch.arange(0, height, step), torch.arange(0, width, step)
    sampled = edited[:, rows][:, :, columns]
    scores = {}
    for dy in range(-search, search + 1):
        for dx in range(-search, search + 1):
            moved = reference[:, (rows - dy).clamp(0, height - 1)][:, :, (columns - dx).clamp(0, width - 1)]
            difference = (moved - sampled).abs().mean(dim=0).flatten()
            kept = difference.kthvalue(max(1, int(0.75 * difference.numel()))).values
            scores[(dy, dx)] = difference[difference <= kept].mean().item()
    best = min(scores, key=lambda shift: (scores[shift], abs(shift[0]) + abs(shift[1])))
    return best if scores[best] < 0.9 * scores[(0, 0)] else (0, 0)


def _colour_shift(difference: torch.Tensor) -> torch.Tensor:
    """A small colour shift of the whole frame (VAE): each channel's median difference, up to a
    bound (a larger one is an edit, an inversion say, and must count)."""
    return difference.flatten(1).median(dim=1).values.clamp(-COLOUR_SHIFT, COLOUR_SHIFT)


def changed_alpha(reference: np.ndarray, edited: np.ndarray, threshold: float = THRESHOLD) -> np.ndarray:
    """The blend's alpha (H, W) in [0, 1] for an edited image and the original at the same size
    (both (H, W, 3) uint8): 1 where the edit changed the picture, 0 where it did not (exactly),
    feathered between."""
    scale = Scale.for_side(min(edited.shape[:2]))
    ref = _blur(torch.tensor(reference, dtype=torch.float32).permute(2, 0, 1), scale.blur)
    out = _blur(torch.tensor(edited, dtype=torch.float32).permute(2, 0, 1), scale.blur)
    dy, dx = _alignment(ref, out - _colour_shift(out - ref)[:, None, None], SHIFT_SEARCH)
    ref = _shift(ref, dy, dx)
    difference = out - ref
    difference = difference - _colour_shift(difference)[:, None, None]
    # where the shift brought in no picture (the frame's edge), nothing is known to have changed
    difference[:, : max(dy, 0)] = difference[:, difference.shape[1] + min(dy, 0) :] = 0
    difference[:, :, : max(dx, 0)] = difference[:, :, difference.shape[2] + min(dx, 0) :] = 0
    changed = (difference.abs().amax(dim=0) > threshold).float()
    changed = _dilate(_erode(changed, scale.opening), scale.opening)  # specks away
    region = _dilate(changed, scale.margin)
    alpha = _blur(region[None], scale.feather)[0].clamp(0, 1)
    alpha = torch.where(region > 0, torch.maximum(alpha, changed), alpha)
    alpha[alpha < 1 / 512] = 0  # beyond the feather: exactly the original
    alpha[alpha > 1 - 1 / 512] = 1
    return alpha.numpy()


def keep_unedited(original: Image.Image, edited: Image.Image, threshold: float = THRESHOLD) -> tuple[Image.Image, Kept]:
    """``original`` (RGB, any size) with the region ``edited`` (RGB, the output) changed replaced by
    the edited pixels resized to the original's size; or the whole edit, resized, when that region
    covers most of the frame."""
    reference = original.resize(edited.size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    alpha = changed_alpha(np.asarray(reference), np.asarray(edited), threshold)
    share = float((alpha > 0).mean())
    if share > WHOLE_ABOVE:
        log.info("keep_unedited: the edit changed %.0f%% of the frame: the whole edit is returned", 100 * share)
        return edited.resize(original.size, Image.Resampling.LANCZOS), Kept(share, True)
    log.info("keep_unedited: the edit changed %.1f%% of the frame; the rest is the original's", 100 * share)
    return _blend(original, edited, alpha), Kept(share, False)


def _blend(original: Image.Image, edited: Image.Image, alpha: np.ndarray) -> Image.Image:
    """A copy of ``original`` with ``edited`` blended over it by ``alpha`` (at the edited image's
    size), inside alpha's bounding box only, a band of rows at a time."""
    result = original.copy()
    rows, columns = np.nonzero(alpha)
    if rows.size == 0:
        return result
    sx, sy = edited.width / original.width, edited.height / original.height
    # the bounding box in the original's pixels, one working pixel wider for the bilinear alpha
    x0 = max(0, int((columns.min() - 1) / sx))
    x1 = min(original.width, int(np.ceil((columns.max() + 2) / sx)))
    y0, y1 = max(0, int((rows.min() - 1) / sy)), min(original.height, int(np.ceil((rows.max() + 2) / sy)))
    alpha_image = Image.fromarray(alpha.astype(np.float32), "F")
    for top in range(y0, y1, BAND_ROWS):
        bottom = min(y1, top + BAND_ROWS)
        box = (x0 * sx, top * sy, x1 * sx, bottom * sy)
        size = (x1 - x0, bottom - top)
        a = np.asarray(alpha_image.resize(size, Image.Resampling.BILINEAR, box=box))[..., None]
        if not a.any():
            continue
        new = np.asarray(edited.resize(size, Image.Resampling.LANCZOS, box=box), dtype=np.float32)
        old = np.asarray(original.crop((x0, top, x1, bottom)), dtype=np.float32)
        blended = np.where(a > 0, np.rint(old + a * (new - old)), old).astype(np.uint8)
        result.paste(Image.fromarray(blended), (x0, top))
    return result
