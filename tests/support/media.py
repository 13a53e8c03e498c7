"""Real encoded media made on the fly: images with PIL, videos with PyAV."""

from __future__ import annotations

import io

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


def video_bytes(colors: list[tuple[int, int, int]], *, codec: str = "libx264", fmt: str = "mp4", fps: int = 10,
                size: tuple[int, int] = (64, 48)) -> bytes:
    """One frame per colour, encoded for real."""
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = size
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        for color in colors:
            frame = av.VideoFrame.from_ndarray(np.full((size[1], size[0], 3), color, np.uint8), format="rgb24")
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
