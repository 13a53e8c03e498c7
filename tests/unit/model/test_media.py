"""Image decoding that reduces as early as the format allows (the decode budget: test_budget.py)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from uniadapter_serve.errors import CorruptMediaError, UnsupportedMediaTypeError
from uniadapter_serve.model.media import image as image_module
from uniadapter_serve.model.media.image import PIL_FORMATS, decode_image, load_image, probe_image
from uniadapter_serve.model.preprocess import image_to_tensor, to_rgb

LIMITS = {"declared_type": None, "max_bytes": 50_000_000, "max_pixels": 100_000_000}


def encoded(image: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth gradients plus low-frequency noise: what downscaling filters disagree on least."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x / width * 255, y / height * 255, (x + y) / (width + height) * 255], axis=-1)
    coarse = rng.normal(0, 20, (height // 64 + 1, width // 64 + 1, 3)).repeat(64, 0).repeat(64, 1)[:height, :width]
    return Image.fromarray(np.clip(base + coarse, 0, 255).astype(np.uint8))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_large_images_are_reduced_yet_preprocess_like_a_full_decode(fmt):
    image = photo(2048, 1536)
    data = encoded(image, fmt, quality=95) if fmt != "PNG" else encoded(image, fmt)
    probe = probe_image(data, field="image", target_size=64, **LIMITS)
    if fmt == "JPEG":
        assert probe.pixels == 256 * 192  # DCT draft: decoded straight at 1/8 scale
    else:
        assert probe.pixels == 2048 * 1536  # decoded whole (no draft for these formats) ...
    loaded = load_image(probe, 64)
    assert min(loaded.size) >= 128 and loaded.size[0] < 2048  # ... then reduced before any conversion
    full = Image.open(io.BytesIO(data)).convert("RGB")
    reference = image_to_tensor(full, 64)
    assert (image_to_tensor(loaded, 64) - reference).abs().mean() < 0.02  # in normalised units (std ~1)


def test_small_images_and_other_modes_decode_as_before():
    for mode, colour in (("RGB", (200, 10, 30)), ("L", 128), ("P", 3), ("RGBA", (10, 200, 30, 128)), ("1", 1)):
        data = encoded(Image.new(mode, (40, 30), colour), "PNG")
        got = decode_image(data, target_size=64, **LIMITS)
        want = to_rgb(Image.open(io.BytesIO(data)))  # RGBA: composited onto white (test_transparency.py)
        assert got.mode == "RGB" and got.size == (40, 30)
        assert np.array_equal(np.asarray(got), np.asarray(want)), mode


def test_palette_images_are_reduced_after_conversion():
    image = photo(1024, 1024).convert("P", palette=Image.Palette.ADAPTIVE)
    got = decode_image(encoded(image, "PNG"), target_size=32, **LIMITS)
    assert got.mode == "RGB" and got.size == (64, 64)


# -- only the documented image formats are opened, each by its own Pillow plugin ---------------------------------

OTHER_PILLOW_FORMATS = ["TIFF", "ICO", "PPM", "PCX", "TGA", "SGI", "DDS", "QOI", "XBM", "MSP", "EPS", "JPEG2000",
                        "ICNS"]
"""Formats this Pillow opens by default but the service does not document."""


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "BMP", "WEBP"])
def test_every_documented_format_decodes_with_its_own_plugin(fmt):
    data = encoded(Image.new("RGB", (40, 30), (200, 10, 30)), fmt)
    probe = probe_image(data, field="image", **LIMITS)
    assert probe.image.format == fmt == PIL_FORMATS[probe.mime]
    assert load_image(probe).size == (40, 30)


@pytest.mark.parametrize("fmt", OTHER_PILLOW_FORMATS)
def test_formats_pillow_knows_but_the_service_does_not_are_refused(fmt):
    mode = "1" if fmt in ("XBM", "MSP") else "RGB"
    data = encoded(Image.new(mode, (16, 16)), fmt)
    assert Image.open(io.BytesIO(data)).format == fmt  # Pillow alone would open it
    with pytest.raises(UnsupportedMediaTypeError, match="not a JPEG, PNG, WebP, GIF or BMP image"):
        probe_image(data, field="image", **LIMITS)


def test_pillow_is_never_asked_to_guess_the_format(monkeypatch):
    """Even bytes that passed the sniff as PNG are opened by the PNG plugin only, never probed against others."""
    tiff = encoded(Image.new("RGB", (16, 16)), "TIFF")
    monkeypatch.setattr(image_module, "sniff_image_type", lambda data: "image/png")
    with pytest.raises(CorruptMediaError, match="image/png file does not decode"):
        probe_image(tiff, field="image", **LIMITS)
