"""Video decoding with PyAV: limits first, then T frames sampled uniformly over the clip.

A first pass demuxes packets only (no decoding) to count frames; the second decodes in order
and keeps just the sampled frames, resized by FFmpeg's scaler to the model's size.
"""

from __future__ import annotations

import io
import logging

import av
import torch

from uniadapter_serve.errors import CorruptMediaError, EmptyMediaError, MediaTooLargeError, UnsupportedMediaTypeError
from uniadapter_serve.model.preprocess import array_to_tensor

log = logging.getLogger(__name__)


def sniff_video_type(data: bytes) -> str | None:
    """Container type from magic bytes, or None."""
    if data[4:8] == b"ftyp":
        return "video/mp4"
    if data[:4] == b"\x1a\x45\xdf\xa3":
        return "video/webm"
    if data[:4] == b"RIFF" and data[8:12] == b"AVI ":
        return "video/x-msvideo"
    if data[:4] == b"OggS":
        return "video/ogg"
    if data[:3] == b"FLV":
        return "video/x-flv"
    if data[:1] == b"\x47":
        return "video/mp2t"
    return None


def sample_indices(num_frames_in_clip: int, num_samples: int) -> list[int]:
    """Uniform sampling: the middle frame of each of `num_samples` equal segments (repeats if short)."""
    n = max(1, num_frames_in_clip)
    return [min(n - 1, int((i + 0.5) * n / num_samples)) for i in range(num_samples)]


def decode_video(data: bytes, *, num_frames: int, size: int, max_bytes: int, max_seconds: float, max_pixels: int,
                 field: str = "video") -> torch.Tensor:
    """-> (num_frames, 3, size, size) normalised frames, or a MediaError naming the problem."""
    if not data:
        raise EmptyMediaError(f"{field}: the file is empty (0 bytes)")
    if len(data) > max_bytes:
        raise MediaTooLargeError(f"{field}: {len(data)} bytes is over the limit of {max_bytes} bytes")
    sniffed = sniff_video_type(data)
    try:
        container = av.open(io.BytesIO(data), mode="r")
    except (av.error.FFmpegError, ValueError, UnicodeDecodeError) as e:
        if sniffed is not None:
            raise CorruptMediaError(f"{field}: the {sniffed} file does not decode (truncated or damaged: {e})") from e
        raise UnsupportedMediaTypeError(f"{field}: the bytes are not a video container FFmpeg can read ({e})") from e
    with container:
        if not container.streams.video:
            raise UnsupportedMediaTypeError(f"{field}: the file has no video stream")
        stream = container.streams.video[0]
        width, height = stream.codec_context.width, stream.codec_context.height
        if width * height > max_pixels:
            raise MediaTooLargeError(f"{field}: {width}x{height} frames are over the limit of {max_pixels} pixels")
        seconds = _duration(container, stream)
        if seconds is not None and seconds > max_seconds:
            raise MediaTooLargeError(f"{field}: {seconds:.1f} s is over the limit of {max_seconds:g} s")
        try:
            count = sum(1 for p in container.demux(stream) if p.size > 0)
            if count == 0:
                raise CorruptMediaError(f"{field}: the video stream has no frames")
            wanted = sample_indices(count, num_frames)
            keep = set(wanted)
            container.seek(0)
            frames: dict[int, torch.Tensor] = {}
            last = -1
            for i, frame in enumerate(container.decode(stream)):
                last = i
                if i in keep:
                    frames[i] = array_to_tensor(frame.to_ndarray(format="rgb24", width=size, height=size))
                if i >= wanted[-1]:
                    break
        except av.error.FFmpegError as e:
            raise CorruptMediaError(f"{field}: the video does not decode ({e})") from e
    if not frames:
        raise CorruptMediaError(f"{field}: no frame could be decoded")
    # A truncated file may decode fewer frames than its packets promised: reuse the last good one.
    fallback = frames[max(frames)]
    if last < wanted[-1]:
        log.info("%s: decoded %d of %d frames", field, last + 1, count)
    return torch.stack([frames.get(i, fallback) for i in wanted])


def _duration(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000
    return None
