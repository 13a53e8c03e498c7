"""Video decoding on real encoded clips made by PyAV: codecs, frame rates, VFR, short clips, limits, and only the
documented containers ever opened (playlists, manifests and external references refused before FFmpeg)."""

from __future__ import annotations

import io
import os

import av
import numpy as np
import pytest
import torch
from support.hostile import concat_protocol, ffconcat, hls, sdp, subfile, with_external_reference
from support.media import audio_only_bytes, image_bytes, vfr_video_bytes, video_bytes

from uniadapter_serve.errors import CorruptMediaError, EmptyMediaError, MediaTooLargeError, UnsupportedMediaTypeError
from uniadapter_serve.model.media.containers import MOV, mov_external_reference, video_container
from uniadapter_serve.model.media.video import _span, decode_clip, decode_video, probe_video, sample_indices
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


# -- only the documented containers are opened, each by its own demuxer, with no protocols -----------------------


def gif_video(colors: list[tuple[int, int, int]], size: tuple[int, int] = (32, 24)) -> bytes:
    from PIL import Image

    frames = [Image.new("RGB", size, c) for c in colors]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("data", "demuxer"),
    [
        (video_bytes(COLORS, fmt="mp4"), "mov"),
        (video_bytes(COLORS, fmt="mov"), "mov"),
        (video_bytes(COLORS, codec="libvpx-vp9", fmt="webm"), "matroska"),
        (video_bytes(COLORS, fmt="matroska"), "matroska"),
        (video_bytes(COLORS, codec="mjpeg", fmt="avi"), "avi"),
        (gif_video(COLORS), "gif"),
    ],
    ids=["mp4", "mov", "webm", "mkv", "avi", "gif"],
)
def test_every_accepted_container_still_decodes(data, demuxer):
    container = video_container(data)
    assert container is not None and container.demuxer == demuxer
    clip = decode_clip(data, num_frames=4, size=16, **LIMITS)
    assert clip.frames.shape == (4, 3, 16, 16)
    for frame, i in zip(clip.frames, sample_indices(20, 4), strict=True):
        assert np.abs(mean_rgb(frame) - np.array(COLORS[i])).max() < 14, (demuxer, i)
    assert probe_video(data, max_bytes=10**9, max_pixels=10**7) > 0


@pytest.mark.parametrize("fmt", ["flv", "mpegts"])
def test_containers_the_service_does_not_document_are_refused_before_ffmpeg(fmt, monkeypatch):
    data = video_bytes(COLORS, codec="flv" if fmt == "flv" else "libx264", fmt=fmt)
    with av.open(io.BytesIO(data)) as probed:  # FFmpeg itself reads them ...
        assert probed.streams.video
    monkeypatch.setattr(av, "open", _must_not_open)  # ... the service never hands them to it
    with pytest.raises(UnsupportedMediaTypeError, match="not a video container the service accepts; send MP4/MOV"):
        decode_video(data, num_frames=4, size=8, **LIMITS)


def _must_not_open(*args: object, **kwargs: object) -> None:
    raise AssertionError("av.open was called on bytes that are not an accepted container")


def _playlists(server_file: str) -> dict[str, bytes]:
    """Every upload that is a program for some FFmpeg demuxer, each naming `server_file`."""
    absolute = os.path.abspath(server_file)
    return {
        "ffconcat-relative": ffconcat(server_file),
        "ffconcat-absolute": ffconcat(absolute),
        "ffconcat-concat-protocol": ffconcat(concat_protocol(server_file, server_file)),
        "ffconcat-subfile": ffconcat(subfile(absolute)),
        "hls-relative": hls(server_file),
        "hls-absolute": hls(absolute),
        "hls-concat-protocol": hls(concat_protocol(absolute)),
        "hls-file-url": hls(f"file://{absolute}"),
        "sdp": sdp(45678),
    }


def test_an_ffconcat_upload_really_reads_a_server_file_when_ffmpeg_probes(tmp_path, monkeypatch):
    """The attack is real on this FFmpeg: probed, an ffconcat text decodes the server file it names."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "secret.mp4").write_bytes(video_bytes([(10, 200, 10)] * 8))
    with av.open(io.BytesIO(ffconcat("secret.mp4"))) as container:
        assert container.format.name == "concat"
        assert sum(1 for _ in container.decode(video=0)) == 8


@pytest.mark.parametrize("name", list(_playlists("secret.mp4")))
def test_playlists_and_manifests_are_refused_before_ffmpeg_sees_them(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "secret.mp4").write_bytes(video_bytes([(10, 200, 10)] * 8))
    data = _playlists("secret.mp4")[name]
    monkeypatch.setattr(av, "open", _must_not_open)
    for call in (lambda: probe_video(data, max_bytes=10**9, max_pixels=10**7),
                 lambda: decode_video(data, num_frames=4, size=8, **LIMITS)):
        with pytest.raises(UnsupportedMediaTypeError, match="not a video container the service accepts"):
            call()


def test_no_protocol_and_no_other_demuxer_even_if_one_were_reached(tmp_path, monkeypatch):
    """The open options alone stop a nested open: what a demuxer names cannot be read."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "secret.mp4").write_bytes(video_bytes([(10, 200, 10)] * 8))
    options = MOV.open_options()
    assert options["protocol_whitelist"] == "none" and options["enable_drefs"] == "0"
    with av.open(io.BytesIO(ffconcat("secret.mp4")), format="concat") as reached:
        assert sum(1 for _ in reached.decode(video=0)) == 8  # with every protocol: the file is read
    with pytest.raises(av.error.FFmpegError):  # with none: file: is refused, the named file never opened
        av.open(io.BytesIO(ffconcat("secret.mp4")), format="concat",
                container_options={"protocol_whitelist": options["protocol_whitelist"]})
    with pytest.raises(av.error.FFmpegError):  # a demuxer other than the container's is not allowed
        av.open(io.BytesIO(ffconcat("secret.mp4")), format="concat",
                container_options={"format_whitelist": options["format_whitelist"]})
    with pytest.raises(av.error.FFmpegError):  # nor are sockets: SDP fails at once instead of waiting for RTP
        av.open(io.BytesIO(sdp(45679)), format="sdp", container_options={"protocol_whitelist": "none"})


def test_an_mp4_naming_an_external_file_is_refused_and_the_file_never_opened(tmp_path, monkeypatch):
    own = video_bytes([(200, 10, 10)] * 8)
    outside = tmp_path / "outside.mp4"
    outside.write_bytes(own)
    data = with_external_reference(own, str(outside))
    with av.open(io.BytesIO(data), format="mp4", container_options={"enable_drefs": "1",
                                                                     "use_absolute_path": "1"}) as followed:
        assert sum(1 for _ in followed.decode(video=0)) == 8  # the reference is real: FFmpeg can follow it
    options = MOV.open_options() | {"enable_drefs": "1", "use_absolute_path": "1"}
    with av.open(io.BytesIO(data), format="mov", container_options=options) as refused:
        assert sum(1 for _ in refused.decode(video=0)) == 0  # with no protocols it cannot, even with drefs on
    assert mov_external_reference(data) and not mov_external_reference(own)
    monkeypatch.setattr(av, "open", _must_not_open)
    with pytest.raises(UnsupportedMediaTypeError, match="external data reference"):
        decode_video(data, num_frames=4, size=8, **LIMITS)


def test_the_data_reference_walk_takes_any_bytes():
    own = video_bytes([(200, 10, 10)] * 8)
    bad = with_external_reference(own, "/etc/passwd")
    for n in range(0, len(bad), 5):  # the moov comes last: cut anywhere, it is incomplete and not judged
        assert not mov_external_reference(bad[:n])
    rng = np.random.default_rng(0)
    for _ in range(200):
        junk = bytearray(bad)
        for i in rng.integers(0, len(junk), 8):
            junk[i] = int(rng.integers(0, 256))
        mov_external_reference(bytes(junk))  # no exception, whatever the sizes say
    moov = bad[bad.index(b"moov") - 4:]
    assert mov_external_reference(b"\x00\x00\x00\x08ftyp" + b"\x00\x00\x00\x08free" * 100 + moov)
    padded = b"\x00\x00\x00\x08ftyp" + b"\x00\x00\x00\x08free" * 100_000 + moov
    assert not mov_external_reference(padded)  # the walk stops after MAX_BOXES boxes (FFmpeg still never follows)


def test_bytes_that_look_like_mp4_are_read_by_the_mp4_demuxer_only():
    polyglot = b"\x00\x00\x00\x14ftypisom\x00\x00\x02\x00isom" + ffconcat("secret.mp4")
    with pytest.raises(CorruptMediaError, match="video/mp4 file does not decode"):
        decode_video(polyglot, num_frames=4, size=8, **LIMITS)
