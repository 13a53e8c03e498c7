"""Uploads become uint8 model inputs: a quarter of float32's bytes when a job is pickled to a Ray replica,
and the same pixels after the trip."""

from __future__ import annotations

import asyncio
import pickle

import torch
from support.media import image_bytes, video_bytes

from uniadapter_serve.model.preprocess import normalize
from uniadapter_serve.model.stages import VisionInput
from uniadapter_serve.service.decoding import VisionDecoder
from uniadapter_serve.service.settings import Settings

SIZE = 384
COLORS = [((37 * i) % 256, (255 - 23 * i) % 256, (91 * i) % 256) for i in range(12)]


def pickled(visual: VisionInput) -> bytes:
    return pickle.dumps(visual, protocol=pickle.HIGHEST_PROTOCOL)


def check_trip(visual: VisionInput, frames: int, video: bool) -> None:
    assert visual.pixels.dtype == torch.uint8 and visual.pixels.shape == (frames, 3, SIZE, SIZE)
    old = VisionInput(normalize(visual.pixels), video=video)  # what was sent before: normalised float32
    assert len(pickled(visual)) < 0.3 * len(pickled(old))
    back = pickle.loads(pickled(visual))
    assert back.video is video and back.embed
    assert back.pixels.dtype == torch.uint8 and torch.equal(back.pixels, visual.pixels)


def test_an_uploaded_clip_and_image_pickle_as_uint8_a_quarter_of_float32():
    decoder = VisionDecoder(Settings(), SIZE)
    clip = asyncio.run(decoder.video_input(video_bytes(COLORS), 8, "video"))
    check_trip(clip, 8, video=True)
    mean_rgb = clip.pixels[0].float().mean(dim=(1, 2))  # 8 sampled of 12: the first shows colour 0
    assert (mean_rgb - torch.tensor(COLORS[0], dtype=torch.float32)).abs().max() < 14  # RGB bytes, as encoded
    image = asyncio.run(decoder.image_input(image_bytes(), "image/png", "image"))
    check_trip(image, 1, video=False)
    assert image.pixels[0, :, 0, 0].tolist() == [200, 30, 30]  # the corner's colour, as PIL decodes it
