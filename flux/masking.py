"""Masked edits: the caller says where (``mask``: white edits, black keeps, grey edits partly) and
the photo keeps its own resolution everywhere else.

- Where the mask covers a small part of a large photo, the edit runs on a crop around it
  (``crop_box``): the mask's box widened by context, at least the model's own resolution of the
  photo's pixels, never past the frame.
- In the loop the mask reaches the latent grid by area, widened by ``WIDEN`` latent pixels so the
  VAE's decoder sees edited latents on both sides of the mask's edge (``latent_weights``); the
  loop puts the source back outside it after every step (``flux.edit.keep_source``).
- The result is the photo at its own size: outside the mask's feather its pixels exactly, inside
  the edit resized into the crop's place, across a border feathered over ``FEATHER`` of the
  photo's shorter side on each side of the mask's edge, plus up to two pixels of the size it is
  worked out at (the crop's, at most ``WORKING_PIXELS``) (``feather``, ``stitch``).
"""

from __future__ import annotations

import base64
import binascii
import logging
import math
import urllib.parse

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from flux import images, sizes
from flux.composite import blend
from flux.errors import InputError
from flux.lora_sources import describe
from flux.outbound import AddressPolicy, FetchError, FetchLimits, get_bytes

log = logging.getLogger(__name__)

# the crop reaches this share of the mask box's longer side beyond the box on every side: the
# smallest context that edits as well as the whole frame (docs/quality.md, "Masked edits": a
# quarter edits far worse, more edits no better)
CONTEXT = 0.5
# a crop is made where it is at most this share of the photo; above it the whole frame is edited
CROP_BELOW = 0.5
# latent pixels (8 of the output's) the mask is widened by in the loop
WIDEN = 2
# the border's feather on each side of the mask's edge, as a share of the photo's shorter side
FEATHER = 0.01
# the border is worked out at the crop's size, or this many pixels where the crop is larger
WORKING_PIXELS = 4_000_000
MAX_MASK_BYTES = 64 << 20

Box = tuple[int, int, int, int]  # left, top, right, bottom in the photo's pixels


def mask_source(value: str, name: str = "mask") -> bytes | str | None:
    """What a caller sent as a mask, as text: None for none (""), the bytes of a data URI, or an
    http(s) URL to fetch when the edit runs (``fetch_mask``)."""
    text = value.strip()
    if not text:
        return None
    if text.startswith("data:"):
        header, _, payload = text.partition(",")
        try:
            if header.endswith(";base64"):
                return base64.b64decode(payload, validate=True)
            return urllib.parse.unquote_to_bytes(payload)
        except (binascii.Error, ValueError):
            raise InputError(f"{name} is a data URI whose base64 data is not valid", name) from None
    if urllib.parse.urlsplit(text).scheme in ("http", "https"):
        return text
    raise InputError(f"{name} must be a data URI or an http(s) URL of an image (or empty for none)", name)


def fetch_mask(url: str, policy: AddressPolicy, limits: FetchLimits, name: str = "mask") -> bytes:
    """The mask at ``url``, fetched under the product's address rule and bounds. Whatever went
    wrong, the caller gets one message (the log has the reason): answers cannot map what the
    server can reach."""
    try:
        return get_bytes(url, limits=limits, policy=policy, limit=MAX_MASK_BYTES)
    except FetchError as exc:
        log.info("%s: fetching %s failed: %s", name, describe(url), exc)
        raise InputError(f"{name}: could not fetch the mask from {describe(url)}", name) from None


def coverage(mask: Image.Image) -> tuple[int, int]:
    """The mask's lowest and highest level (0-255): (0, 0) keeps everything, (255, 255) edits everything."""
    return mask.getextrema()


def crop_box(mask: Image.Image, base: int = sizes.BASE_SIDE, context: float | None = None) -> Box | None:
    """Where to edit a photo of the mask's size: a box around what the mask marks, widened by
    ``CONTEXT``, at least ``base`` x ``base`` of the photo's pixels (the model's resolution, so a
    small region is edited at its own pixels or finer), its aspect within 9:21 and 21:9, inside
    the frame; None (the whole frame) where that box is more than ``CROP_BELOW`` of the photo."""
    width, height = mask.size
    left, top, right, bottom = mask.getbbox()
    margin = (CONTEXT if context is None else context) * max(right - left, bottom - top)
    w, h = right - left + 2 * margin, bottom - top + 2 * margin
    grow = max(1.0, base / math.sqrt(w * h))
    w, h = w * grow, h * grow
    w, h = max(w, h * sizes.MIN_RATIO), max(h, w / sizes.MAX_RATIO)
    w, h = min(round(w), width), min(round(h), height)
    if w * h > CROP_BELOW * width * height:
        return None
    x0 = min(max(0, round((left + right - w) / 2)), width - w)
    y0 = min(max(0, round((top + bottom - h) / 2)), height - h)
    return x0, y0, x0 + w, y0 + h


def latent_weights(mask: Image.Image, width: int, height: int) -> torch.Tensor:
    """The mask (at the edited region's size) on the latent grid of a ``width`` x ``height``
    output: (height / 8, width / 8) in [0, 1], each latent pixel the share of its area the mask
    marks, widened by ``WIDEN`` latent pixels (the largest level around it)."""
    grid = images.resize_mask(mask, (width // 8, height // 8))
    weights = torch.from_numpy(np.asarray(grid, dtype=np.float32) / 255.0)
    return F.max_pool2d(weights[None, None], 2 * WIDEN + 1, stride=1, padding=WIDEN)[0, 0]


def _working_size(box: Box) -> tuple[int, int]:
    """The size the border is worked out at: the box's own, or at most ``WORKING_PIXELS``."""
    width, height = box[2] - box[0], box[3] - box[1]
    scale = min(1.0, math.sqrt(WORKING_PIXELS / (width * height)))
    return max(1, round(width * scale)), max(1, round(height * scale))


def feather(photo_size: tuple[int, int], box: Box | None) -> tuple[int, float]:
    """The border's feather: its radius at the working size (``FEATHER`` of the photo's shorter
    side, at least one pixel), and how far past the mask's edge the blend can reach in the photo's
    pixels (that radius, plus two working pixels for the resampling on either side)."""
    box = box or (0, 0, *photo_size)
    scale = (box[2] - box[0]) / _working_size(box)[0]  # the photo's pixels per working pixel
    radius = max(1, round(FEATHER * min(photo_size) / scale))
    return radius, (radius + 2) * scale


def stitch(photo: Image.Image, edited: Image.Image, mask: Image.Image, box: Box | None) -> Image.Image:
    """``photo`` with ``edited`` (the edit of ``box``, None: of the whole frame) blended in where
    ``mask`` (at the photo's size) marks, its border feathered (``feather``); elsewhere the
    photo's pixels exactly."""
    whole = (0, 0, *photo.size)
    box = box or whole
    size = _working_size(box)
    weights = np.asarray(images.resize_mask(mask.crop(box) if box != whole else mask, size), dtype=np.float32)
    radius, _ = feather(photo.size, box)
    alpha = _box_blur(torch.from_numpy(weights / 255.0), radius).numpy()
    edited = images.resize(edited, *size)
    if box == whole:
        return blend(photo, edited, alpha)
    result = photo.copy()
    result.paste(blend(photo.crop(box), edited, alpha), box[:2])
    return result


def _box_blur(weights: torch.Tensor, radius: int) -> torch.Tensor:
    """(H, W) averaged over a square of side 2 * radius + 1 (edges repeated): a hard edge becomes a
    ramp ``radius`` wide on each side, and nothing reaches further."""
    side = 2 * radius + 1
    padded = F.pad(weights[None, None], (radius, radius, radius, radius), mode="replicate")
    rows = F.avg_pool2d(padded, (side, 1), stride=1)  # one axis at a time: the same square, in 2 x side
    return F.avg_pool2d(rows, (1, side), stride=1)[0, 0].clamp(0, 1)
