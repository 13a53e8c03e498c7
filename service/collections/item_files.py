"""An item's stored media as a file: where it is (never outside the collection's media folder or the media root),
its content type and ETag, byte ranges of it, and its thumbnails (cached on this replica's disk)."""

from __future__ import annotations

import io
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import av
from PIL import Image

from uniadapter_serve.errors import CorruptMediaError, MediaTooLargeError, NotFoundError
from uniadapter_serve.fileio import atomic_write
from uniadapter_serve.model.media.image import ImageProbe, load_image, sniff_image_type
from uniadapter_serve.model.media.video import decode_clip, open_video, sniff_video_type
from uniadapter_serve.service.collections.store import Item

log = logging.getLogger(__name__)

THUMB_SIZES = (64, 128, 256, 512)
"""The only thumbnail sides served (the longer side, in pixels): a bounded set, so the cache is bounded too."""
SNIFF_BYTES = 64
VIDEO_THUMB_MAX_FRAMES = 2000
"""Frames decoded at most to reach a clip's first sampled frame."""
_RANGE = re.compile(r"bytes=([0-9]*)-([0-9]*)")
"""One byte range (full match; ASCII digits only: `\\d` also takes other scripts' digits, which int() reads)."""
_HUGE = 10**18
"""Stands for any position with more than 18 digits: past the end of every file (int() of thousands of digits
raises ValueError, and costs quadratic time below that limit)."""


@dataclass(frozen=True)
class MediaFile:
    path: Path
    size: int
    content_type: str
    etag: str
    """a strong validator: the content's sha256 (media are content-addressed)"""


class RangeNotSatisfiable(Exception):
    """416: the range starts past the end of the file."""


def locate(media_dir: Path, item: Item, media_root: Path) -> MediaFile:
    """The file holding an item's media; NotFoundError for text items and for files that are gone or lie
    outside the folder they must be in (uploads: the collection's `media_dir`; paths: the media root)."""
    kind, _, rest = item.source.partition(":")
    label = f"item {item.external_id[:80]!r}"
    if kind == "upload":
        root = media_dir.resolve()
    elif kind == "path":
        root = media_root.resolve()
    else:
        raise NotFoundError(f"{label} is a text: it has no media")
    try:
        path = (root / rest).resolve()
        if "\x00" in rest or not path.is_relative_to(root) or not path.is_file():
            raise NotFoundError(f"{label}: its media file is missing")
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(SNIFF_BYTES)
    except (OSError, ValueError):
        raise NotFoundError(f"{label}: its media file cannot be read") from None
    content_type = sniff_image_type(head) or sniff_video_type(head) or "application/octet-stream"
    return MediaFile(path, size, content_type, f'"{item.sha256 or item.external_id}"')


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """A `Range: bytes=a-b` header -> (first, last) byte, inclusive; None to send the whole file (no header,
    several ranges or a malformed one, which RFC 9110 lets a server ignore); RangeNotSatisfiable when it starts
    past the end. Positions of any length are taken: a last byte past the end is the end, a suffix longer than
    the file is the whole file (RFC 9110 14.1.2)."""
    if not header:
        return None
    m = _RANGE.fullmatch(header.strip())
    if m is None or (not m.group(1) and not m.group(2)):
        return None
    if not m.group(1):  # the last N bytes
        n = _position(m.group(2))
        if n == 0 or size == 0:
            raise RangeNotSatisfiable
        return max(0, size - n), size - 1
    first = _position(m.group(1))
    last = _position(m.group(2)) if m.group(2) else None
    if last is not None and last < first:
        return None
    if first >= size:
        raise RangeNotSatisfiable
    return first, min(size - 1 if last is None else last, size - 1)


def _position(digits: str) -> int:
    digits = digits.lstrip("0") or "0"
    return int(digits) if len(digits) <= 18 else _HUGE


def read_range(path: Path, first: int, last: int) -> bytes:
    with path.open("rb") as f:
        f.seek(first)
        return f.read(last - first + 1)


def thumb_path(thumbs_dir: Path, kind: str, item: Item, size: int, num_frames: int) -> Path:
    """Where this replica caches a thumbnail in the collection's `thumbs_dir` (a video's depends on the frame
    count it is sampled at)."""
    suffix = f"-{num_frames}f" if kind == "video" else ""
    return thumbs_dir / f"{item.sha256 or item.item_id}-{size}{suffix}.jpg"


def image_thumbnail(probe: ImageProbe, size: int) -> bytes:
    """A probed image (header checked against the limits) -> JPEG, the longer side at most `size`."""
    return _jpeg(load_image(probe, size), size)


def video_thumbnail(data: bytes, size: int, num_frames: int, *, max_bytes: int, max_seconds: float,
                    max_pixels: int, field: str) -> bytes:
    """The clip's first sampled frame (the one the model sees first when it samples `num_frames`)."""
    first = decode_clip(data, num_frames=num_frames, size=8, max_bytes=max_bytes, max_seconds=max_seconds,
                        max_pixels=max_pixels, field=field).timestamps[0]
    picked: Image.Image | None = None
    try:
        with open_video(data, max_bytes=max_bytes, field=field) as container:  # the uploads' allow-list, again
            stream = container.streams.video[0]
            for n, frame in enumerate(container.decode(stream)):
                t = float(frame.pts * frame.time_base) if frame.pts is not None and frame.time_base else 0.0
                if picked is not None and t > first + 1e-6:
                    break
                picked = frame.to_image()
                if n >= VIDEO_THUMB_MAX_FRAMES:
                    raise MediaTooLargeError(f"{field}: more than {VIDEO_THUMB_MAX_FRAMES} frames to its first sample")
    except av.error.FFmpegError as e:
        raise CorruptMediaError(f"{field}: the video does not decode ({e})") from e
    if picked is None:
        raise CorruptMediaError(f"{field}: the video has no frames")
    return _jpeg(picked, size)


def _jpeg(image: Image.Image, size: int) -> bytes:
    image = image.convert("RGB")
    image.thumbnail((size, size), Image.Resampling.LANCZOS)  # shrinks only: the page scales small media up
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def cached_thumbnail(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def store_thumbnail(path: Path, data: bytes) -> None:
    """Cache a thumbnail; a cache that cannot be written (the collection deleted meanwhile) is skipped."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, data)
    except OSError as e:
        log.debug("thumbnail %s not cached: %s", path.name, e)
