"""Video decoding on real encoded clips made by PyAV: codecs, frame rates, VFR, short clips, limits."""

from __future__ import annotations

import io
import os

import av
import numpy as np
import pytest
import torch
from support.media import audio_only_bytes, image_bytes, vfr_video_bytes, video_bytes

from uniadapter_serve.errors import CorruptMediaError, EmptyMediaError, MediaTooLargeError, UnsupportedMediaTypeError
from uniadapter_serve.model.media.video import _span, decode_clip, decode_video, sample_indices
from uniadapter_serve.model.preprocess import CLIP_MEAN, CLIP_STD, array_to_tensor, image_to_tensor
from uniadapter_serve.model.routing import Routing

LIMITS = {"max_bytes": 10**9, "max_seconds": 600, "max_pixels": 10**7}
COLORS = [((37 * i) % 256, (255 - 23 * i) % 256, (91 * i) % 256) for i in range(20)]


def mean_rgb(frame: torch.Tensor) -> np.ndarray:
    """Undo the CLIP normalisation of a (3, S, S) frame -> its mean RGB in 0..255."""
    x = frame * torch.tensor(CLIP_STD)[:, None, None] + torch.tensor(CLIP_MEAN)[:, None, None]
    return (x.mean(dim=(1, 2)) * 255).numpy()


@pytest.mark.parametrize(
    ("codec", "fmt", "fps"),
    [("libx264", "mp4", 10), ("libx264", "mp4", 30), ("libvpx-vp9", "webm", 25), ("mjpeg", "avi", 10)],
)
def test_uniform_sampling_picks_the_right_frames_and_pixels(codec, fmt, fps):
    clip = decode_clip(video_bytes(COLORS, codec=codec, fmt=fmt, fps=fps), num_frames=4, size=16, **LIMITS)
    expected = sample_indices(20, 4)  # [2, 7, 12, 17]: the middle frame of each quarter
    assert clip.timestamps == pytest.approx([i / fps for i in expected], abs=1e-3)
    assert clip.frames.shape == (4, 3, 16, 16)
    for frame, i in zip(clip.frames, expected, strict=True):
        assert np.abs(mean_rgb(frame) - np.array(COLORS[i])).max() < 14, (codec, i)


def test_variable_frame_rate_clip_is_sampled_by_time():
    times = [0, 100, 150, 400, 1000, 1600]
    data = vfr_video_bytes(COLORS[:6], times)
    with av.open(io.BytesIO(data)) as container:
        start, duration = _span(container, container.streams.video[0])
    assert duration is not None
    clip = decode_clip(data, num_frames=5, size=8, **LIMITS)
    for i, got in enumerate(clip.timestamps):
        target = start + (i + 0.5) * duration / 5
        shown = max(t for t in times if t / 1000 <= target + 1e-9) / 1000  # the frame on screen then
        assert got == pytest.approx(shown, abs=1e-3)
    assert max(clip.timestamps) >= 1.0  # sampled over the clip's whole span, not its first frames


@pytest.mark.parametrize("n", [1, 3])
def test_clips_shorter_than_t_repeat_frames(n):
    clip = decode_clip(video_bytes(COLORS[:n]), num_frames=8, size=8, **LIMITS)
    assert clip.frames.shape[0] == 8
    assert clip.timestamps == sorted(clip.timestamps)
    assert len(set(clip.timestamps)) == n  # every frame used, none invented


def test_long_clip_decodes_a_fraction_of_its_frames():
    data = video_bytes([(i % 256, (7 * i) % 256, 0) for i in range(3000)], gop=50, size=(32, 32))
    clip = decode_clip(data, num_frames=8, size=8, **LIMITS)  # 300 s at 10 fps
    assert clip.decoded < 3000 / 5
    assert clip.timestamps == pytest.approx([(i + 0.5) * 300 / 8 - 0.05 for i in range(8)], abs=0.06)


def test_identical_frames_video_gives_the_image_embedding(backbone):
    size = int(backbone.config.vision_config.image_size)
    pixels = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    data = video_bytes([], codec="ffv1", fmt="avi", size=(size, size), frames=[pixels] * 6)  # lossless
    frames = decode_video(data, num_frames=4, size=size, **LIMITS)
    from PIL import Image

    image = image_to_tensor(Image.fromarray(pixels), size)
    assert torch.equal(frames[0], image) and torch.equal(frames[3], image)
    with torch.no_grad():
        video = backbone.video_features(backbone.encode_video(frames[None]))
        still = backbone.image_features(backbone.encode_image(image[None]))
    assert (video - still).abs().max() <= 1e-6


def test_identical_frames_give_the_image_embedding_with_an_adapter(backbone):
    from uniadapter_serve.model.testing import random_adapter
    from uniadapter_serve.model.uniadapter import UniAdapterConfig

    adapter = random_adapter(backbone, UniAdapterConfig.for_task("retrieval", bottleneck=8), seed=3)
    image = array_to_tensor(np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    with torch.no_grad():
        video = backbone.video_features(backbone.encode_video(image[None, None].expand(1, 8, 3, 32, 32),
                                                              Routing.single(adapter, 1)), Routing.single(adapter, 1))
        still = backbone.image_features(backbone.encode_image(image[None], Routing.single(adapter, 1)),
                                        Routing.single(adapter, 1))
    assert (video - still).abs().max() <= 1e-6


@pytest.mark.parametrize(
    ("data", "error", "message"),
    [
        (b"", EmptyMediaError, "empty"),
        (b"just some text, not a video" * 10, UnsupportedMediaTypeError, "not a video container"),
        (audio_only_bytes(), UnsupportedMediaTypeError, "no video stream"),
        (video_bytes(COLORS)[:300], CorruptMediaError, "does not decode"),
        (image_bytes(), UnsupportedMediaTypeError, "still image"),
    ],
    ids=["empty", "text", "audio-only", "truncated", "png"],
)
def test_bad_videos(data, error, message):
    with pytest.raises(error, match=message):
        decode_video(data, num_frames=4, size=8, **LIMITS)


def test_limits():
    clip = video_bytes(COLORS, size=(64, 48))
    with pytest.raises(MediaTooLargeError, match="bytes"):
        decode_video(clip, num_frames=4, size=8, **(LIMITS | {"max_bytes": 100}))
    with pytest.raises(MediaTooLargeError, match="pixels"):
        decode_video(clip, num_frames=4, size=8, **(LIMITS | {"max_pixels": 64 * 48 - 1}))
    with pytest.raises(MediaTooLargeError, match=r"2\.0 s is over the limit of 1 s"):
        decode_video(clip, num_frames=4, size=8, **(LIMITS | {"max_seconds": 1}))
    with pytest.raises(MediaTooLargeError, match="decode time limit"):
        decode_video(clip, num_frames=4, size=8, timeout_s=0, **LIMITS)
    with pytest.raises(MediaTooLargeError, match="more than 3 frames"):
        decode_video(clip, num_frames=4, size=8, max_decoded=3, **LIMITS)


def test_no_file_descriptor_leaks_after_bad_input():
    before = len(os.listdir("/proc/self/fd"))
    bad = [b"", b"garbage" * 20, audio_only_bytes(), video_bytes(COLORS)[:300]]
    for i in range(50):
        with pytest.raises((EmptyMediaError, UnsupportedMediaTypeError, CorruptMediaError)):
            decode_video(bad[i % len(bad)], num_frames=4, size=8, **LIMITS)
    assert len(os.listdir("/proc/self/fd")) <= before
