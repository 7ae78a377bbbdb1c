"""Real photographs with simulated regeneration: what ``keep_unedited`` meets on a model's output.

The photographs are the public-domain and CC0 colour photos scikit-image ships (its ``data``
folder: an astronaut, a coffee cup, a cat, a rocket launch, a motorcycle), cropped to multiples of
16. A case is one photo, a local edit drawn in the photo's own geometry (``EDITS``), and the
model's regeneration of the whole frame around it (``REGENERATIONS``): fine texture redrawn at
another phase, VAE-level softening and noise, a tone curve with a saturation change and mixed
channels, a sub-pixel shift or a scale. The truth of a case is the edit in the photo's geometry
and colours (``Case.truth``): what a caller should get back.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# scikit-image's colour photographs: (file in skimage/data, where it comes from)
PHOTOS = {
    "astronaut": ("astronaut.png", "NASA, Eileen Collins; public domain"),
    "coffee": ("coffee.png", "Rachel Michetti; CC0"),
    "chelsea": ("chelsea.png", "Stefan van der Walt; CC0"),
    "rocket": ("rocket.jpg", "SpaceX, DSCOVR launch; public domain"),
    "motorcycle": ("motorcycle_left.png", "Middlebury 2014 stereo benchmark, left view"),
}


def photo(name: str) -> np.ndarray:
    """(H, W, 3) uint8, cropped to multiples of 16 (the sizes a Kontext output has)."""
    import skimage.data

    path = Path(skimage.data.__file__).parent / PHOTOS[name][0]
    array = np.asarray(Image.open(path).convert("RGB"))
    height, width = array.shape[0] // 16 * 16, array.shape[1] // 16 * 16
    return np.ascontiguousarray(array[:height, :width])


# --- edits, in the photo's geometry ----------------------------------------------------------------


def _region(shape: tuple[int, int], rng: np.random.Generator, share: float) -> np.ndarray:
    """A soft-edged ellipse (values 0-1, edges 2 pixels wide) of about ``share`` of the frame."""
    height, width = shape
    area = share * height * width
    ratio = rng.uniform(0.6, 1.6)
    rx, ry = math.sqrt(area / math.pi * ratio), math.sqrt(area / math.pi / ratio)
    cx, cy = rng.uniform(rx + 8, width - rx - 8), rng.uniform(ry + 8, height - ry - 8)
    y, x = np.mgrid[0:height, 0:width]
    distance = np.sqrt(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2)
    return np.clip((1 - distance) * min(rx, ry) / 2 + 0.5, 0, 1)


def _brighten(amount: float) -> Callable:
    def edit(image: np.ndarray, region: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return image + amount * region[..., None]

    return edit


def _tint(image: np.ndarray, region: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return image + np.array([28.0, 0.0, -28.0]) * region[..., None]


def _recolour(image: np.ndarray, region: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    swapped = image[..., [2, 0, 1]]
    return image + (swapped - image) * region[..., None]


def _paste(image: np.ndarray, region: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """An object with sharp edges and texture of its own: a patch of another photograph, in a
    rectangle inside the region's bounding box."""
    other = photo("coffee" if image.shape != photo("coffee").shape else "chelsea").astype(np.float64)
    rows, columns = np.nonzero(region > 0.5)
    top, bottom, left, right = rows.min(), rows.max() + 1, columns.min(), columns.max() + 1
    patch_rows = min(bottom - top, other.shape[0])
    patch_columns = min(right - left, other.shape[1])
    oy = int(rng.integers(0, other.shape[0] - patch_rows + 1))
    ox = int(rng.integers(0, other.shape[1] - patch_columns + 1))
    edited = image.copy()
    edited[top : top + patch_rows, left : left + patch_columns] = other[oy : oy + patch_rows, ox : ox + patch_columns]
    return edited


MIN_RECOLOURED_CHROMA = 30.0  # the mean (max - min of RGB) of the region a recolour is placed on

EDITS: dict[str, Callable | None] = {
    "none": None,
    "brighten +20": _brighten(20),
    "brighten +25": _brighten(25),
    "darken -25": _brighten(-25),
    "brighten +40": _brighten(40),
    "brighten +60": _brighten(60),
    "tint (red +28, blue -28)": _tint,
    "recolour (channels swapped)": _recolour,
    "pasted object": _paste,
}


# --- regeneration of the whole frame ----------------------------------------------------------------


@dataclass(frozen=True)
class Regeneration:
    """What a model does to the whole frame, by strength: the high band's phase moved by a smooth
    displacement of ``texture`` pixels; a blur of ``soften`` sigma and white noise of ``noise``
    levels; per-channel gamma within ``1 +- tone``, saturation ``1 +- saturation``, channels mixed
    by ``mix``, an offset varying across the frame of up to ``offset`` levels; the frame shifted by
    ``shift`` pixels (x, y) and scaled by ``scale``."""

    texture: float = 0.0
    soften: float = 0.0
    noise: float = 0.0
    tone: float = 0.0
    saturation: float = 0.0
    mix: float = 0.0
    offset: float = 0.0
    shift: tuple[float, float] = (0.0, 0.0)
    scale: float = 1.0


REGENERATIONS = {
    "vae": Regeneration(soften=0.8, noise=3.0),
    "texture": Regeneration(texture=1.5),
    "tone": Regeneration(tone=0.08, saturation=0.08, mix=0.03, offset=4.0),
    "shift 2.5 px": Regeneration(shift=(2.5, -1.5)),
    "shift 8 px": Regeneration(shift=(-8.0, 5.5)),
    "scale 1%": Regeneration(scale=1.01),
    "scale -1.5% shift 3 px": Regeneration(scale=0.985, shift=(3.0, 2.0)),
    "all, mild": Regeneration(texture=1.0, soften=0.6, noise=2.0, tone=0.04, saturation=0.04, mix=0.02, offset=2.0,
                              shift=(1.5, -0.5)),
    "all, strong": Regeneration(texture=1.5, soften=1.0, noise=4.0, tone=0.08, saturation=0.08, mix=0.03, offset=4.0,
                                shift=(-4.0, 2.5), scale=1.008),
}  # fmt: skip


def _blur(image: np.ndarray, sigma: float) -> np.ndarray:
    x = torch.from_numpy(image).float().permute(2, 0, 1)[None]
    radius = max(1, int(3 * sigma))
    taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=torch.float32) / sigma) ** 2)
    taps = taps / taps.sum()
    x = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, taps.view(1, 1, 1, -1).expand(3, 1, 1, -1), groups=3)
    x = F.conv2d(x, taps.view(1, 1, -1, 1).expand(3, 1, -1, 1), groups=3)
    return x[0].permute(1, 2, 0).double().numpy()


def _sample(image: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """``image`` (H, W, 3) read at pixel positions (xs, ys) (each (H, W)), bicubic, edges repeated."""
    height, width = image.shape[:2]
    grid = torch.from_numpy(np.stack([(2 * xs + 1) / width - 1, (2 * ys + 1) / height - 1], axis=-1)).float()
    x = torch.from_numpy(image).float().permute(2, 0, 1)[None]
    return F.grid_sample(x, grid[None], mode="bicubic", padding_mode="border", align_corners=False)[0].permute(
        1, 2, 0).double().numpy()  # fmt: skip


def _smooth_field(shape: tuple[int, int], rng: np.random.Generator, amplitude: float) -> np.ndarray:
    """A smooth random field (H, W) of about ``amplitude`` (features some 20 pixels across)."""
    height, width = shape
    coarse = rng.normal(0, 1, (max(2, height // 20), max(2, width // 20), 1))
    field = np.asarray(Image.fromarray(coarse[..., 0].astype(np.float32), "F").resize((width, height),
                                                                                      Image.Resampling.BICUBIC))  # fmt: skip
    return amplitude * field / max(field.std(), 1e-6)


def regenerate(image: np.ndarray, how: Regeneration, rng: np.random.Generator) -> np.ndarray:
    """The model's output for an image it edited (float (H, W, 3)): uint8."""
    height, width = image.shape[:2]
    out = image.astype(np.float64)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    if how.texture:
        high = out - _blur(out, 1.2)
        moved = _sample(high, x + _smooth_field((height, width), rng, how.texture),
                        y + _smooth_field((height, width), rng, how.texture))  # fmt: skip
        out = out - high + moved
    if how.tone or how.saturation or how.mix or how.offset:
        gamma = 1 + rng.uniform(-how.tone, how.tone, 3)
        out = 255 * (np.clip(out, 0, 255) / 255) ** gamma
        grey = out.mean(axis=2, keepdims=True)
        out = grey + (out - grey) * (1 + rng.uniform(-how.saturation, how.saturation))
        mixing = np.eye(3) + rng.uniform(-how.mix, how.mix, (3, 3))
        mixing /= mixing.sum(axis=1, keepdims=True)
        out = out @ mixing.T
        gradient = (x / width - 0.5)[..., None] * rng.uniform(-1, 1, 3) + (y / height - 0.5)[..., None] * rng.uniform(
            -1, 1, 3
        )
        out = out + how.offset * gradient + rng.uniform(-how.offset, how.offset, 3) / 2
    if how.shift != (0.0, 0.0) or how.scale != 1.0:
        # the model draws photo point p at centre + scale * (p - centre) + shift; read back
        cx, cy = (width - 1) / 2, (height - 1) / 2
        out = _sample(out, cx + (x - cx - how.shift[0]) / how.scale, cy + (y - cy - how.shift[1]) / how.scale)
    if how.soften:
        out = _blur(out, how.soften)
    if how.noise:
        out = out + rng.normal(0, how.noise, out.shape)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class Case:
    photo: str
    edit: str
    regeneration: str
    original: np.ndarray  # (H, W, 3) uint8: the caller's photo
    truth: np.ndarray  # (H, W, 3) uint8: the edit in the photo's geometry and colours
    output: np.ndarray  # (H, W, 3) uint8: what the model returned
    visible: np.ndarray  # (H, W) bool: the pixels the edit visibly changed (more than 8 levels)


def case(name: str, edit: str, regeneration: str, seed: int) -> Case:
    rng = np.random.default_rng(seed)
    original = photo(name)
    region = _region(original.shape[:2], rng, rng.uniform(0.01, 0.04))
    # a recolour is asked of something coloured: on grey it changes nothing
    chroma = np.ptp(original.astype(np.float64), axis=2)
    for _ in range(100 if edit.startswith("recolour") else 0):
        if (chroma * region).sum() / region.sum() >= MIN_RECOLOURED_CHROMA:
            break
        region = _region(original.shape[:2], rng, rng.uniform(0.01, 0.04))
    draw = EDITS[edit]
    truth = original.astype(np.float64) if draw is None else draw(original.astype(np.float64), region, rng)
    truth = np.clip(np.rint(truth), 0, 255).astype(np.uint8)
    output = regenerate(truth, REGENERATIONS[regeneration], rng)
    visible = np.abs(truth.astype(int) - original).max(axis=2) > 8
    return Case(name, edit, regeneration, original, truth, output, visible)


def untouched_psnr(c: Case) -> float:
    """PSNR of the output against the photo over what the edit did not change, before any alignment."""
    keep = ~c.visible
    mse = float(((c.output[keep].astype(np.float64) - c.original[keep]) ** 2).mean())
    return 100.0 if mse == 0 else 10 * math.log10(255**2 / mse)


# --- measuring a region finder on the cases ------------------------------------------------------

# the background measured: farther than this share of the shorter side from the edit's visible pixels
MARGIN = 1 / 16
# the kinds with nothing but a shift or a scale: where the placement of a pasted object is measured
GEOMETRIC = ("shift 2.5 px", "shift 8 px", "scale 1%", "scale -1.5% shift 3 px")


@dataclass(frozen=True)
class Outcome:
    """What a region finder returned for a case: the image the caller gets (H, W, 3), the blend's
    alpha (H, W) (ones where the whole edit came back) and whether the whole edit came back."""

    result: np.ndarray
    alpha: np.ndarray
    whole: bool


Finder = Callable[[np.ndarray, np.ndarray], Outcome]


def product_finder(original: np.ndarray, output: np.ndarray) -> Outcome:
    """keep_unedited as the product runs it (the photo and the output are the same size here)."""
    from flux.composite import compose, find_changes

    found = find_changes(original, output)
    result, kept = compose(Image.fromarray(original), Image.fromarray(output), found)
    alpha = np.ones(original.shape[:2], np.float32) if kept.whole else found.alpha.numpy()
    return Outcome(np.asarray(result), alpha, kept.whole)


def _near(mask: np.ndarray, radius: int) -> np.ndarray:
    widened = torch.from_numpy(mask.astype(np.float32))[None, None]
    widened = F.max_pool2d(widened, (2 * radius + 1, 1), 1, (radius, 0))
    return F.max_pool2d(widened, (1, 2 * radius + 1), 1, (0, radius))[0, 0].numpy() > 0


def _psnr(a: np.ndarray, b: np.ndarray, where: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2)[where].mean())
    return 100.0 if mse == 0 else 10 * math.log10(255**2 / mse)


def _low_pass_difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|blur(a - b)| per pixel (RGB distance, blur sigma 2): a colour step, with texture averaged out."""
    difference = _blur(a.astype(np.float32) - b.astype(np.float32), 2.0)
    return np.sqrt((difference**2).sum(axis=2))


def measure(c: Case, outcome: Outcome) -> dict:
    """The figures of one case: whether the whole edit came back; the share of the edit's visibly
    changed pixels that came back (alpha at least one half, or the whole edit); the share of the
    background beyond MARGIN that is exactly the photo's (composited edits); the placement of the
    edit (PSNR to the truth over the visible pixels at least 3 pixels inside the edit's edge); the
    seam: the colour step, low-passed, where the blend is feathered (0 < alpha < 1, away from the
    edit's own pixels), beside the same for the model's output there."""
    row: dict = {"photo": c.photo, "edit": c.edit, "regeneration": c.regeneration, "whole": outcome.whole,
                 "untouched_psnr": untouched_psnr(c)}  # fmt: skip
    exact = (outcome.result == c.original).all(axis=2)
    if not c.visible.any():
        row["input_back"] = bool(exact.all())
        return row
    side = min(c.original.shape[:2])
    row["recall"] = 1.0 if outcome.whole else float((outcome.alpha[c.visible] >= 0.5).mean())
    if outcome.whole:
        return row
    far = ~_near(c.visible, round(MARGIN * side))
    row["background_exact"] = float(exact[far].mean())
    interior = c.visible & ~_near(~c.visible, 3)
    if interior.any():
        row["placement_psnr"] = _psnr(outcome.result, c.truth, interior)
    band = (outcome.alpha > 0) & (outcome.alpha < 1) & ~_near(c.visible, 2)
    if band.any():
        row["seam_step"] = float(_low_pass_difference(outcome.result, c.original)[band].mean())
        row["seam_step_output"] = float(_low_pass_difference(c.output, c.original)[band].mean())
    return row


def cases(photos: tuple[str, ...] = tuple(PHOTOS), regenerations: tuple[str, ...] = tuple(REGENERATIONS),
          edits: tuple[str, ...] = tuple(EDITS), draw: str = "") -> list[tuple[str, str, str, int]]:  # fmt: skip
    """(photo, edit, regeneration, seed) for every combination; the seed follows from the names (and
    ``draw``: another draw of regions and regenerations for the same names)."""
    import zlib

    return [(p, e, r, zlib.crc32(f"{draw}{p}|{r}|{e}".encode()) % 10_000)
            for p in photos for r in regenerations for e in edits]  # fmt: skip


def evaluate(
    finder: Finder, chosen: list[tuple[str, str, str, int]], log: Callable[[str], None] | None = None
) -> list[dict]:
    rows = []
    for name, edit, regeneration, seed in chosen:
        c = case(name, edit, regeneration, seed)
        rows.append(measure(c, finder(c.original, c.output)))
        if log:
            log(f"{name} | {regeneration} | {edit}: " + ", ".join(f"{k} {v:.3f}" for k, v in rows[-1].items()
                                                                   if isinstance(v, float)))  # fmt: skip
    return rows


def summary(rows: list[dict], by: str) -> list[dict]:
    """Per value of ``by`` ("edit" or "regeneration"): edits lost (less than 80% of their visible
    pixels back and not whole), the share with at least 95% back, the share returned whole, the
    lowest share of the background exact, the lowest placement PSNR (geometric kinds only, pasted
    objects), the mean seam step beside the output's, and for cases without an edit, the share
    returned as the input exactly."""
    table = []
    for value in dict.fromkeys(r[by] for r in rows):
        group = [r for r in rows if r[by] == value]
        edited = [r for r in group if "recall" in r]
        composited = [r for r in edited if not r["whole"]]
        placed = [r["placement_psnr"] for r in composited
                  if r["edit"] == "pasted object" and r["regeneration"] in GEOMETRIC and "placement_psnr" in r]  # fmt: skip
        seams = [r for r in composited if "seam_step" in r]
        unedited = [r for r in group if "input_back" in r]
        table.append({
            by: value,
            "cases": len(group),
            "lost": sum(r["recall"] < 0.8 and not r["whole"] for r in edited),
            "recall_95": sum(r["recall"] >= 0.95 for r in edited) / len(edited) if edited else None,
            "whole": sum(r["whole"] for r in edited) / len(edited) if edited else None,
            "background_exact_min": min((r["background_exact"] for r in composited), default=None),
            "placement_min": min(placed, default=None),
            "seam_step": float(np.mean([r["seam_step"] for r in seams])) if seams else None,
            "seam_step_output": float(np.mean([r["seam_step_output"] for r in seams])) if seams else None,
            "input_back": sum(r["input_back"] for r in unedited) / len(unedited) if unedited else None,
            "untouched_psnr": float(np.mean([r["untouched_psnr"] for r in group])),
        })  # fmt: skip
    return table
