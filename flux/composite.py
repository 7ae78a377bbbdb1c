"""Keep the unedited: the caller's original photo, at its own size, with only the region the edit
changed replaced by the edited pixels (``keep_unedited``).

The edit's output is the input's frame at about one megapixel (``aspect_ratio`` match_input_image),
redrawn by the model everywhere: fine texture at another phase, softened, with noise, its colours
moved a little, the frame possibly shifted or scaled by a fraction of a percent. The region is
found at the output's size against the original resized to it, after what the model did to the
whole frame is taken out (``flux.alignment``): the output is brought into the photo's geometry
(a sub-pixel shift and scale, found robustly) and the photo's colours are mapped to the output's
(a colour mix, a tone curve per channel, an offset across the frame, fitted robustly; an offset
per channel on frames too small to tell that apart from the edit). What is left
is compared, at several scales, against how much the model redrew an untouched area of that
texture (measured on this frame): a change counts where it is coherent beyond that drift, so a
brightening of 20 levels over a face is found under a regeneration that moves single pixels by
40. Regions grow from confident seeds into what is likely changed around them (hysteresis), are
widened by a margin and feathered.

What comes back is one of three things, never the input in place of an edit:
- the original with the region replaced by the edit, brought into the photo's geometry and
  colours (so no step shows at the border); outside the feather, the original's pixels exactly;
- the whole edit, resized to the original's size, where the edit changed most of the frame, its
  colours as a whole, where no shift and scale explain the frame, or where a change was found
  that no region covers (``Kept.reason`` says which);
- the original itself, where nothing changed beyond the drift.

The full-size image is touched once: outside the region's bounding box the original's pixels are
copied as they are, inside it the edit, resized to the original's size, is blended over them a
band of rows at a time (memory stays bounded at 64 megapixels).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from flux import alignment
from flux.alignment import ColourMap, Transform, robust_scale, tukey_weights

log = logging.getLogger(__name__)

# a change counts where it stands this many times above the drift of its texture, at some scale
# (a seed), and the region grows into what stands GROW_ABOVE times above it around a seed
SEED_ABOVE = 7.0
GROW_ABOVE = 3.5
# and, whatever the drift, only where it moves the colour by at least this much (RGB distance,
# 0-255; half of it for growing): JPEG and VAE noise never count, a 20-level brightening does
MIN_CHANGE = 16.0
# the largest change of the whole frame's colours taken as what a model does by itself (mean RGB
# distance); beyond it the colours were the edit, and the whole edit is returned
MAX_COLOUR_CHANGE = 16.0
# changes are found on scales from the region grid's (half the working size) to the coarsest; those
# at the two finest must be found at the third too
CONFIRMED_FROM = 2
WHOLE_ABOVE = 0.5  # share of the frame above which the whole edit is returned
BAND_ROWS = 512  # rows of the full-size image blended at a time
# opponent axes, orthonormal: a tint moves as far as a brightening of the same RGB distance
_OPPONENT = torch.tensor([[1, 1, 1], [1, -1, 0], [1, 1, -2]], dtype=torch.float32)
_OPPONENT = _OPPONENT / _OPPONENT.norm(dim=1, keepdim=True)


@dataclass(frozen=True)
class Kept:
    """What keep_unedited did: the share of the frame taken from the edit (its changed region,
    widened and feathered), whether the whole edit was returned and why, and what the model did to
    the whole frame (its shift in the original's pixels and scale, its colour change)."""

    changed_share: float
    whole: bool
    reason: str | None = None
    shift: tuple[float, float] = (0.0, 0.0)
    scale: tuple[float, float] = (1.0, 1.0)
    colour_change: float = 0.0

    def metrics(self) -> dict:
        report = {"changed_share": round(self.changed_share, 4), "whole_edit": self.whole}
        if self.reason:
            report["whole_because"] = self.reason
        report["shift_px"] = [round(v, 2) for v in self.shift]
        report["scale"] = [round(v, 5) for v in self.scale]
        report["colour_change"] = round(self.colour_change, 2)
        return report


@dataclass(frozen=True)
class Scale:
    """The region finder's sizes for a working image whose shorter side is ``side`` pixels."""

    margin: int  # how far the region is widened
    feather: float  # sigma of the feathered border
    closing: int  # radius of the closing that fills holes in a region

    @classmethod
    def for_side(cls, side: int) -> Scale:
        margin = max(2, round(side / 64))
        return cls(margin=margin, feather=margin / 2, closing=max(1, round(side / 128)))


@dataclass(frozen=True)
class Found:
    """What the region finder found: the blend's alpha (H, W) at the working size, the edit in the
    photo's geometry and colours (3, H, W), what the model did to the frame, and, where the whole
    edit must be returned instead, why."""

    alpha: torch.Tensor
    edit: torch.Tensor
    transform: Transform
    colours: ColourMap | None
    whole_because: str | None = None


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of (C, H, W), separable, edges reflected."""
    radius = max(1, min(int(3 * sigma), min(x.shape[1:]) - 1))
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


def _reconstruct(markers: torch.Tensor, mask: torch.Tensor, reach: int) -> torch.Tensor:
    """The parts of ``mask`` (H, W, 0/1) connected to ``markers`` within ``reach`` pixels of them
    (grown a pixel at a time inside the mask)."""
    grown = markers * mask
    for step in range(reach):
        wider = _dilate(grown, 1) * mask
        if step % 8 == 7 and torch.equal(wider, grown):
            break
        grown = wider
    return grown


def _drift_scale(
    difference: torch.Tensor, texture: torch.Tensor, luma: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """(3, H, W): how far the model moves each opponent channel of an untouched pixel at this
    scale, for the pixel's class: its texture energy (quantiles of ``texture``, finer towards the
    strongest edges, where a redrawn texture moves most) and its tone (shadows, mid-tones and
    highlights, where a tone curve and clipping leave the most of a colour map's misfit). A robust
    scale per class, never smaller for more texture, never below a quarter level."""
    inside = valid.flatten()
    edges = torch.quantile(texture.flatten()[inside][:200_000], _TEXTURE_QUANTILES[1:-1])
    bins = len(_TEXTURE_QUANTILES) - 1
    tone = torch.bucketize(luma.flatten(), torch.tensor(_TONES))
    classes = torch.bucketize(texture.flatten(), edges) + bins * tone
    flat = difference.flatten(1)

    def scale_of(members: torch.Tensor, otherwise: torch.Tensor) -> torch.Tensor:
        # the 30th percentile of the deviations, as a normal scale: an edit may fill most of a class
        # (a brightened patch of sky is most of the dark, flat pixels) and not raise it; a class of
        # too few pixels to tell takes the wider class's
        count = int(members.sum())
        if count < MIN_CLASS:
            return otherwise
        values = flat[:, members][:, :: max(1, count // 4096)]  # a few thousand tell the percentile
        return torch.quantile(values.abs(), 0.3, dim=1) / 0.3853

    overall = scale_of(inside, torch.zeros(3))
    scales = torch.zeros(3, len(_TONES) + 1, bins)
    for k in range(bins):
        of_texture = (classes % bins == k) & inside
        pooled = scale_of(of_texture, overall)
        for t in range(len(_TONES) + 1):
            # a tone's own drift, but never more than TONE_ABOVE times that of all tones of this
            # texture: an edit can be the only thing of its tone in a frame (a purple shape on white)
            own = scale_of(of_texture & (classes // bins == t), pooled)
            scales[:, t, k] = torch.minimum(own, TONE_ABOVE * pooled)
    scales = torch.cummax(scales.clamp(min=0.25), dim=2).values.flatten(1)
    return scales[:, classes].view_as(difference)


_TEXTURE_QUANTILES = torch.tensor([0, 0.3, 0.5, 0.65, 0.75, 0.83, 0.89, 0.93, 0.955, 0.97, 0.98, 0.987, 0.992, 0.995,
                                   0.997, 0.9985, 1.0])  # fmt: skip
_TONES = [40.0, 215.0]  # luminance (0-255) bounds of shadows and highlights
TONE_ABOVE = 6.0
MIN_CLASS = 32  # pixels a class needs for a drift of its own
TILES = 8  # the displacement of redrawn detail is estimated on TILES x TILES tiles of each scale


def _softening(difference: torch.Tensor, detail: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    """What of the residual (3, h, w) is the photo's fine detail taken away (or added): a VAE softens
    every edge and thin highlight, which leaves a residual of their shape at every scale. The
    residual's robust regression on the photo's two finest bands of detail (``detail``, (2, 3, h, w),
    at this scale), one coefficient per band."""
    x = detail[:, :, inside].flatten(1).T.double()  # (N, 2)
    y = difference[:, inside].flatten().double()
    beta = torch.zeros(2, dtype=torch.float64)
    for _ in range(4):
        residual = (y - x @ beta).float()
        weights = tukey_weights(residual, max(robust_scale(residual), 0.5)).double()
        beta = torch.linalg.solve((x * weights[:, None]).T @ x + 1e-6 * torch.eye(2, dtype=torch.float64),
                                  (x * weights[:, None]).T @ y)  # fmt: skip
    return torch.einsum("b,bchw->chw", beta.float(), detail)


def _displacement(difference: torch.Tensor, photo: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    """What of the residual (3, h, w) is the photo (opponent axes, at this scale) drawn a fraction of a
    pixel away, differently across the frame (a model redraws an edge or a texture where it
    pleases, not where the photo had it to the pixel): residual ~ -(dx, dy) . gradient, with the
    displacement fitted robustly on each of TILES x TILES tiles (the edit, a minority of a tile, is
    weighted out; a tile the edit fills keeps its neighbours' estimate out of its median) and
    spread smoothly between their centres."""
    height, width = difference.shape[1:]
    gy, gx = torch.gradient(photo, dim=(1, 2))
    tiles = max(1, min(TILES, height // 32, width // 32))
    field = torch.zeros(2, tiles, tiles)
    rows, columns = torch.linspace(0, height, tiles + 1).long(), torch.linspace(0, width, tiles + 1).long()
    for i in range(tiles):
        for j in range(tiles):
            window = (slice(None), slice(rows[i], rows[i + 1]), slice(columns[j], columns[j + 1]))
            keep = inside[window[1:]]
            x = torch.stack([gx[window][:, keep].flatten(), gy[window][:, keep].flatten()], dim=1).double()
            y = difference[window][:, keep].flatten().double()
            if y.numel() < 16:
                continue
            beta = torch.zeros(2, dtype=torch.float64)
            for _ in range(3):
                residual = (y - x @ beta).float()
                weights = tukey_weights(residual, max(robust_scale(residual), 0.5)).double()
                normal = (x * weights[:, None]).T @ x + 1e-3 * float(weights.sum()) * torch.eye(2, dtype=torch.float64)
                beta = torch.linalg.solve(normal, (x * weights[:, None]).T @ y)
            field[:, i, j] = beta.float()
    smooth = F.interpolate(field[None], size=(height, width), mode="bilinear", align_corners=False)[0]
    return smooth[0] * gx + smooth[1] * gy


@dataclass(frozen=True)
class _Level:
    """One scale of the residual: where a change is certain (seeds) and likely (grow), the residual
    itself (3, h, w, opponent axes) and the drift it is measured against, and how far above the
    drift a seed stands at this scale."""

    seeds: torch.Tensor
    grow: torch.Tensor
    residual: torch.Tensor
    drift: torch.Tensor
    seed_above: float


def _length(x: torch.Tensor) -> torch.Tensor:
    """(3, h, w) -> (h, w): the length of each pixel's vector (faster than torch.norm over dim 0)."""
    return (x[0] ** 2 + x[1] ** 2 + x[2] ** 2).sqrt()


def _resized(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(h, w) bool mask at another size (nearest)."""
    if tuple(mask.shape) == size:
        return mask
    return F.interpolate(mask[None, None].float(), size=size, mode="nearest")[0, 0] > 0


def _significance(
    moved: torch.Tensor, reference: torch.Tensor, colours: ColourMap, valid: torch.Tensor, grid: int
) -> list[_Level]:
    """Per scale from the region grid's (level ``grid`` of the pyramid) to the coarsest: where the
    residual (the aligned output less the photo's colours mapped, with
    the softening of the photo's detail taken out) stands above the drift of its class. Seeds
    stand clear of the frame's edge (where a model's output is least like the photo) and, at the
    two finest scales, where a redrawn texture has the heaviest tails, higher."""

    def finest(x: torch.Tensor) -> torch.Tensor:  # at the region grid's scale
        for _ in range(grid):
            x = alignment.reduce(x)
        return x

    photo = torch.einsum("oc,chw->ohw", _OPPONENT, reference)
    blurred = alignment.reduce_same(photo)
    band = photo - blurred  # the photo's finest detail, signed
    del photo
    # the strongest detail and the brightest tone within each pixel of a scale: a thin highlight
    # or edge sets its pixel's class however little of the pixel it covers
    peaks = torch.cat([(band**2).sum(dim=0, keepdim=True), alignment.luminance(reference)])
    for _ in range(grid):
        peaks = F.max_pool2d(peaks[None], 2, ceil_mode=True)[0]
    # each part brought to the grid's scale on its own: at most a few full-size images at a time
    everywhere = bool(valid.all())  # (no copies masked where the whole frame has picture)
    parts = [finest(moved if everywhere else moved * valid), finest(reference if everywhere else reference * valid),
             finest(band)]  # fmt: skip
    del band
    parts.append(finest(blurred - alignment.reduce_same(blurred)))  # the next finest detail
    del blurred
    scales = [torch.cat([*parts, finest(valid[None].float())])]
    del parts
    while min(scales[-1].shape[1:]) // 2 >= 16:
        scales.append(alignment.reduce(scales[-1]))
    border = max(4, min(moved.shape[1:]) // 32)
    found = []
    for index, level in enumerate(scales):
        k = grid + index
        inside = level[12] > 0.999
        if inside.sum() < 64:
            break
        residual = torch.einsum("oc,chw->ohw", _OPPONENT, level[:3] - colours.forward(level[3:6])) * inside
        residual = residual - _softening(residual, level[6:12].view(2, 3, *residual.shape[1:]), inside)
        residual = residual - _displacement(residual, torch.einsum("oc,chw->ohw", _OPPONENT, level[3:6]), inside)
        if k > grid:
            peaks = F.max_pool2d(peaks[None], 2, ceil_mode=True)[0]
        nearby_texture, nearby_light = F.max_pool2d(peaks[None], 3, stride=1, padding=1)[0]
        drift = _drift_scale(residual, nearby_texture, nearby_light, inside)
        z = _length(residual / drift) * inside
        distance = _length(residual)
        framed = inside.clone()
        ring = -(-border // 2**k)
        framed[:ring], framed[-ring:], framed[:, :ring], framed[:, -ring:] = False, False, False, False
        seed_above = SEED_ABOVE * {0: 3.0, 1: 2.0}.get(k - grid, 1.0)
        seeds = (z > seed_above) & (distance > MIN_CHANGE) & framed
        found.append(_Level(seeds, (z > GROW_ABOVE) & (distance > MIN_CHANGE / 2), residual, drift, seed_above))
    return found


def _levels(found: list[_Level]) -> list[_Level]:
    """The changes that count, per scale: where the next coarser scale sees a likely change too (a
    real change persists across scales, a texture redrawn at another phase averages away), two
    neighbouring pixels at least (a lone one is a speck), and at the two finest scales, where a
    redrawn highlight or edge can stand out over a few pixels, where the third finds it too."""
    kept = []
    for i, level in enumerate(found):
        seeds, grow = level.seeds, level.grow
        if i + 1 < len(found):
            coarser = _resized(_dilate(found[i + 1].grow.float(), 1) > 0, tuple(grow.shape))
            seeds, grow = seeds & coarser, grow & coarser
        neighbours = F.avg_pool2d(seeds.float()[None, None], 3, stride=1, padding=1, count_include_pad=False)[0, 0] * 9
        kept.append(replace(level, seeds=seeds & (neighbours > 1.5), grow=grow))
    if len(kept) > CONFIRMED_FROM:
        confirming = _dilate(kept[CONFIRMED_FROM].seeds.float(), 1) > 0
        for i in range(CONFIRMED_FROM):
            kept[i] = replace(kept[i], seeds=kept[i].seeds & _resized(confirming, tuple(kept[i].seeds.shape)))
    return kept


def _region(levels: list[_Level], growth: int) -> torch.Tensor:
    """The changed region on the region grid (the finest level's): from the finest scale to the
    coarsest, each seed that the region found so far does not explain (its residual, less the
    region's residual seen at this scale, still stands above the drift) grows into the
    likely-changed pixels connected to it at its scale, at most ``growth`` pixels. A strong change
    is delineated where it is sharpest, and its blur at coarser scales is explained by it; a faint
    broad one (a relit face) is found at the scale where it stands out."""
    size = tuple(levels[0].seeds.shape)
    region = torch.zeros(size)
    for i, level in enumerate(levels):
        explained = levels[0].residual * region
        for _ in range(i):
            explained = alignment.reduce(explained)
        left = level.residual - explained
        new = level.seeds & (_length(left / level.drift) > level.seed_above) & (_length(left) > MIN_CHANGE)
        if new.any():
            grow = torch.maximum(_resized(level.grow, size).float(), region)
            region = torch.maximum(region, _reconstruct(_resized(new, size).float(), grow, growth))
    return region


def _unexplained(levels: list[_Level], alpha: torch.Tensor) -> int:
    """How many seeds (each at its scale) lie farther than two of their pixels from the blend."""
    taken = (alpha > 0).float()[None, None]
    count = 0
    for level in levels:
        covered = F.adaptive_max_pool2d(taken, tuple(level.seeds.shape))[0, 0]
        count += int((level.seeds & (_dilate(covered, 2) == 0)).sum())
    return count


def _alpha(region: torch.Tensor, scale: Scale) -> torch.Tensor:
    """The blend's alpha for a changed region: closed (holes filled), widened by the margin, its
    border feathered outwards; 1 over the widened region."""
    region = _erode(_dilate(region, scale.closing), scale.closing)
    widened = _dilate(region, scale.margin)
    # 1 over the widened region (the blur is a half at its edge), falling to 0 beyond it
    return (2 * _blur(widened[None], scale.feather)[0]).clamp(0, 1)


def find_changes(reference: np.ndarray, edited: np.ndarray) -> Found:
    """What the edit changed, for an edited image and the original at the same size (both (H, W, 3)
    uint8): the blend's alpha (1 where the edit changed the picture, 0 where it did not, exactly,
    feathered between) with the edit in the photo's geometry and colours, or why the whole edit
    must be returned."""
    ref = torch.from_numpy(np.array(reference, dtype=np.float32)).permute(2, 0, 1)
    out = torch.from_numpy(np.array(edited, dtype=np.float32)).permute(2, 0, 1)
    height, width = out.shape[1:]
    aligned = alignment.align(ref, out)
    transform = aligned.transform
    nothing = torch.zeros(height, width)
    if aligned.agreeing < alignment.MIN_AGREEING or not transform.within_bounds(width, height):
        return Found(nothing, out, transform, None, "no shift and scale explain the frame")
    moved, valid = alignment.warp(out, transform)
    colours = alignment.fit_colours(ref, moved, valid)
    if colours.change > MAX_COLOUR_CHANGE and min(height, width) >= alignment.SMALL_FRAME:
        return Found(nothing, out, transform, colours, "the colours of the whole frame changed")
    # regions are found on a grid of half the working size (the full size where that is small)
    grid = 1 if min(height, width) >= 256 else 0
    levels = _levels(_significance(moved, ref, colours, valid, grid))
    if not levels:  # no part of the frame left to compare (a frame of a few pixels)
        return Found(nothing, out, transform, colours, "no shift and scale explain the frame")
    region = _region(levels, max(4, min(levels[0].seeds.shape) // 48))
    alpha = _alpha(region, Scale.for_side(min(region.shape)))
    if _unexplained(levels, alpha) > max(4, 1e-4 * alpha.numel()):
        return Found(nothing, out, transform, colours, "a change was found that no region explains")
    if grid:
        alpha = F.interpolate(alpha[None, None], size=(height, width), mode="bilinear", align_corners=False)[0, 0]
    alpha = alpha * valid
    alpha[alpha < 1 / 512] = 0  # beyond the feather: exactly the original
    alpha[alpha > 1 - 1 / 512] = 1
    rows, columns = torch.nonzero(alpha.any(dim=1)).flatten(), torch.nonzero(alpha.any(dim=0)).flatten()
    if rows.numel():  # the edit in the photo's colours, where it is blended
        top, bottom, left, right = int(rows[0]), int(rows[-1]) + 1, int(columns[0]), int(columns[-1]) + 1
        changed = _resized(region > 0, (height, width))[top:bottom, left:right]
        drift = _drift_around(ref[:, top:bottom, left:right], changed, colours, (top, left, height, width))
        moved[:, top:bottom, left:right] = (moved[:, top:bottom, left:right] - drift).clamp(0, 255)
    return Found(alpha, moved, transform, colours)


def _drift_around(
    photo: torch.Tensor, changed: torch.Tensor, colours: ColourMap, frame: tuple[int, int, int, int]
) -> torch.Tensor:
    """What the model did to the colours (3, h, w) over a crop of the frame, to be taken out of the
    edit before it is blended: where the edit did not change the picture, the colour map's own
    drift of the photo's colours (so the blend's border shows no step); over the changed region,
    the drift of the untouched pixels around it, fading from its border into it (the map knows
    nothing of the edit's new colours: deep inside, the edit keeps the colours the model drew)."""
    drift = colours.forward(photo, frame) - photo
    if not changed.any():
        return drift
    untouched = (~changed).float()[None]
    weight = _coarse_blur(untouched, max(4.0, min(frame[2:]) / 16))
    around = _coarse_blur(drift * untouched, max(4.0, min(frame[2:]) / 16)) / weight.clamp(min=1e-6)
    fade = (2 * _coarse_blur(untouched, max(2.0, min(frame[2:]) / 64))).clamp(max=1)
    return drift * untouched + torch.where(weight > 1e-3, around * fade, 0) * (1 - untouched)


def _coarse_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """A wide Gaussian blur of (C, H, W), computed on blocks of about sigma / 4 pixels and spread
    back bilinearly: the same at a fraction of the cost."""
    block = max(1, int(sigma / 4))
    if block == 1:
        return _blur(x, sigma)
    small = F.avg_pool2d(x[None], block, ceil_mode=True)[0]
    return F.interpolate(_blur(small, sigma / block)[None], size=x.shape[1:], mode="bilinear", align_corners=False)[0]


def keep_unedited(original: Image.Image, edited: Image.Image) -> tuple[Image.Image, Kept]:
    """``original`` (RGB, any size) with the region ``edited`` (RGB, the output) changed replaced by
    the edited pixels brought into the original's geometry and colours and resized to its size; or
    the whole edit, resized, where that is what the edit was (``find_changes``)."""
    reference = original.resize(edited.size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    return compose(original, edited, find_changes(np.asarray(reference), np.asarray(edited)))


def compose(original: Image.Image, edited: Image.Image, found: Found) -> tuple[Image.Image, Kept]:
    """What keep_unedited returns for what ``find_changes`` found: the whole edit resized, the
    original with the region blended in, or the original itself."""
    share = float((found.alpha > 0).float().mean())
    sx, sy = original.width / edited.width, original.height / edited.height
    t = found.transform
    frame = {"shift": (t.shift_x * sx, t.shift_y * sy), "scale": (t.scale_x, t.scale_y),
             "colour_change": found.colours.change if found.colours else 0.0}  # fmt: skip
    reason = found.whole_because or (f"it changed {share:.0%} of the frame" if share > WHOLE_ABOVE else None)
    if reason:
        log.info("keep_unedited: the whole edit is returned: %s", reason)
        return edited.resize(original.size, Image.Resampling.LANCZOS), Kept(1.0, True, reason, **frame)
    if share == 0:
        log.info("keep_unedited: nothing changed beyond what the model redraws everywhere: the original is returned")
        return original.copy(), Kept(0.0, False, **frame)
    log.info("keep_unedited: the edit changed %.1f%% of the frame; the rest is the original's", 100 * share)
    edit = Image.fromarray(found.edit.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy())
    return blend(original, edit, found.alpha.numpy()), Kept(share, False, **frame)


def blend(original: Image.Image, edited: Image.Image, alpha: np.ndarray) -> Image.Image:
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
