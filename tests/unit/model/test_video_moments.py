"""Moments of long videos on real encoded files: planning, spans, and MomentDecoder's one pass (instants, frames
decoded once, seeking, limits, bounded memory). Each frame's colour encodes its index, so a sampled frame says
which instant it came from."""

from __future__ import annotations

import itertools
import math
import os
import time

import numpy as np
import pytest
import torch
from support.media import video_bytes

from uniadapter_serve.errors import (
    CorruptMediaError,
    EmptyMediaError,
    InputError,
    MediaError,
    MediaTooLargeError,
    UnsupportedMediaTypeError,
)
from uniadapter_serve.model.media import video as video_module
from uniadapter_serve.model.media.video import MomentDecoder, decode_clip, plan_moments, video_duration

LIMITS = {"max_bytes": 10**9, "max_seconds": 10**4, "max_pixels": 10**7}
FPS = 10


def color(k: int) -> tuple[int, int, int]:
    """Frame k's flat colour: its index in base 16, one digit per channel (levels 16 apart survive H.264)."""
    return (k % 16) * 16 + 8, (k // 16 % 16) * 16 + 8, (k // 256 % 16) * 16 + 8


def index_of(frame: torch.Tensor) -> int:
    """(3, S, S) uint8 frame -> the index its colour encodes."""
    r, g, b = ((frame.float().mean(dim=(1, 2)) - 8) / 16).round().int().tolist()
    return int(r + 16 * g + 256 * b)


def counting_video(seconds: float, *, gop: int = 20, fmt: str = "mp4") -> bytes:
    """`seconds` of 10 fps H.264, frame k coloured color(k), a keyframe every `gop` frames."""
    return video_bytes([color(k) for k in range(round(seconds * FPS))], fps=FPS, gop=gop, size=(32, 32), fmt=fmt)


def shown_at(t: float) -> int:
    """The index of the frame on screen at t seconds."""
    return math.floor(t * FPS + 1e-6)


def without_duration(mkv: bytes) -> bytes:
    """A Matroska file whose Segment has no Duration element (as a recorder that cannot seek back writes it): the
    element (ID 0x4489, 8-byte float) becomes a Void element of the same length."""
    at = mkv.find(b"\x44\x89\x88")
    assert at > 0 and mkv.count(b"\x44\x89\x88") == 1
    return mkv[:at] + b"\xec\x89" + b"\x00" * 9 + mkv[at + 11:]


def flat(spans: list[tuple[float, float]]) -> list[float]:
    return [x for span in spans for x in span]


def decode_all(decoder: MomentDecoder, size: int = 16) -> torch.Tensor:
    """Every window of the pass -> (n, T, 3, S, S)."""
    return torch.cat(list(decoder.chunks(size)))


@pytest.fixture(scope="module")
def video_30s() -> bytes:
    return counting_video(30)


@pytest.fixture(scope="module")
def video_150s() -> bytes:
    return counting_video(150, gop=100)


@pytest.fixture(scope="module")
def video_300s() -> bytes:
    """300 s, keyframes every 10 s (sparse)."""
    return counting_video(300, gop=100)


# -- planning --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("duration", "window", "stride", "expected"),
    [
        (5.0, 8.0, 4.0, [(0.0, 5.0)]),  # shorter than a window: one moment, the whole video
        (8.0, 8.0, 4.0, [(0.0, 8.0)]),  # exactly one window
        (16.0, 8.0, 4.0, [(0.0, 8.0), (4.0, 12.0), (8.0, 16.0)]),  # the strides land on the end
        (18.0, 8.0, 4.0, [(0.0, 8.0), (4.0, 12.0), (8.0, 16.0), (10.0, 18.0)]),  # a tail window ends at the end
        (24.0, 8.0, 8.0, [(0.0, 8.0), (8.0, 16.0), (16.0, 24.0)]),  # stride = window: no overlap
        (60.0, 4.0, 30.0, [(0.0, 4.0), (30.0, 34.0), (56.0, 60.0)]),  # stride > window: gaps, the end still seen
        (0.04, 8.0, 4.0, [(0.0, 0.04)]),  # a one-frame video
    ],
)
def test_plan_moments(duration, window, stride, expected):
    assert flat(plan_moments(duration, window, stride)) == pytest.approx(flat(expected))


@pytest.mark.parametrize(("duration", "window", "stride"), [(600.0, 8.0, 4.0), (100.0, 1.0, 0.1), (61.7, 10.0, 3.3)])
def test_planned_windows_cover_the_video_without_drift(duration, window, stride):
    spans = plan_moments(duration, window, stride)
    assert spans[0][0] == 0.0 and spans[-1][1] == duration
    assert all(b - a == pytest.approx(window) for a, b in spans)
    assert all(later[0] <= earlier[1] for earlier, later in itertools.pairwise(spans))  # no gaps
    assert [a for a, _ in spans[:-1]] == pytest.approx([k * stride for k in range(len(spans) - 1)], abs=1e-9)
    assert spans[-2][1] < duration  # the strided windows stop before the end; only the tail reaches it


@pytest.mark.parametrize(
    ("duration", "window", "stride", "field"),
    [(0.0, 8.0, 4.0, "duration_s"), (-1.0, 8.0, 4.0, "duration_s"), (math.nan, 8.0, 4.0, "duration_s"),
     (60.0, 0.0, 4.0, "window_s"), (60.0, -8.0, 4.0, "window_s"), (60.0, math.inf, 4.0, "window_s"),
     (60.0, 8.0, 0.0, "stride_s"), (60.0, 8.0, math.nan, "stride_s"), (3600.0, 5e-324, 5e-324, "stride_s")],
)
def test_bad_numbers_are_refused_naming_them(duration, window, stride, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        plan_moments(duration, window, stride)


# -- duration --------------------------------------------------------------------------------------------------


def test_duration_from_the_header_and_from_the_packets(video_30s):
    assert video_duration(video_30s, max_bytes=10**9, max_pixels=10**7) == pytest.approx(30.0)
    mkv = counting_video(12.3, fmt="matroska")
    assert video_duration(mkv, max_bytes=10**9, max_pixels=10**7) == pytest.approx(12.3)
    headerless = without_duration(mkv)
    with video_module.open_video(headerless, max_bytes=10**9) as container:  # the header really has none
        assert video_module._span(container, container.streams.video[0])[1] is None
    assert video_duration(headerless, max_bytes=10**9, max_pixels=10**7) == pytest.approx(12.3)


@pytest.mark.parametrize(
    ("data", "error"),
    [(b"", EmptyMediaError), (b"not a video at all" * 20, UnsupportedMediaTypeError)],
    ids=["empty", "text"],
)
def test_duration_of_bad_bytes(data, error):
    with pytest.raises(error):
        video_duration(data, max_bytes=10**9, max_pixels=10**7)


def test_duration_limits(video_30s):
    with pytest.raises(MediaTooLargeError, match="pixels"):
        video_duration(video_30s, max_bytes=10**9, max_pixels=32 * 32 - 1)
    with pytest.raises(MediaTooLargeError, match="bytes"):
        video_duration(video_30s, max_bytes=100, max_pixels=10**7)


# -- windows sampled at the right instants ------------------------------------------------------------------


def test_each_window_shows_the_frames_on_screen_at_its_instants(video_30s):
    with MomentDecoder(video_30s, num_frames=8, size=8, window_s=8, stride_s=4, **LIMITS) as decoder:
        assert flat(decoder.spans) == pytest.approx(flat(plan_moments(30.0, 8, 4)))  # known before any decoding
        assert decoder.decoded == 0
        frames = decode_all(decoder, size=3)
    assert frames.shape == (len(decoder.spans), 8, 3, 8, 8) and frames.dtype == torch.uint8
    for w, (start, end) in enumerate(decoder.spans):
        instants = [start + (i + 0.5) * (end - start) / 8 for i in range(8)]
        assert [index_of(f) for f in frames[w]] == [shown_at(t) for t in instants], w
        assert decoder.frame_times[w] == pytest.approx([shown_at(t) / FPS for t in instants], abs=1e-6)


def test_a_window_is_sampled_like_a_clip_of_that_span(video_30s):
    spans = [(2.0, 10.0), (6.5, 9.0), (21.0, 30.0)]
    with MomentDecoder(video_30s, num_frames=4, size=8, spans=spans, **LIMITS) as decoder:
        frames = decode_all(decoder)
    for w, span in enumerate(spans):
        clip = decode_clip(video_30s, num_frames=4, size=8, span=span, normalised=False, **LIMITS)
        assert torch.equal(frames[w], clip.frames), span
        assert decoder.frame_times[w] == pytest.approx(clip.timestamps)  # this file's first frame is at 0


def test_decode_clip_span_samples_within_the_span(video_30s):
    clip = decode_clip(video_30s, num_frames=4, size=8, span=(10.0, 12.0), normalised=False, **LIMITS)
    assert [index_of(f) for f in clip.frames] == [shown_at(10 + (i + 0.5) * 0.5) for i in range(4)]
    whole = decode_clip(video_30s, num_frames=4, size=8, normalised=False, **LIMITS)
    assert [index_of(f) for f in whole.frames] == [shown_at((i + 0.5) * 7.5) for i in range(4)]  # span=None: all


def test_a_video_shorter_than_a_window_is_one_moment():
    data = counting_video(3)
    with MomentDecoder(data, num_frames=8, size=8, window_s=8, stride_s=4, **LIMITS) as decoder:
        frames = decode_all(decoder)
    assert flat(decoder.spans) == pytest.approx([0.0, 3.0])
    assert [index_of(f) for f in frames[0]] == [shown_at((i + 0.5) * 3 / 8) for i in range(8)]


def test_a_video_without_a_duration_in_its_header(video_30s):
    headerless = without_duration(counting_video(20, fmt="matroska"))
    with MomentDecoder(headerless, num_frames=4, size=8, window_s=8, stride_s=4, **LIMITS) as decoder:
        frames = decode_all(decoder)
    assert decoder.duration_s == pytest.approx(20.0)
    assert flat(decoder.spans) == pytest.approx(flat(plan_moments(20.0, 8, 4)))
    for w, (start, end) in enumerate(decoder.spans):
        assert [index_of(f) for f in frames[w]] == [shown_at(start + (i + 0.5) * (end - start) / 4)
                                                    for i in range(4)]
    clip = decode_clip(headerless, num_frames=2, size=8, span=(5.0, 7.0), normalised=False, **LIMITS)
    assert [index_of(f) for f in clip.frames] == [shown_at(5.5), shown_at(6.5)]


# -- one pass: shared frames decoded once, seeking ---------------------------------------------------------------


def test_overlapping_windows_decode_and_resize_each_frame_once(video_30s):
    with MomentDecoder(video_30s, num_frames=8, size=8, window_s=8, stride_s=2, **LIMITS) as decoder:
        decode_all(decoder)  # 12 windows, each frame of the file in up to 4 of them
        distinct = {t for times in decoder.frame_times for t in times}
        assert decoder.decoded <= decoder.packets == 300  # no frame decoded twice
        assert decoder.converted == len(distinct) < sum(len(t) for t in decoder.frame_times) / 2
    window_by_window = sum(decode_clip(video_30s, num_frames=8, size=8, span=span, **LIMITS).decoded
                           for span in decoder.spans)
    assert window_by_window > 2.5 * decoder.decoded  # what decoding each window on its own costs


def test_seeks_ahead_in_a_long_file_with_sparse_keyframes(video_300s):
    spans = [(15.0, 17.0), (120.0, 124.0), (121.0, 125.0), (280.0, 290.0)]
    with MomentDecoder(video_300s, num_frames=4, size=8, spans=spans, **LIMITS) as decoder:
        frames = decode_all(decoder)
        keyframes = decoder._index.keyframes
        assert len(keyframes) < 40 and decoder.seeks >= 3  # to a keyframe before each far span
        assert decoder.decoded < 3000 / 10  # of the file's 3000 frames
    for w, (start, end) in enumerate(spans):
        assert [index_of(f) for f in frames[w]] == [shown_at(start + (i + 0.5) * (end - start) / 4)
                                                    for i in range(4)]


def test_planned_moments_skip_what_no_instant_needs():
    data = counting_video(120, gop=10)  # a keyframe every second
    with MomentDecoder(data, num_frames=2, size=8, window_s=8, stride_s=8, **LIMITS) as decoder:
        frames = decode_all(decoder)  # instants at 2 and 6 s of each window: 30 of the 120 seconds
        assert decoder.decoded < decoder.packets / 3
    assert [index_of(f) for f in frames[:, 1]] == [shown_at(8 * w + 6) for w in range(15)]


# -- spans outside the video ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("span", "message"),
    [((30.0, 31.0), "^start_s: 30 s is at or past the end"), ((45.0, 50.0), "^start_s:"),
     ((-1.0, 2.0), "^start_s:"), ((math.nan, 2.0), "^start_s:"), ((10.0, 31.0), "^end_s: 31 s is past the end"),
     ((10.0, 10.0), "^end_s: must be after start_s"), ((10.0, 5.0), "^end_s:"), ((10.0, math.inf), "^end_s:")],
)
def test_spans_outside_the_video_are_refused_naming_the_field(video_30s, span, message):
    with pytest.raises(InputError, match=message):
        decode_clip(video_30s, num_frames=4, size=8, span=span, **LIMITS)
    with pytest.raises(InputError, match=message):
        MomentDecoder(video_30s, num_frames=4, size=8, spans=[(0.0, 8.0), span], **LIMITS)


def test_an_end_within_a_frame_of_the_end_is_the_end(video_30s):
    clip = decode_clip(video_30s, num_frames=2, size=8, span=(29.0, 30.0 + 0.5 / FPS), normalised=False, **LIMITS)
    assert [index_of(f) for f in clip.frames] == [shown_at(29.25), shown_at(29.75)]


def test_bad_windows_are_input_errors(video_30s):
    with pytest.raises(InputError, match=r"^stride_s:"):
        MomentDecoder(video_30s, num_frames=4, size=8, window_s=8, stride_s=0, **LIMITS)
    with pytest.raises(ValueError, match="either spans or"):
        MomentDecoder(video_30s, num_frames=4, size=8, spans=[(0, 1)], window_s=8, stride_s=4, **LIMITS)


# -- corrupt and truncated bytes, limits -----------------------------------------------------------------------


def corrupted(data: bytes) -> bytes:
    junk = bytearray(data)
    rng = np.random.default_rng(0)
    for i in rng.integers(len(data) // 4, len(data) * 3 // 4, 200):
        junk[i] = int(rng.integers(0, 256))
    return bytes(junk)


@pytest.mark.parametrize(
    ("make", "message"),
    [(lambda: counting_video(30)[: 5000], "does not decode"),  # the moov (at the end) is cut off
     (lambda: counting_video(30, fmt="matroska")[: 6000], r"header says 30\.00 s but the video stream ends"),
     (lambda: corrupted(counting_video(30, fmt="matroska")), "does not decode"),
     (lambda: b"", "empty"), (lambda: b"\x00\x00\x00\x14ftypisom" + b"\x00" * 500, "does not")],
    ids=["mp4-truncated", "mkv-truncated", "mkv-garbled", "empty", "mp4-no-boxes"],
)
def test_corrupt_and_truncated_files_are_media_errors(make, message):
    data = make()
    with (pytest.raises(MediaError, match=message),
          MomentDecoder(data, num_frames=4, size=8, window_s=8, stride_s=4, **LIMITS) as decoder):
        decode_all(decoder)


def test_a_truncated_file_is_refused_by_a_span_too():
    data = counting_video(30, fmt="matroska")
    with pytest.raises(CorruptMediaError, match="the video stream ends at"):  # the header says 30 s
        decode_clip(data[: len(data) // 3], num_frames=2, size=8, span=(20.0, 25.0), **LIMITS)


def test_the_limits_bound_the_whole_pass(video_30s):
    common = {"num_frames": 8, "size": 8, "window_s": 8, "stride_s": 4}
    with pytest.raises(MediaTooLargeError, match=r"30\.0 s is over the limit of 20 s"):
        MomentDecoder(video_30s, **common, **(LIMITS | {"max_seconds": 20}))
    with MomentDecoder(video_30s, **common, max_decoded=100, **LIMITS) as decoder:  # each window alone needs < 100
        with pytest.raises(MediaTooLargeError, match="more than 100 frames"):
            decode_all(decoder, size=1)
        assert len(decoder.frame_times) >= 1  # windows came out before the cap was reached
    with (pytest.raises(MediaTooLargeError, match="decode time limit"),
          MomentDecoder(video_30s, **common, timeout_s=0, **LIMITS) as decoder):
        decode_all(decoder)


def test_the_deadline_counts_decoder_time_not_the_callers(video_30s, monkeypatch):
    clock = {"offset": 0.0}

    class Clock:
        @staticmethod
        def monotonic() -> float:
            return time.monotonic() + clock["offset"]

    monkeypatch.setattr(video_module, "time", Clock)
    with MomentDecoder(video_30s, num_frames=8, size=8, window_s=8, stride_s=4, timeout_s=60, **LIMITS) as decoder:
        chunks = 0
        for _ in decoder.chunks(1):
            chunks += 1
            clock["offset"] += 1000.0  # the caller embeds the chunk for a long while
    assert chunks == len(decoder.spans) == 7
    resize = video_module._Sampler._pixels

    def slow_resize(self: video_module._Sampler, frame: object) -> np.ndarray:
        clock["offset"] += 1000.0  # time passing inside the decoder does count
        return resize(self, frame)

    monkeypatch.setattr(video_module._Sampler, "_pixels", slow_resize)
    with (MomentDecoder(video_30s, num_frames=8, size=8, window_s=8, stride_s=4, timeout_s=60, **LIMITS) as decoder,
          pytest.raises(MediaTooLargeError, match="decode time limit")):
        decode_all(decoder, size=1)


def test_no_file_descriptor_leaks_after_bad_input(video_30s):
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(30):
        for bad in (b"garbage" * 30, video_30s[:5000]):
            with pytest.raises(MediaError):
                MomentDecoder(bad, num_frames=4, size=8, window_s=8, stride_s=4, **LIMITS)
        with pytest.raises(InputError):
            MomentDecoder(video_30s, num_frames=4, size=8, spans=[(40.0, 41.0)], **LIMITS)
    assert len(os.listdir("/proc/self/fd")) <= before


# -- memory: one chunk at a time ------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 4, 16])
def test_the_decoder_holds_one_chunk_whatever_the_length(chunk, video_150s, video_300s):
    peaks = {}
    for name, data in (("150 s", video_150s), ("300 s", video_300s)):
        with MomentDecoder(data, num_frames=8, size=8, window_s=8, stride_s=4, **LIMITS) as decoder:
            sizes = []
            for frames in decoder.chunks(chunk):
                sizes.append(frames.shape[0])
                assert decoder.held <= chunk * 8  # what it keeps after handing a chunk out: later windows only
            assert sizes[:-1] == [chunk] * (len(sizes) - 1) and sum(sizes) == len(decoder.spans)
            assert decoder.held == 0
            peaks[name] = decoder.peak_held
        assert decoder.peak_held <= max(chunk, 2) * 8  # distinct frames: one chunk (and its overlap) at most
    assert peaks["300 s"] == peaks["150 s"]  # twice the video, not one frame more held


def test_one_pass_only(video_30s):
    with MomentDecoder(video_30s, num_frames=2, size=8, window_s=8, stride_s=4, **LIMITS) as decoder:
        decode_all(decoder)
        with pytest.raises(RuntimeError, match="one pass"):
            next(decoder.chunks())
