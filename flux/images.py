"""The one place that parses input images and writes output images."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps

from flux.errors import EditError, InputError

log = logging.getLogger(__name__)

# Pillow labels a JPEG whose MPF header lists a second image "MPO" (stereo cameras, the previews
# many phones and cameras embed): its first image is a plain JPEG.
ACCEPTED_FORMATS = ("JPEG", "MPO", "PNG", "GIF", "WEBP")
# Pixel count above which an input is refused before its pixels are decoded
# (a 30000x30000 PNG of a few KB would otherwise take gigabytes).
MAX_INPUT_PIXELS = 64_000_000
# Transparent pixels are composited on this background.
BACKGROUND = (255, 255, 255)
OUTPUT_FORMATS = {"webp": "WEBP", "jpg": "JPEG", "png": "PNG", "jpeg": "JPEG"}


def load_image(source: str | os.PathLike | bytes, name: str = "input_image", reduce: bool = True) -> Image.Image:
    """Open an input image: checked, EXIF-rotated, flattened to 8-bit RGB; of several frames or
    pictures, the first.

    Raises InputError naming the input (``name``) and the problem for anything that is not a
    usable jpeg, png, gif or webp image, whatever the decoder raised. ``reduce``: decode a large
    JPEG at a reduced scale (the edit resizes it to about 1 MP anyway); False for every pixel.
    """
    return to_rgb(_open(source, name, reduce))


def load_mask(source: str | os.PathLike | bytes, size: tuple[int, int], name: str = "mask") -> Image.Image:
    """A mask for an image of ``size`` (its size after EXIF rotation), as an 8-bit "L" image of that
    size: 255 edits, 0 keeps, grey between edits partly. White is 255 (luminance); in a mask whose
    only content is its alpha channel (the same colour everywhere, some of it transparent),
    transparent is 255, as FLUX.1 Fill reads it; other transparent pixels count as black.

    Any size with the image's aspect ratio (each side within a pixel of what the other implies) is
    resized to ``size``; another aspect ratio is refused (InputError naming ``name``)."""
    mask = _mask_levels(_open(source, name, reduce=False))
    width, height = size
    if not same_aspect(mask.size, size):
        raise InputError(
            f"{name} is {mask.width}x{mask.height}, another aspect ratio than the {width}x{height} input image; "
            "send a mask of the input image's shape (any size)",
            name,
        )
    return resize_mask(mask, size)


def same_aspect(size: tuple[int, int], other: tuple[int, int]) -> bool:
    """Whether ``size`` has ``other``'s aspect ratio within a pixel's rounding: one of its sides
    within a pixel of what its other side implies."""
    (w, h), (ow, oh) = size, other
    return abs(w * oh / ow - h) <= 1 or abs(h * ow / oh - w) <= 1


def _mask_levels(image: Image.Image) -> Image.Image:
    if image.mode in ("P", "PA") or "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "RGBa", "La"):
        image = image.convert("RGBA")
        rgba = np.asarray(image)
        alpha = rgba[..., 3]
        if alpha.min() < 255 and (rgba[..., :3] == rgba[0, 0, :3]).all():
            return Image.fromarray(255 - alpha, "L")
        return Image.alpha_composite(Image.new("RGBA", image.size, (0, 0, 0, 255)), image).convert("L")
    return to_rgb(image).convert("L")


def resize_mask(mask: Image.Image, size: tuple[int, int]) -> Image.Image:
    """An "L" mask at ``size``: by area where it shrinks (a pixel's share of white is its grey),
    bilinear where it grows; never thresholded."""
    if mask.size == size:
        return mask
    shrinks = size[0] * size[1] < mask.width * mask.height
    return mask.resize(size, Image.Resampling.BOX if shrinks else Image.Resampling.BILINEAR)


def _open(source: str | os.PathLike | bytes, name: str, reduce: bool) -> Image.Image:
    """The first picture, checked, decoded and EXIF-rotated, in the mode it was stored in."""
    data = _read(source, name)
    image = _identify(io.BytesIO(data), len(data), name)
    try:
        return _decode(image, name, reduce)
    except MemoryError:
        raise
    except Exception as exc:  # decoders meet malformed data with many types (struct.error, IndexError, ...)
        log.info("%s: %s while decoding: %s", name, type(exc).__name__, exc)
        raise InputError(
            f"{name} could not be decoded: its {image.format} data is truncated or corrupt", name
        ) from None


def header_size(source: str | os.PathLike | bytes, name: str = "input_image") -> tuple[int, int]:
    """(width, height) as the image's header declares it, before EXIF rotation, no pixel decoded
    (of a file, only its header is read); checked as ``load_image`` checks it."""
    if isinstance(source, bytes):
        return _identify(io.BytesIO(_read(source, name)), len(source), name).size
    length = _not_empty(Path(source).stat().st_size, name)
    with open(source, "rb") as stream:
        return _identify(stream, length, name).size


def _read(source: str | os.PathLike | bytes, name: str) -> bytes:
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    _not_empty(len(data), name)
    return data


def _not_empty(length: int, name: str) -> int:
    if not length:
        raise InputError(f"{name} is empty (0 bytes)", name)
    return length


def _identify(stream: BinaryIO, length: int, name: str) -> Image.Image:
    """The image's header read from ``stream`` (``length`` bytes; no pixels yet), its format and size checked."""
    try:
        with warnings.catch_warnings():  # Pillow warns from 89 megapixels; the limit here is lower
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(stream)
    except Image.DecompressionBombError:
        raise InputError(_too_large(f"{name} declares far too many pixels"), name) from None
    except MemoryError:
        raise
    except Exception as exc:  # not an image, or a header a plugin cannot read (NotImplementedError, ...)
        log.info("%s: %s while identifying: %s", name, type(exc).__name__, exc)
        raise InputError(
            f"{name} is not a readable image ({length} bytes); send a jpeg, png, gif or webp file", name
        ) from None
    if image.format not in ACCEPTED_FORMATS:
        raise InputError(f"{name} format {image.format} is not supported; send a jpeg, png, gif or webp file", name)
    width, height = image.size
    if width * height > MAX_INPUT_PIXELS:
        raise InputError(_too_large(f"{name} is {width}x{height} pixels"), name)
    return image


def _decode(image: Image.Image, name: str, reduce: bool) -> Image.Image:
    frames = getattr(image, "n_frames", 1)
    if frames > 1:
        what = f"holds {frames} pictures (MPO)" if image.format == "MPO" else f"is animated ({frames} frames)"
        log.warning("%s %s: using the first", name, what)
        image.seek(0)
    if reduce and image.format in ("JPEG", "MPO"):
        # decode large JPEGs at a reduced scale: memory stays bounded, quality is unaffected
        # since the image is downscaled to about 1 MP anyway
        image.draft("RGB", (1024, 1024))
    image.load()
    return ImageOps.exif_transpose(image)


def _too_large(what: str) -> str:
    return f"{what}, more than the {MAX_INPUT_PIXELS // 1_000_000} megapixels accepted; send a smaller image"


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB; transparency composited on a white background, 16-bit scaled down."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        image = Image.fromarray(_to_8_bit(np.asarray(image), image.mode.startswith("I;16")), "L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode != "RGB":
        return image.convert("RGB")
    return image


def _to_8_bit(array: np.ndarray, sixteen_bit: bool) -> np.ndarray:
    """round(value / peak * 255) in integers, a band of rows at a time: a 64-megapixel input needs
    a few MB beside its pixels, not the gigabytes of a float64 copy."""
    peak = 65535 if sixteen_bit or array.max() > 255 else 255
    out = np.empty(array.shape, dtype=np.uint8)
    rows = max(1, (1 << 18) // max(1, array.shape[1]))
    for top in range(0, array.shape[0], rows):
        band = np.clip(array[top : top + rows].astype(np.int64), 0, peak)
        out[top : top + rows] = (band * 255 + peak // 2) // peak
    return out


def resize(image: Image.Image, width: int, height: int) -> Image.Image:
    """Resize with Lanczos, as diffusers' image processor does."""
    if image.size == (width, height):
        return image
    return image.resize((width, height), Image.Resampling.LANCZOS)


def stitch(parts: list[Image.Image], size: tuple[int, int]) -> Image.Image:
    """``parts`` side by side at the first one's height (aspect ratios kept), resized to ``size``."""
    height = parts[0].height
    scaled = [resize(p, max(1, round(p.width * height / p.height)), height) for p in parts]
    strip = Image.new("RGB", (sum(p.width for p in scaled), height))
    x = 0
    for part in scaled:
        strip.paste(part, (x, 0))
        x += part.width
    return resize(strip, *size)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB image -> (1, 3, H, W) float32 in [-1, 1]."""
    array = np.asarray(image, dtype=np.uint8).astype(np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0) * 2.0 - 1.0


def to_pil(decoded: torch.Tensor) -> Image.Image:
    """(1, 3, H, W) in [-1, 1] -> RGB image."""
    array = (decoded[0] / 2 + 0.5).clamp(0, 1).permute(1, 2, 0).float().cpu().numpy()
    return Image.fromarray((array * 255).round().astype(np.uint8))


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it (os.umask can only read
    it by setting it, a moment in which another thread's new file would get the wrong mode)."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        status = Path("/proc/self/status").read_text().splitlines()
        return int(next(line for line in status if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_image(image: Image.Image, path: str | os.PathLike, output_format: str, quality: int = 80) -> Path:
    """Write atomically: a reader sees the whole file or none (never a half-written one).
    ``output_format``: one of OUTPUT_FORMATS; ``quality`` 0 to 100 (flux.request checks both)."""
    path = Path(path)
    options: dict = {}
    if output_format in ("webp", "jpg"):
        options["quality"] = quality
    buffer = io.BytesIO()
    image.save(buffer, format=OUTPUT_FORMATS[output_format], **options)
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
        with os.fdopen(fd, "wb") as f:
            f.write(buffer.getvalue())
            # mkstemp's file is private (0600); the output gets the mode any new file gets here
            os.fchmod(f.fileno(), 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise EditError(f"the output image could not be written to {path.parent}: {exc.strerror}") from None
        raise
    return path
