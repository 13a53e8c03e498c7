"""Video decoding with PyAV: limits first, then T frames sampled uniformly over the whole clip.

Sampling: the clip's time span is cut into T equal segments; frame i is the frame on screen at the
middle of segment i (the last frame whose timestamp is <= that instant). Decoding is sequential,
and seeks (to the keyframe before a target) only when the next target is far ahead, so a long clip
costs about T short decodes, not a decode of every frame. Clips without a known duration are
demuxed once (no decoding) to count frames, then sampled by index. A cooperative deadline and a
cap on decoded frames bound the work of any single upload. Only the containers of `containers` are opened,
each by its own demuxer with no protocols (an upload cannot make FFmpeg open a file, URL or socket).
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass

import av
import numpy as np
import torch

from uniadapter_serve.errors import (
    CorruptMediaError,
    EmptyMediaError,
    MediaTooLargeError,
    UnsupportedMediaTypeError,
)
from uniadapter_serve.model.media.containers import (
    ACCEPTED,
    mov_external_reference,
    sniff_audio_type,
    video_container,
)
from uniadapter_serve.model.media.containers import sniff_video_type as sniff_video_type  # callers import it here
from uniadapter_serve.model.media.image import sniff_image_type
from uniadapter_serve.model.preprocess import array_to_pixels, normalize

log = logging.getLogger(__name__)

SEEK_GAP_S = 2.0
"""Seek instead of decoding through when the next target is more than this far ahead."""
DECODE_THREADS = 4
"""FFmpeg decoder threads per clip: each holds a frame in flight, so this bounds memory too."""
FRAMES_HELD = DECODE_THREADS + 4
"""Full-size frames one decode holds at most (threads' frames + references + the one being picked):
what a decode budget is charged, times the frame's pixels."""


def sample_indices(num_frames_in_clip: int, num_samples: int) -> list[int]:
    """Uniform sampling by index: the middle frame of each of `num_samples` equal segments (repeats if short)."""
    n = max(1, num_frames_in_clip)
    return [min(n - 1, int((i + 0.5) * n / num_samples)) for i in range(num_samples)]


def sample_times(start: float, duration: float, num_samples: int) -> list[float]:
    """The middle instant of each of `num_samples` equal segments of [start, start + duration)."""
    return [start + (i + 0.5) * duration / num_samples for i in range(num_samples)]


@dataclass
class DecodedClip:
    frames: torch.Tensor
    """(T, 3, size, size) normalised float32, or uint8 RGB with `normalised=False`"""
    timestamps: list[float]
    """presentation time (s) of each sampled frame"""
    decoded: int
    """frames actually decoded (the cost)"""


def probe_video(data: bytes, *, max_bytes: int, max_pixels: int, field: str = "video") -> int:
    """Check bytes, type and frame size (header only) -> the pixels decoding will hold at once
    (frame pixels x FRAMES_HELD), or a MediaError naming `field` and the problem."""
    with open_video(data, max_bytes=max_bytes, field=field) as container:
        stream = _video_stream(container, max_pixels, field)
        return int(stream.codec_context.width * stream.codec_context.height * FRAMES_HELD)


def decode_video(data: bytes, *, num_frames: int, size: int, max_bytes: int, max_seconds: float, max_pixels: int,
                 field: str = "video", timeout_s: float = 30.0, max_decoded: int = 20_000,
                 normalised: bool = True) -> torch.Tensor:
    """-> (num_frames, 3, size, size) frames, or a MediaError naming the problem. Normalised float32, or with
    normalised=False the uint8 RGB the model's vision stage normalises itself (what the service sends it)."""
    return decode_clip(data, num_frames=num_frames, size=size, max_bytes=max_bytes, max_seconds=max_seconds,
                       max_pixels=max_pixels, field=field, timeout_s=timeout_s, max_decoded=max_decoded,
                       normalised=normalised).frames


def decode_clip(data: bytes, *, num_frames: int, size: int, max_bytes: int, max_seconds: float, max_pixels: int,
                field: str = "video", timeout_s: float = 30.0, max_decoded: int = 20_000,
                normalised: bool = True) -> DecodedClip:
    with open_video(data, max_bytes=max_bytes, field=field) as container:
        stream = _video_stream(container, max_pixels, field)
        start, duration = _span(container, stream)
        if duration is not None and duration > max_seconds:
            raise MediaTooLargeError(f"{field}: {duration:.1f} s is over the limit of {max_seconds:g} s")
        sampler = _Sampler(container, stream, size, field, time.monotonic() + timeout_s, max_decoded)
        try:
            if duration is not None and duration > 0:
                picked = sampler.by_time(sample_times(start, duration, num_frames), start)
            else:
                picked = sampler.by_index(num_frames, max_seconds)
        except av.error.FFmpegError as e:
            raise CorruptMediaError(f"{field}: the video does not decode ({e})") from e
    frames = torch.stack([array_to_pixels(f) for f, _ in picked])  # (T, 3, size, size) uint8
    return DecodedClip(normalize(frames) if normalised else frames, [t for _, t in picked], sampler.decoded)


def open_video(data: bytes, *, max_bytes: int, field: str = "video") -> av.container.InputContainer:
    """Check bytes and container type, then open with the container's own demuxer and nothing else (see
    `containers`): anything but an accepted container is refused here, before FFmpeg sees a byte."""
    if not data:
        raise EmptyMediaError(f"{field}: the file is empty (0 bytes)")
    if len(data) > max_bytes:
        raise MediaTooLargeError(f"{field}: {len(data)} bytes is over the limit of {max_bytes} bytes")
    container = video_container(data)
    if container is None:
        still, audio = sniff_image_type(data), sniff_audio_type(data)
        if still is not None:
            raise UnsupportedMediaTypeError(f"{field}: got a still image ({still}); send a video, or use /vqa for "
                                            "images")
        if audio is not None:
            raise UnsupportedMediaTypeError(f"{field}: the file is audio ({audio}): it has no video stream")
        raise UnsupportedMediaTypeError(f"{field}: the bytes are not a video container the service accepts; "
                                        f"send {ACCEPTED}")
    if container.demuxer == "mov" and mov_external_reference(data):
        raise UnsupportedMediaTypeError(f"{field}: the {container.mime} file refers to media in another file "
                                        "(an external data reference); send a self-contained file")
    try:
        return av.open(io.BytesIO(data), mode="r", format=container.demuxer,
                       container_options=container.open_options())
    except (av.error.FFmpegError, ValueError, UnicodeDecodeError) as e:
        raise CorruptMediaError(f"{field}: the {container.mime} file does not decode (truncated or damaged: {e})"
                                ) from e


def _video_stream(container: av.container.InputContainer, max_pixels: int, field: str) -> av.video.stream.VideoStream:
    if not container.streams.video:
        raise UnsupportedMediaTypeError(f"{field}: the file has no video stream")
    stream = container.streams.video[0]
    width, height = stream.codec_context.width, stream.codec_context.height
    if width * height > max_pixels:
        raise MediaTooLargeError(f"{field}: {width}x{height} frames are over the limit of {max_pixels} pixels")
    stream.thread_type = "AUTO"
    stream.codec_context.thread_count = DECODE_THREADS
    return stream


def _span(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> tuple[float, float | None]:
    tb = stream.time_base
    start = float(stream.start_time * tb) if stream.start_time is not None and tb is not None else 0.0
    if stream.duration is not None and tb is not None and stream.duration > 0:
        return start, float(stream.duration * tb)
    if container.duration is not None and container.duration > 0:
        return start, container.duration / 1_000_000
    return start, None


class _Sampler:
    def __init__(self, container: av.container.InputContainer, stream: av.video.stream.VideoStream, size: int,
                 field: str, deadline: float, max_decoded: int) -> None:
        self.container, self.stream, self.size, self.field = container, stream, size, field
        self.deadline, self.max_decoded = deadline, max_decoded
        self.decoded = 0

    def _frames(self) -> Iterator[av.VideoFrame]:
        for frame in self.container.decode(self.stream):
            self.decoded += 1
            if self.decoded > self.max_decoded:
                raise MediaTooLargeError(f"{self.field}: more than {self.max_decoded} frames to decode")
            if time.monotonic() > self.deadline:
                raise MediaTooLargeError(f"{self.field}: took longer than the decode time limit")
            yield frame

    def _pixels(self, frame: av.VideoFrame) -> np.ndarray:
        return frame.to_ndarray(format="rgb24", width=self.size, height=self.size)

    def by_time(self, targets: list[float], start: float) -> list[tuple[np.ndarray, float]]:
        """For each target instant, the last frame shown at or before it (the first frame if none)."""
        tb = self.stream.time_base
        assert tb is not None
        chosen: list[tuple[np.ndarray, float]] = []  # converted at once: full-size frames are not kept
        last: tuple[av.VideoFrame, np.ndarray] | None = None
        frames = self._frames()  # from the start: short clips never seek
        prev: av.VideoFrame | None = None  # last frame at or before the current target
        pending: av.VideoFrame | None = None  # decoded past a target; belongs to a later one
        for target in targets:
            ahead = _time(pending) if pending is not None else (_time(prev) if prev is not None else start)
            if target - ahead > SEEK_GAP_S:
                try:
                    self.container.seek(max(0, int(target / tb)), stream=self.stream, backward=True)
                    frames, pending = self._frames(), None
                except av.error.FFmpegError:
                    log.debug("%s: cannot seek, decoding through", self.field)
            pick: av.VideoFrame | None = None
            while pick is None:
                frame = pending if pending is not None else next(frames, None)
                pending = None
                if frame is None:  # end of stream: the last frame stays on screen
                    pick = prev
                    break
                if _time(frame) <= target + 1e-9:
                    prev = frame
                    continue
                pending = frame
                pick = prev if prev is not None else frame
            if pick is None:
                raise CorruptMediaError(f"{self.field}: no frame could be decoded")
            if last is None or last[0] is not pick:
                last = (pick, self._pixels(pick))
            chosen.append((last[1], _time(pick)))
        return chosen

    def by_index(self, num_frames: int, max_seconds: float) -> list[tuple[np.ndarray, float]]:
        """Clips with no known duration: count packets (no decoding), then decode up to the last pick."""
        count = sum(1 for p in self.container.demux(self.stream) if p.size > 0)
        if count == 0:
            raise CorruptMediaError(f"{self.field}: the video stream has no frames")
        wanted = sample_indices(count, num_frames)
        keep = set(wanted)
        self.container.seek(0)
        got: dict[int, tuple[np.ndarray, float]] = {}
        for i, frame in enumerate(self._frames()):
            if i in keep:
                got[i] = (self._pixels(frame), _time(frame))
            if i >= wanted[-1]:
                break
        if not got:
            raise CorruptMediaError(f"{self.field}: no frame could be decoded")
        last = got[max(got)]
        if got[max(got)][1] > max_seconds:
            raise MediaTooLargeError(f"{self.field}: longer than the limit of {max_seconds:g} s")
        return [got.get(i, last) for i in wanted]


def _time(frame: av.VideoFrame) -> float:
    if frame.time is not None:
        return float(frame.time)
    return float(frame.pts * frame.time_base) if frame.pts is not None and frame.time_base is not None else 0.0
