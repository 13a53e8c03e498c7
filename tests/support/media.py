"""Real encoded media made on the fly: images with PIL, videos with PyAV."""

from __future__ import annotations

import io
from fractions import Fraction

import av
import numpy as np
from PIL import Image


def image_bytes(color: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (48, 40),
                fmt: str = "PNG") -> bytes:
    image = Image.new("RGB", size, color)
    image.paste((20, 20, 220), (size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2))
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


def png_bomb(side: int = 20_000) -> bytes:
    """A small PNG that declares side x side pixels (a decompression bomb)."""
    buf = io.BytesIO()
    Image.new("1", (side, side), 0).save(buf, "PNG", optimize=True)
    return buf.getvalue()


PIX_FMTS = {"mjpeg": "yuvj420p", "png": "rgb24", "libx264rgb": "rgb24", "ffv1": "bgr0"}


def video_bytes(colors: list[tuple[int, int, int]], *, codec: str = "libx264", fmt: str = "mp4", fps: int = 10,
                size: tuple[int, int] = (64, 48), gop: int | None = None, options: dict[str, str] | None = None,
                frames: list[np.ndarray] | None = None) -> bytes:
    """One frame per colour (or the given RGB frames), encoded for real."""
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=fps, options=options or {})
        stream.width, stream.height = size
        stream.pix_fmt = PIX_FMTS.get(codec, "yuv420p")
        if gop is not None:
            stream.codec_context.gop_size = gop
        pictures = frames if frames is not None else [np.full((size[1], size[0], 3), c, np.uint8) for c in colors]
        for pixels in pictures:
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def vfr_video_bytes(colors: list[tuple[int, int, int]], times_ms: list[int], size: tuple[int, int] = (32, 32)) -> bytes:
    """A variable-frame-rate clip: frame i shows colors[i] from times_ms[i]."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="matroska") as container:
        stream = container.add_stream("libx264", rate=1000)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        for color, t in zip(colors, times_ms, strict=True):
            frame = av.VideoFrame.from_ndarray(np.full((size[1], size[0], 3), color, np.uint8), format="rgb24")
            frame.pts = t
            frame.time_base = Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def audio_only_bytes() -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format="wav") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()
