"""Decoding uploaded images safely: type sniffing, byte and pixel limits (decompression bombs),
clear errors for empty, foreign and truncated files, and as little memory as the format allows. Only the
documented formats are opened, each by its own Pillow plugin, chosen from the magic bytes.

Two steps, so a caller can hold a decode budget between them: `probe_image` reads only the header
(cheap) and says how many pixels decoding will hold in memory; `load_image` decodes. JPEGs decode
straight at a reduced scale (DCT draft mode, down to 1/8 per side); other formats are reduced by an
integer factor right after decoding, before any mode conversion copies them. Neither goes below
twice the size the model needs, so the final antialiased resize still sees every detail it keeps.
Transparency (an alpha band, a transparent palette index or colour key) is composited onto white, as
transformers' BLIP processor does; alpha images are reduced premultiplied, so reducing first changes nothing
but rounding.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image

from uniadapter_serve.errors import (
    CorruptMediaError,
    EmptyMediaError,
    MediaTooLargeError,
    UnsupportedMediaTypeError,
)
from uniadapter_serve.model.preprocess import has_transparency, to_rgb

IMAGE_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"BM", "image/bmp"),
)
PIL_FORMATS = {"image/jpeg": "JPEG", "image/png": "PNG", "image/gif": "GIF", "image/bmp": "BMP", "image/webp": "WEBP"}
"""The Pillow plugin each accepted type is opened with: Pillow never tries its other formats (EPS, PSD, ...)."""
IMAGE_TYPES = frozenset(PIL_FORMATS)
GENERIC_TYPES = frozenset({"", "application/octet-stream"})
REDUCIBLE_MODES = frozenset({"L", "LA", "La", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "I", "F"})
"""Modes `Image.reduce` takes; others (P, 1, I;16) are converted first."""
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.UnidentifiedImageError, EOFError)


def sniff_image_type(data: bytes) -> str | None:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    for magic, mime in IMAGE_SIGNATURES:
        if data.startswith(magic):
            return mime
    return None


@dataclass
class ImageProbe:
    """An image whose header was read and checked, not yet decoded."""

    image: Image.Image
    mime: str
    field: str
    pixels: int
    """pixels decoding will hold (after the JPEG draft scale): what a decode budget is charged"""


def probe_image(data: bytes, *, declared_type: str | None, max_bytes: int, max_pixels: int, field: str = "image",
                target_size: int | None = None) -> ImageProbe:
    """Check bytes, type and declared pixel count (header only) -> an `ImageProbe`, or a MediaError
    naming `field` and the problem. `target_size`: the side the caller will resize to."""
    if not data:
        raise EmptyMediaError(f"{field}: the file is empty (0 bytes)")
    if len(data) > max_bytes:
        raise MediaTooLargeError(f"{field}: {len(data)} bytes is over the limit of {max_bytes} bytes")
    declared = (declared_type or "").split(";")[0].strip().lower()
    if declared not in GENERIC_TYPES and declared not in IMAGE_TYPES:
        raise UnsupportedMediaTypeError(
            f"{field}: content type {declared!r} is not accepted; send one of {sorted(IMAGE_TYPES)}"
        )
    sniffed = sniff_image_type(data)
    if sniffed is None:
        raise UnsupportedMediaTypeError(f"{field}: the bytes are not a JPEG, PNG, WebP, GIF or BMP image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=[PIL_FORMATS[sniffed]])
            width, height = image.size
            if width * height > max_pixels:
                raise MediaTooLargeError(
                    f"{field}: {width}x{height} = {width * height} pixels is over the limit of {max_pixels} "
                    "(decompression bomb protection)"
                )
            if target_size is not None and image.format == "JPEG":
                image.draft("RGB", (2 * target_size, 2 * target_size))  # decode at 1/2, 1/4 or 1/8 scale
            width, height = image.size
    except MediaTooLargeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise MediaTooLargeError(f"{field}: {e}") from e
    except DECODE_ERRORS as e:
        raise CorruptMediaError(f"{field}: the {sniffed} file does not decode ({e})") from e
    return ImageProbe(image, sniffed, field, width * height)


def load_image(probe: ImageProbe, target_size: int | None = None) -> Image.Image:
    """Decode a probed image -> RGB (transparency composited onto white), reduced by an integer factor while
    both sides stay >= 2 * target_size."""
    image = probe.image
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image.load()
        factor = min(image.size) // (2 * target_size) if target_size else 1
        if factor >= 2:
            if has_transparency(image):
                if image.mode not in ("RGBA", "LA"):
                    image = image.convert("RGBA")  # a palette index, colour key or PA alpha, kept for compositing
            elif image.mode not in REDUCIBLE_MODES:
                image = image.convert("RGB")
            image = image.reduce(factor)  # RGBA and LA: premultiplied by Pillow
        return to_rgb(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise MediaTooLargeError(f"{probe.field}: {e}") from e
    except DECODE_ERRORS as e:
        raise CorruptMediaError(f"{probe.field}: the {probe.mime} file does not decode ({e})") from e


def decode_image(data: bytes, *, declared_type: str | None, max_bytes: int, max_pixels: int,
                 field: str = "image", target_size: int | None = None) -> Image.Image:
    """-> a fully decoded RGB image (reduced toward `target_size` when given), or a MediaError."""
    probe = probe_image(data, declared_type=declared_type, max_bytes=max_bytes, max_pixels=max_pixels, field=field,
                        target_size=target_size)
    return load_image(probe, target_size)
