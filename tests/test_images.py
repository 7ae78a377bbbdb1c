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
    assert "is animated (2 frames): using the first" in caplog.text


# EXIF orientation -> how the stored pixels (rows, columns) become the displayed picture, written
# with numpy from the EXIF specification, not with Pillow's transposition
ORIENTATIONS = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],  # mirrored left to right
    3: lambda a: a[::-1, ::-1],  # turned half way
    4: lambda a: a[::-1],  # mirrored top to bottom
    5: lambda a: a.transpose(1, 0, 2),  # mirrored along the main diagonal
    6: lambda a: np.rot90(a, -1),  # turned a quarter clockwise
    7: lambda a: np.rot90(a, -1)[::-1],  # mirrored along the other diagonal
    8: lambda a: np.rot90(a, 1),  # turned a quarter anticlockwise
}


@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
def test_exif_orientation_is_applied_pixel_for_pixel(orientation):
    """An asymmetric picture (each pixel its own colour) stored losslessly with each orientation:
    what load_image returns is the stored pixels turned as the orientation says."""
    stored = np.random.default_rng(orientation).integers(0, 256, (20, 40, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    image = images.load_image(image_bytes(Image.fromarray(stored), "PNG", exif=exif))
    assert np.array_equal(np.asarray(image), np.ascontiguousarray(ORIENTATIONS[orientation](stored)))


@pytest.mark.parametrize("side", [8400, 12300])  # about 70 and 150 megapixels
def test_inputs_past_the_projects_own_limit_are_refused(side):
    """Beyond 64 megapixels and below Pillow's own refusal (about 179): the project's limit says no,
    before any pixel is decoded."""
    with pytest.raises(InputError) as info:
        images.load_image(png_header_only(side, side))
    assert str(info.value) == (
        f"input_image is {side}x{side} pixels, more than the 64 megapixels accepted; send a smaller image"
    )


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


# --- what cameras and phones write, and what malformed files make the decoders raise -------------


def mpo_bytes(first=(200, 0, 0), second=(0, 0, 200), size=(48, 32)) -> bytes:
    """A JPEG whose MPF header lists a second picture (stereo cameras, embedded previews): Pillow says MPO."""
    buffer = io.BytesIO()
    Image.new("RGB", size, first).save(buffer, "MPO", save_all=True, append_images=[Image.new("RGB", size, second)])
    return buffer.getvalue()


def test_a_jpeg_with_a_second_picture_loads_its_first(caplog):
    data = mpo_bytes()
    assert Image.open(io.BytesIO(data)).format == "MPO"
    with caplog.at_level("WARNING"):
        image = images.load_image(data)
    assert image.size == (48, 32) and np.abs(np.asarray(image, dtype=int) - (200, 0, 0)).max() <= 8
    assert "holds 2 pictures (MPO): using the first" in caplog.text


def _animated_gif(frames: int = 3, side: int = 32) -> bytes:
    rng = np.random.default_rng(3)
    pictures = [
        Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).convert("P") for _ in range(frames)
    ]
    buffer = io.BytesIO()
    pictures[0].save(buffer, "GIF", save_all=True, append_images=pictures[1:])
    return buffer.getvalue()


def _raised_by_pillow(data: bytes) -> type[BaseException] | None:
    """What Pillow itself raises reading ``data`` the way load_image does (None: nothing)."""
    from PIL import ImageOps

    try:
        image = Image.open(io.BytesIO(data))
        getattr(image, "n_frames", 1)
        image.load()
        ImageOps.exif_transpose(image).convert("RGB")
    except BaseException as exc:  # noqa: BLE001 - the point is to see which type
        return type(exc)
    return None


def _exif_of_the_wrong_type() -> bytes:
    """A JPEG turned by EXIF orientation whose EXIF also holds Compression (0x0103) as text, which
    Pillow's EXIF writer cannot pack back (struct.error inside ImageOps.exif_transpose)."""
    image = Image.new("RGB", (32, 16), (10, 20, 30))
    exif = image.getexif()
    exif[0x0112] = 6  # rotated: exif_transpose rewrites the EXIF
    exif[0x0131] = "software x"  # Software, as text
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=exif)
    return buffer.getvalue().replace(b"\x01\x31\x00\x02", b"\x01\x03\x00\x02", 1)  # now Compression, as text


def _dds(fourcc: bytes = b"XYZ1") -> bytes:
    """A DDS file whose pixel format Pillow does not implement (NotImplementedError when opened)."""
    header = struct.pack("<4sIIIIIII", b"DDS ", 124, 0x1007, 8, 8, 0, 0, 0) + b"\0" * 44
    header += struct.pack("<II4sIIIII", 32, 0x4, fourcc, 0, 0, 0, 0, 0) + struct.pack("<IIIII", 0x1000, 0, 0, 0, 0)
    return header + b"\0" * 256


def test_each_class_of_decoder_failure_is_an_input_error():
    """The classes found in Pillow's own test corpus and a mutation fuzz: truncated GIF frames
    (IndexError when counting them, struct.error reading them), EXIF Pillow cannot write back
    (struct.error), an unimplemented DDS pixel format (NotImplementedError), and a 31-byte GIF."""
    gif = _animated_gif()
    cuts = {_raised_by_pillow(gif[:cut]): gif[:cut] for cut in range(10, len(gif), 3)}
    assert {IndexError, struct.error} <= set(cuts)
    cases = {
        "GIF frames cut short (IndexError)": cuts[IndexError],
        "GIF frames cut short (struct.error)": cuts[struct.error],
        "EXIF of the wrong type": _exif_of_the_wrong_type(),
        "DDS pixel format": _dds(),
        "31-byte GIF": gif[:31],
    }
    assert _raised_by_pillow(cases["EXIF of the wrong type"]) is struct.error
    assert _raised_by_pillow(cases["DDS pixel format"]) is NotImplementedError
    for what, data in cases.items():
        with pytest.raises(InputError) as info:
            images.load_image(data)
        message = str(info.value)
        assert message.startswith("input_image ") and info.value.field == "input_image", what
        assert "unpack" not in message and "index out of range" not in message and "Unimplemented" not in message


def _valid(kind: str) -> bytes:
    """A valid file of each kind the fuzz mutates: several frames, EXIF rotation, a second picture."""
    image = random_image(40, 24, seed=5)
    if kind == "gif, 3 frames":
        return _animated_gif(3, 24)
    if kind == "webp, 3 frames":
        frames = [random_image(24, 24, seed=i) for i in range(3)]
        buffer = io.BytesIO()
        frames[0].save(buffer, "WEBP", save_all=True, append_images=frames[1:])
        return buffer.getvalue()
    if kind == "jpeg, EXIF rotation":
        exif = image.getexif()
        exif[0x0112] = 6
        return image_bytes(image, "JPEG", exif=exif)
    return mpo_bytes() if kind == "mpo" else image_bytes(image, "PNG")


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns of the corrupt EXIF it skips
@pytest.mark.parametrize("kind", ["png", "jpeg, EXIF rotation", "gif, 3 frames", "webp, 3 frames", "mpo"])
def test_mutated_files_load_or_fail_as_input_errors(kind):
    """A seeded mutation fuzz: 400 mutants of a valid file per kind (bytes changed, cut, repeated);
    each one either loads as 8-bit RGB or fails with an InputError, never anything else (before
    the decoders' own exceptions were caught, 34 of the GIF's mutants escaped as IndexError)."""
    import random

    rng = random.Random(kind)
    valid = _valid(kind)
    outcomes = {"loaded": 0, "refused": 0}
    for _ in range(400):
        data = bytearray(valid)
        for _ in range(rng.randint(1, 4)):
            if not data:
                break
            at = rng.randrange(len(data))
            change = rng.random()
            if change < 0.6:
                data[at] = rng.randrange(256)
            elif change < 0.8:
                del data[at:]
            else:
                data[at:at] = data[at : at + rng.randint(1, 16)]
        try:
            loaded = images.load_image(bytes(data))
        except InputError:
            outcomes["refused"] += 1
        else:
            assert loaded.mode == "RGB"
            outcomes["loaded"] += 1
    assert outcomes["refused"] > 0 and sum(outcomes.values()) == 400


def test_a_written_output_gets_the_mode_the_umask_gives(tmp_path):
    """Not the private 0600 of the temporary file it was written to: readable where any file the
    user writes is."""
    import os

    old = os.umask(0o022)
    try:
        path = images.save_image(random_image(8, 8), tmp_path / "o.png", "png")
        assert path.stat().st_mode & 0o777 == 0o644
        os.umask(0o077)
        path = images.save_image(random_image(8, 8), tmp_path / "p.png", "png")
        assert path.stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)
