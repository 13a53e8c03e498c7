"""An item's stored media as a file: where it is (never outside the collection's media folder or the media root),
its content type and ETag, byte ranges of it, and its thumbnails (cached on this replica's disk)."""

from __future__ import annotations

import io
import logging
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import av
from PIL import Image

from uniadapter_serve.errors import CorruptMediaError, InputError, MediaTooLargeError, NotFoundError
from uniadapter_serve.fileio import atomic_write
from uniadapter_serve.model.media.image import ImageProbe, load_image, sniff_image_type
from uniadapter_serve.model.media.video import decode_clip, open_video, sniff_video_type, video_duration
from uniadapter_serve.service.collections.store import Item

log = logging.getLogger(__name__)

THUMB_SIZES = (64, 128, 256, 512)
"""The only thumbnail sides served (the longer side, in pixels): a bounded set, so the cache is bounded too."""
SNIFF_BYTES = 64
VIDEO_THUMB_MAX_FRAMES = 2000
"""Frames decoded at most to reach a clip's first sampled frame, or (after the seek) the frame at `t`."""
THUMB_T_STEP = 0.1
"""A thumbnail at a time `t` is taken at t rounded to this (seconds), and cached so: a bounded cache per video."""
THUMB_T_TIMEOUT_S = 30.0
"""Decoder time for one thumbnail at `t` (a seek, then at most a GOP of frames)."""
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


def thumb_path(thumbs_dir: Path, kind: str, item: Item, size: int, num_frames: int, t: float | None = None) -> Path:
    """Where this replica caches a thumbnail in the collection's `thumbs_dir` (a video's depends on the frame
    count it is sampled at; a frame at a time `t`, on t in tenths of a second: see `thumb_time`)."""
    return thumbs_dir / f"{thumb_key(kind, item, size, num_frames, t)}.jpg"


def thumb_key(kind: str, item: Item, size: int, num_frames: int, t: float | None = None) -> str:
    """What a thumbnail depends on, as a name: the content, the size, and a video's frame count or time `t`
    (its cache file's stem and its ETag)."""
    if t is not None:
        return f"{item.sha256 or item.item_id}-{size}-t{round(t / THUMB_T_STEP)}"
    return f"{item.sha256 or item.item_id}-{size}" + (f"-{num_frames}f" if kind == "video" else "")


def thumb_time(t: float) -> float:
    """`t` (seconds) checked (a finite number >= 0: else an InputError naming `t`) and rounded to THUMB_T_STEP,
    the time a thumbnail at `t` shows and is cached under."""
    if not math.isfinite(t) or t < 0:
        raise InputError(f"t: must be a finite number of seconds >= 0 (from the video's first frame), got {t!r}")
    return round(t / THUMB_T_STEP) * THUMB_T_STEP


def image_thumbnail(probe: ImageProbe, size: int) -> bytes:
    """A probed image (header checked against the limits) -> JPEG, the longer side at most `size`."""
    return _jpeg(load_image(probe, size), size)


def video_thumbnail(data: bytes, size: int, num_frames: int, *, max_bytes: int, max_seconds: float,
                    max_pixels: int, field: str) -> bytes:
    """The clip's first sampled frame (the one the model sees first when it samples `num_frames`), full size,
    reached by a seek like `video_frame_at` (in an hour-long video it lies minutes in)."""
    first = decode_clip(data, num_frames=num_frames, size=8, max_bytes=max_bytes, max_seconds=max_seconds,
                        max_pixels=max_pixels, field=field).timestamps[0]
    return _jpeg(_seek_frame(data, first, absolute=True, max_bytes=max_bytes, field=field,
                             timeout_s=THUMB_T_TIMEOUT_S).image, size)


@dataclass(frozen=True)
class FrameAt:
    image: Image.Image
    time_s: float
    """the frame's own time, seconds from the first frame"""
    decoded: int
    """frames decoded to reach it (after the seek)"""


def video_frame_at(data: bytes, t: float, *, max_bytes: int, max_seconds: float, max_pixels: int, field: str,
                   timeout_s: float = THUMB_T_TIMEOUT_S) -> FrameAt:
    """The frame on screen at `t` seconds from the first frame (the last one shown at or before it), full size.
    Seeks to the keyframe at or before `t` and decodes forward from there (a frame an hour in costs one GOP, not
    an hour of frames), at most VIDEO_THUMB_MAX_FRAMES frames and `timeout_s` of decoding. InputError naming `t`
    when it lies past the video's end by more than THUMB_T_STEP / 2 (its duration from the header, else from one
    demux pass); MediaError subclasses naming `field` for the limits and for files that do not decode."""
    duration = video_duration(data, max_bytes=max_bytes, max_pixels=max_pixels, field=field)
    if duration > max_seconds:
        raise MediaTooLargeError(f"{field}: {duration:.1f} s is over the limit of {max_seconds:g} s")
    if t > duration + THUMB_T_STEP / 2 + 1e-6:  # slack: a time near the end may round up past it
        raise InputError(f"t: {t:g} s is past the end of the video ({duration:.3f} s)")
    return _seek_frame(data, min(t, duration), absolute=False, max_bytes=max_bytes, field=field, timeout_s=timeout_s)


def _seek_frame(data: bytes, t: float, *, absolute: bool, max_bytes: int, field: str, timeout_s: float) -> FrameAt:
    """The frame on screen at `t`: seconds from the first frame, or (`absolute`) a presentation time."""
    deadline = time.monotonic() + timeout_s
    picked: av.VideoFrame | None = None
    decoded = 0
    try:
        with open_video(data, max_bytes=max_bytes, field=field) as container:  # the uploads' allow-list, again
            stream = container.streams.video[0]
            tb = stream.time_base
            start = float(stream.start_time * tb) if stream.start_time is not None and tb is not None else 0.0
            target = t if absolute else start + t
            if tb is not None and target > 0:
                try:
                    container.seek(max(0, int(target / tb)), stream=stream, backward=True)
                except av.error.FFmpegError:
                    log.debug("%s: cannot seek, decoding from the start", field)
            for frame in container.decode(stream):
                if picked is not None and _frame_time(frame) > target + 1e-6:
                    break
                picked = frame
                decoded += 1
                if decoded > VIDEO_THUMB_MAX_FRAMES:
                    raise MediaTooLargeError(f"{field}: more than {VIDEO_THUMB_MAX_FRAMES} frames to reach "
                                             f"{target - start:g} s")
                if time.monotonic() > deadline:
                    raise MediaTooLargeError(f"{field}: took longer than the decode time limit to reach "
                                             f"{target - start:g} s")
            if picked is None:
                raise CorruptMediaError(f"{field}: the video has no frames")
            return FrameAt(picked.to_image(), _frame_time(picked) - start, decoded)
    except av.error.FFmpegError as e:
        raise CorruptMediaError(f"{field}: the video does not decode ({e})") from e


def video_thumbnail_at(data: bytes, size: int, t: float, *, max_bytes: int, max_seconds: float, max_pixels: int,
                       field: str) -> bytes:
    """JPEG of the frame on screen at `t` (`video_frame_at`), the longer side at most `size`."""
    return _jpeg(video_frame_at(data, t, max_bytes=max_bytes, max_seconds=max_seconds, max_pixels=max_pixels,
                                field=field).image, size)


def _frame_time(frame: av.VideoFrame) -> float:
    if frame.time is not None:
        return float(frame.time)
    return float(frame.pts * frame.time_base) if frame.pts is not None and frame.time_base is not None else 0.0


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
