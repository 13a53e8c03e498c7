"""Decoding uploaded images safely: type sniffing, byte and pixel limits (decompression bombs),
clear errors for empty, foreign and truncated files. Runs in a worker thread, not the event loop."""

from __future__ import annotations

import io
import warnings

from PIL import Image

from uniadapter_serve.errors import (
    CorruptMediaError,
    EmptyMediaError,
    MediaTooLargeError,
    UnsupportedMediaTypeError,
)

IMAGE_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"BM", "image/bmp"),
)
IMAGE_TYPES = frozenset({"image/jpeg", "image/png", "image/gif", "image/bmp", "image/webp"})
GENERIC_TYPES = frozenset({"", "application/octet-stream"})


def sniff_image_type(data: bytes) -> str | None:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    for magic, mime in IMAGE_SIGNATURES:
        if data.startswith(magic):
            return mime
    return None


def decode_image(data: bytes, *, declared_type: str | None, max_bytes: int, max_pixels: int,
                 field: str = "image") -> Image.Image:
    """-> a fully decoded RGB image, or a MediaError naming `field` and the problem."""
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
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise MediaTooLargeError(
                    f"{field}: {width}x{height} = {width * height} pixels is over the limit of {max_pixels} "
                    "(decompression bomb protection)"
                )
            image.load()
            return image.convert("RGB")
    except MediaTooLargeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise MediaTooLargeError(f"{field}: {e}") from e
    except (OSError, ValueError, SyntaxError, Image.UnidentifiedImageError) as e:
        raise CorruptMediaError(f"{field}: the {sniffed} file does not decode ({e})") from e
