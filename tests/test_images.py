"""Input parsing: formats, modes, bombs, EXIF, and atomic output writes."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from flux import images
from flux.errors import EditError, InputError
from tests.conftest import image_bytes, random_image


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG that declares width x height pixels (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    "data,message",
    [
        (b"", "empty"),
        (b"hello, not an image", "not a readable image"),
        (image_bytes(random_image(64, 64))[:200], "truncated or corrupt"),
        (image_bytes(random_image(16, 16), "BMP"), "format BMP is not supported"),
        (image_bytes(random_image(16, 16), "TIFF"), "format TIFF is not supported"),
    ],
)
def test_bad_inputs_are_refused_clearly(data, message):
    with pytest.raises(InputError, match=message):
        images.load_image(data)


def test_decompression_bomb_is_refused_before_decoding():
    data = png_header_only(30000, 30000)
    assert len(data) < 1000
    with pytest.raises(InputError, match="too large|megapixels"):
        images.load_image(data)


def test_large_jpeg_is_decoded_at_reduced_scale():
    big = Image.new("RGB", (6000, 4000), (10, 120, 200))
    image = images.load_image(image_bytes(big, "JPEG", quality=80))
    assert image.mode == "RGB"
    assert image.width * image.height <= 3000 * 2000
    assert abs(image.width / image.height - 1.5) < 0.01


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "CMYK", "I;16", "P", "1"])
def test_modes_become_rgb(mode):
    source = (
        random_image(32, 32).convert(mode)
        if mode != "I;16"
        else Image.fromarray((np.arange(32 * 32).reshape(32, 32) * 60).astype(np.uint16))
    )
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    image = images.load_image(image_bytes(source, fmt))
    assert image.mode == "RGB" and image.size == (32, 32)


def test_transparency_is_composited_on_white():
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    image = images.load_image(image_bytes(rgba))
    assert image.getpixel((0, 0)) == (255, 255, 255)
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([0, 0, 0] * 256)
    palette.info["transparency"] = 0
    assert images.load_image(image_bytes(palette, transparency=0)).getpixel((0, 0)) == (255, 255, 255)


def test_sixteen_bit_is_scaled_not_clipped():
    array = np.full((4, 4), 65535, dtype=np.uint16)
    image = images.load_image(image_bytes(Image.fromarray(array)))
    assert image.getpixel((0, 0)) == (255, 255, 255)


def test_animated_gif_uses_the_first_frame(caplog):
    frames = [Image.new("RGB", (16, 16), c) for c in [(255, 0, 0), (0, 0, 255)]]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    with caplog.at_level("WARNING"):
        image = images.load_image(buffer.getvalue())
    r, g, b = image.getpixel((8, 8))
    assert r > 200 and b < 50
    assert "first frame" in caplog.text


def test_exif_rotation_is_applied():
    source = Image.new("RGB", (40, 20), (0, 255, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    image = images.load_image(image_bytes(source, "JPEG", exif=exif))
    assert image.size == (20, 40)


@pytest.mark.parametrize("size", [(1, 1), (8, 8), (4000, 100)])
def test_tiny_and_extreme_images_load(size):
    assert images.load_image(image_bytes(random_image(*size))).size == size


def test_save_is_atomic(tmp_path, monkeypatch):
    target = tmp_path / "out.png"

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(images.os, "replace", broken_replace)
    with pytest.raises(EditError, match="could not be written.*No space left"):
        images.save_image(random_image(8, 8), target, "png")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fmt,pil", [("png", "PNG"), ("jpg", "JPEG"), ("webp", "WEBP")])
def test_save_formats(tmp_path, fmt, pil):
    path = images.save_image(random_image(16, 16), tmp_path / f"o.{fmt}", fmt, 80)
    with Image.open(path) as image:
        assert image.format == pil
