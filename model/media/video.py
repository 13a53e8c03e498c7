"""Video decoding with PyAV: limits first, then T frames sampled uniformly over the clip, a span of it, or each
moment (window) of a long video in one pass.

Sampling: the time span is cut into T equal segments; frame i is the frame on screen at the middle of segment i
(the last frame whose timestamp is <= that instant). Decoding is sequential and seeks (to the keyframe before a
target) only to skip ahead, so a long clip costs about T short decodes, not a decode of every frame:
`decode_clip` seeks when the next target is more than SEEK_GAP_S ahead; `MomentDecoder` first demuxes the file
once (no decoding) to list its keyframes, then seeks whenever a keyframe lies between the last decoded frame and
the next target, and walks every window's targets in time order, so a frame shared by overlapping windows is
decoded and resized once and only one chunk of windows is held at model size. Clips without a known duration
are demuxed once (no decoding) to count frames, then sampled by index (`decode_clip`) or timed from their
packets (spans, moments). A cooperative deadline and a cap on decoded frames bound the work of any single
upload (for moments, the whole pass). Only the containers of `containers` are opened, each by its own demuxer
with no protocols (an upload cannot make FFmpeg open a file, URL or socket).
"""

from __future__ import annotations

import bisect
import io
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from dataclasses import field as dc_field
from types import TracebackType

import av
import numpy as np
import torch

from uniadapter_serve.errors import (
    CorruptMediaError,
    EmptyMediaError,
    InputError,
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
SKIP_MIN_S = 0.25
"""MomentDecoder: seek to a keyframe between the last decoded frame and the next target when it skips at least
this much video (a seek flushes the decoder's threads; decoding a few frames through is cheaper)."""
END_SLACK_S = 0.5
"""A span or moment whose instants lie more than this past the last frame's end is refused as a truncated file
(or a header that overstates the duration), instead of repeating the last frame."""


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


MAX_PLANNED = 1_000_000
"""windows `plan_moments` plans at most (callers bound moments far lower; this bounds the planning itself)"""


def plan_moments(duration_s: float, window_s: float, stride_s: float) -> list[tuple[float, float]]:
    """Windows covering [0, duration_s]: starts 0, stride, 2*stride, ... while start + window < duration; the last
    window ends at the duration (a final window [duration - window, duration] when the strides do not land there);
    a video no longer than one window is one moment (0, duration). A stride longer than the window leaves gaps
    between moments (a sparse index of a very long video). ValueError naming the number otherwise (not finite, not
    positive)."""
    for name, value in (("duration_s", duration_s), ("window_s", window_s), ("stride_s", stride_s)):
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name}: must be a positive number of seconds, got {value!r}")
    if duration_s / stride_s > MAX_PLANNED:
        raise ValueError(f"stride_s: {stride_s:g} s cuts {duration_s:g} s into more than {MAX_PLANNED} windows")
    if duration_s <= window_s:
        return [(0.0, float(duration_s))]
    spans: list[tuple[float, float]] = []
    k = 0
    while k * stride_s + window_s < duration_s:  # k * stride: no drift from adding strides up
        spans.append((k * stride_s, k * stride_s + window_s))
        k += 1
    spans.append((duration_s - window_s, float(duration_s)))
    return spans


def check_span(span: tuple[float, float], duration_s: float, slack_s: float = 0.0) -> tuple[float, float]:
    """(start_s, end_s) within a video of `duration_s` -> the span, end clipped to the duration, or an InputError
    whose message starts with the field at fault: `start_s:` (not a number, negative, at or past the end),
    `end_s:` (not a number, not after start_s, past the end by more than `slack_s`, e.g. a frame)."""
    lo, hi = (float(x) for x in span)
    if not math.isfinite(lo) or lo < 0:
        raise InputError(f"start_s: must be a number of seconds >= 0, got {lo!r}")
    if lo >= duration_s:
        raise InputError(f"start_s: {lo:g} s is at or past the end of the video ({duration_s:.3f} s)")
    if not math.isfinite(hi) or hi <= lo:
        raise InputError(f"end_s: must be after start_s ({lo:g} s), got {hi!r}")
    if hi > duration_s + slack_s + 1e-6:
        raise InputError(f"end_s: {hi:g} s is past the end of the video ({duration_s:.3f} s)")
    return lo, min(hi, duration_s)


def video_duration(data: bytes, *, max_bytes: int, max_pixels: int, field: str = "video") -> float:
    """Seconds from the first frame to the end, from the header; when the header has none, from one demux pass
    (no decoding). MediaError subclasses naming `field` otherwise (bytes, type, pixels, no frames, corrupt)."""
    with open_video(data, max_bytes=max_bytes, field=field) as container:
        stream = _video_stream(container, max_pixels, field)
        _, duration = _span(container, stream)
        if duration is not None and duration > 0:
            return duration
        try:
            index = _demux_index(container, stream, field, math.inf)
        except av.error.FFmpegError as e:
            raise CorruptMediaError(f"{field}: the video does not demux ({e})") from e
        return index.end - index.first


def decode_video(data: bytes, *, num_frames: int, size: int, max_bytes: int, max_seconds: float, max_pixels: int,
                 field: str = "video", timeout_s: float = 30.0, max_decoded: int = 20_000,
                 normalised: bool = True, span: tuple[float, float] | None = None) -> torch.Tensor:
    """-> (num_frames, 3, size, size) frames, or a MediaError naming the problem. Normalised float32, or with
    normalised=False the uint8 RGB the model's vision stage normalises itself (what the service sends it).
    `span`: (start_s, end_s) of the video to sample (see `decode_clip`); None: the whole video."""
    return decode_clip(data, num_frames=num_frames, size=size, max_bytes=max_bytes, max_seconds=max_seconds,
                       max_pixels=max_pixels, field=field, timeout_s=timeout_s, max_decoded=max_decoded,
                       normalised=normalised, span=span).frames


def decode_clip(data: bytes, *, num_frames: int, size: int, max_bytes: int, max_seconds: float, max_pixels: int,
                field: str = "video", timeout_s: float = 30.0, max_decoded: int = 20_000,
                normalised: bool = True, span: tuple[float, float] | None = None) -> DecodedClip:
    """`num_frames` frames sampled uniformly over the whole video, or with `span` = (start_s, end_s) (seconds from
    the first frame) over [start_s, end_s): an InputError whose message starts with `start_s:` when start_s is
    negative or at or past the video's end, `end_s:` when end_s is not after start_s or past the end by more than
    a frame. Timestamps are the sampled frames' presentation times."""
    with open_video(data, max_bytes=max_bytes, field=field) as container:
        stream = _video_stream(container, max_pixels, field)
        start, duration = _span(container, stream)
        if duration is not None and duration > max_seconds:
            raise MediaTooLargeError(f"{field}: {duration:.1f} s is over the limit of {max_seconds:g} s")
        sampler = _Sampler(container, stream, size, field, time.monotonic() + timeout_s, max_decoded)
        try:
            if span is not None:
                if duration is None or duration <= 0:  # the packets say how long it is (no decoding)
                    index = _demux_index(container, stream, field, sampler.deadline)
                    start, duration = index.first, index.end - index.first
                    _check_seconds(duration, max_seconds, field)
                    container.seek(0)
                lo, hi = check_span(span, duration, _frame_s(stream))
                cursor = _Cursor(sampler, start, strict_end=True)
                picked = sampler.convert(cursor, sample_times(start + lo, hi - lo, num_frames))
            elif duration is not None and duration > 0:
                picked = sampler.by_time(sample_times(start, duration, num_frames), start)
            else:
                picked = sampler.by_index(num_frames, max_seconds)
        except av.error.FFmpegError as e:
            raise CorruptMediaError(f"{field}: the video does not decode ({e})") from e
    frames = torch.stack([array_to_pixels(f) for f, _ in picked])  # (T, 3, size, size) uint8
    return DecodedClip(normalize(frames) if normalised else frames, [t for _, t in picked], sampler.decoded)


class MomentDecoder:
    """The moments (windows) of one video decoded in one forward pass over one container, chunk by chunk.

    `spans` are given (seconds from the first frame, each checked like `decode_clip`'s span) or planned with
    `plan_moments(duration, window_s, stride_s)`; they are known right after __init__, which opens the file,
    checks its limits (bytes, pixels, `max_seconds`) and demuxes it once (no decoding) for its keyframes (and its
    duration when the header has none; a stream ending short of the header's duration is a truncated file).
    `chunks()` then walks every window's instants in time order, seeking ahead past keyframes, so a frame shared
    by overlapping windows is decoded and resized once. The deadline
    (`timeout_s` of decoder time: the caller's time between chunks is not counted) and `max_decoded` bound the
    whole pass. Use as a context manager (closes the container)."""

    def __init__(self, data: bytes, *, num_frames: int, size: int, max_bytes: int, max_seconds: float,
                 max_pixels: int, spans: list[tuple[float, float]] | None = None, window_s: float | None = None,
                 stride_s: float | None = None, field: str = "video", timeout_s: float = 300.0,
                 max_decoded: int = 200_000) -> None:
        if num_frames < 1 or size < 1:
            raise ValueError(f"num_frames and size must be >= 1, got {num_frames} and {size}")
        if (spans is None) == (window_s is None or stride_s is None):
            raise ValueError("give either spans or both window_s and stride_s")
        self.num_frames, self.size, self.field = num_frames, size, field
        self._container = open_video(data, max_bytes=max_bytes, field=field)
        try:
            self._stream = _video_stream(self._container, max_pixels, field)
            self._sampler = _Sampler(self._container, self._stream, size, field, time.monotonic() + timeout_s,
                                     max_decoded)
            start, duration = _span(self._container, self._stream)
            if duration is not None:
                _check_seconds(duration, max_seconds, field)
            try:
                self._index = _demux_index(self._container, self._stream, field, self._sampler.deadline)
            except av.error.FFmpegError as e:
                raise CorruptMediaError(f"{field}: the video does not demux ({e})") from e
            frames_end = self._index.end - self._index.first
            if duration is None or duration <= 0:
                start, duration = self._index.first, frames_end
                _check_seconds(duration, max_seconds, field)
            elif frames_end < duration - END_SLACK_S:
                raise CorruptMediaError(f"{field}: the header says {duration:.2f} s but the video stream ends at "
                                        f"{frames_end:.2f} s (truncated)")
            self._start = start
            self.duration_s: float = duration
            """seconds from the first frame to the end"""
            if spans is None:
                assert window_s is not None and stride_s is not None
                try:
                    spans = plan_moments(duration, window_s, stride_s)
                except ValueError as e:
                    raise InputError(str(e)) from e
            elif not spans:
                raise InputError(f"{field}: no spans to decode")
            slack = _frame_s(self._stream)
            self.spans: list[tuple[float, float]] = [check_span(s, duration, slack) for s in spans]
            """(start_s, end_s) of each window, seconds from the first frame"""
        except BaseException:
            self._container.close()
            raise
        self.frame_times: list[list[float]] = []
        """for each window yielded so far, its frames' presentation times (seconds from the first frame)"""
        self.held = 0
        """distinct model-size frames the decoder holds now (windows not yet yielded, counting a frame once)"""
        self.peak_held = 0
        """the most it held at once"""
        self.converted = 0
        """frames resized to model size (each distinct frame the windows show, once)"""
        self.seeks = 0
        self._started = False

    @property
    def decoded(self) -> int:
        """frames decoded so far (the cost)"""
        return self._sampler.decoded

    @property
    def packets(self) -> int:
        """the video stream's packets (about its frames), counted by the demux pass"""
        return self._index.packets

    def __enter__(self) -> MomentDecoder:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._container.close()

    def chunks(self, size: int = 16) -> Iterator[torch.Tensor]:
        """(n, num_frames, 3, S, S) uint8 per chunk of `size` consecutive windows (the last may be shorter), in
        order, sampled like a clip (num_frames uniform instants within each window); holds at most the distinct
        frames of one chunk's windows plus those of later windows already passed (the windows overlapping the
        chunk's end), and the decoder's full-size frames (FRAMES_HELD). One pass: a second call is an error."""
        if size < 1:
            raise ValueError(f"chunk size must be >= 1, got {size}")
        if self._started:
            raise RuntimeError("MomentDecoder.chunks() runs one pass over the file; make a new decoder")
        self._started = True
        t, n, start = self.num_frames, len(self.spans), self._start
        order = sorted((target, w, i) for w, (lo, hi) in enumerate(self.spans)
                       for i, target in enumerate(sample_times(start + lo, hi - lo, t)))
        slots: list[list[np.ndarray | None]] = [[None] * t for _ in range(n)]
        times: list[list[float]] = [[0.0] * t for _ in range(n)]
        missing = [t] * n
        refs: dict[int, int] = {}  # id of a held frame -> how many unyielded slots show it
        cursor = _Cursor(self._sampler, start, keyframes=self._index.keyframes, strict_end=True)
        last: tuple[av.VideoFrame, np.ndarray] | None = None
        done = 0  # windows yielded
        try:
            for target, w, i in order:
                pick = cursor.at(target)
                if last is None or last[0] is not pick:
                    last = (pick, self._sampler._pixels(pick))
                    self.converted += 1
                slots[w][i], times[w][i] = last[1], _time(pick) - start
                refs[id(last[1])] = refs.get(id(last[1]), 0) + 1
                self.held, self.seeks = len(refs), cursor.seeks
                self.peak_held = max(self.peak_held, self.held)
                missing[w] -= 1
                while done < n and all(missing[v] == 0 for v in range(done, min(done + size, n))):
                    hi = min(done + size, n)
                    chunk = torch.empty((hi - done, t, 3, self.size, self.size), dtype=torch.uint8)
                    for v in range(done, hi):
                        for j, pixels in enumerate(slots[v]):
                            assert pixels is not None
                            chunk[v - done, j] = torch.from_numpy(pixels).permute(2, 0, 1)  # (S, S, 3) -> (3, S, S)
                            key = id(pixels)
                            refs[key] -= 1
                            if refs[key] == 0:
                                del refs[key]
                        slots[v] = []
                        self.frame_times.append(times[v])
                    self.held, done = len(refs), hi
                    paused = time.monotonic()
                    yield chunk  # (n, T, 3, S, S) uint8
                    self._sampler.deadline += time.monotonic() - paused
        except av.error.FFmpegError as e:
            raise CorruptMediaError(f"{self.field}: the video does not decode ({e})") from e


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
        return self.convert(_Cursor(self, start), targets)  # from the start: short clips never seek

    def convert(self, cursor: _Cursor, targets: list[float]) -> list[tuple[np.ndarray, float]]:
        """The frame `cursor` shows at each of the rising `targets`, at model size (converted at once: full-size
        frames are not kept; a frame picked twice in a row is converted once)."""
        chosen: list[tuple[np.ndarray, float]] = []
        last: tuple[av.VideoFrame, np.ndarray] | None = None
        for target in targets:
            pick = cursor.at(target)
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


class _Cursor:
    """The frame on screen at each of a rising sequence of instants, decoding forward. Seeks (to the keyframe
    before the target) when the target is more than SEEK_GAP_S ahead, or, given the file's `keyframes`, when one
    lies more than SKIP_MIN_S past the last frame decoded and at or before the target (never back: the frames it
    would skip are not needed). `strict_end`: a target past the end of the stream's last frame (by END_SLACK_S)
    is a CorruptMediaError (truncated file), not the last frame repeated."""

    def __init__(self, sampler: _Sampler, start: float, *, keyframes: list[float] | None = None,
                 strict_end: bool = False) -> None:
        self.sampler, self.start, self.keyframes, self.strict_end = sampler, start, keyframes, strict_end
        self.frames = sampler._frames()
        self.prev: av.VideoFrame | None = None  # last frame at or before the current target
        self.pending: av.VideoFrame | None = None  # decoded past a target; belongs to a later one
        self.seeks = 0

    def _skip_to(self, ahead: float, target: float) -> bool:
        if self.keyframes is None:
            return target - ahead > SEEK_GAP_S
        k = bisect.bisect_right(self.keyframes, target + 1e-9) - 1
        return k >= 0 and self.keyframes[k] - ahead > SKIP_MIN_S

    def at(self, target: float) -> av.VideoFrame:
        s = self.sampler
        tb = s.stream.time_base
        assert tb is not None
        pending, prev = self.pending, self.prev
        ahead = _time(pending) if pending is not None else (_time(prev) if prev is not None else self.start)
        if self._skip_to(ahead, target):
            try:
                s.container.seek(max(0, int(target / tb)), stream=s.stream, backward=True)
                self.frames, pending = s._frames(), None
                self.seeks += 1
            except av.error.FFmpegError:
                log.debug("%s: cannot seek, decoding through", s.field)
        pick: av.VideoFrame | None = None
        while pick is None:
            frame = pending if pending is not None else next(self.frames, None)
            pending = None
            if frame is None:  # end of stream: the last frame stays on screen
                if self.strict_end and prev is not None and target > _end(prev, s.stream) + END_SLACK_S:
                    raise CorruptMediaError(
                        f"{s.field}: the video stream ends at {_end(prev, s.stream) - self.start:.2f} s, before "
                        f"{target - self.start:.2f} s (truncated, or its header overstates the duration)")
                pick = prev
                break
            if _time(frame) <= target + 1e-9:
                prev = frame
                continue
            pending = frame
            pick = prev if prev is not None else frame
        self.pending, self.prev = pending, prev
        if pick is None:
            raise CorruptMediaError(f"{s.field}: no frame could be decoded")
        return pick


@dataclass
class _Index:
    keyframes: list[float] = dc_field(default_factory=list)
    """presentation times (s) of the keyframes, sorted"""
    first: float = 0.0
    """the first frame's presentation time (s)"""
    end: float = 0.0
    """the end of the last frame (s): its presentation time plus its duration"""
    packets: int = 0


def _demux_index(container: av.container.InputContainer, stream: av.video.stream.VideoStream, field: str,
                 deadline: float) -> _Index:
    """One demux pass (no decoding): keyframe times, first frame and end; then back to the start."""
    tb = stream.time_base
    assert tb is not None
    index, first = _Index(), math.inf
    for packet in container.demux(stream):
        if packet.size == 0 or packet.pts is None:
            continue
        index.packets += 1
        if index.packets % 256 == 0 and time.monotonic() > deadline:
            raise MediaTooLargeError(f"{field}: took longer than the decode time limit")
        t = float(packet.pts * tb)
        first = min(first, t)
        index.end = max(index.end, float((packet.pts + (packet.duration or 0)) * tb))
        if packet.is_keyframe:
            index.keyframes.append(t)
    if index.packets == 0:
        raise CorruptMediaError(f"{field}: the video stream has no frames")
    index.first = first
    index.end = max(index.end, first + _frame_s(stream))  # a single frame without a duration lasts one frame
    index.keyframes.sort()
    container.seek(0)
    return index


def _check_seconds(duration: float, max_seconds: float, field: str) -> None:
    if duration > max_seconds:
        raise MediaTooLargeError(f"{field}: {duration:.1f} s is over the limit of {max_seconds:g} s")


def _frame_s(stream: av.video.stream.VideoStream) -> float:
    """One frame's duration (s) at the stream's average (or guessed) rate; 1/25 s when neither is known."""
    rate = stream.average_rate or stream.guessed_rate
    return 1 / float(rate) if rate else 0.04


def _end(frame: av.VideoFrame, stream: av.video.stream.VideoStream) -> float:
    """When `frame` leaves the screen: its time plus its duration (one frame at the stream's rate if unknown)."""
    tb = frame.time_base
    return _time(frame) + (float(frame.duration * tb) if frame.duration and tb is not None else _frame_s(stream))
