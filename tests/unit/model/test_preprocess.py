"""uint8 pixels normalised in the vision stage give exactly what pixels normalised on the host gave: one
`normalize` for both, float32 arithmetic then the backbone's dtype, so outputs are bit for bit the same."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from uniadapter_serve.model.preprocess import CLIP_MEAN, CLIP_STD, image_to_pixels, image_to_tensor, normalize
from uniadapter_serve.model.routing import Routing
from uniadapter_serve.model.stages import VisionInput, make_stages
from uniadapter_serve.model.tokenizer import BlipTokenizer


def photo(seed: int, side: int = 50) -> Image.Image:
    """Noise, not a flat colour: every pixel value, every rounding of the bicubic resize, is exercised."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (side, side + 7, 3), dtype=np.uint8))


def test_normalize_is_the_arithmetic_the_float_path_always_did():
    pixels = image_to_pixels(photo(0), 32)
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 32, 32)
    x = pixels.float().div_(255.0)  # preprocess.array_to_tensor before uint8 inputs, written out
    expected = (x - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)
    assert torch.equal(normalize(pixels), expected)
    assert torch.equal(image_to_tensor(photo(0), 32), expected)
    assert torch.equal(normalize(pixels[None].expand(4, 3, 32, 32))[3], expected)  # (T, 3, S, S) too
    assert torch.equal(normalize(pixels, torch.bfloat16), expected.to(torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_vision_stage_outputs_are_bit_identical_for_uint8_and_float_inputs(backbone, tiny_config, dtype):
    stages = make_stages(backbone.to(dtype), BlipTokenizer.demo(tiny_config.text_config.vocab_size))
    size = tiny_config.vision_config.image_size
    images = [photo(1), photo(2)]
    clip = [photo(3 + i) for i in range(3)]
    raw = [VisionInput(image_to_pixels(images[0], size)[None]),
           VisionInput(torch.stack([image_to_pixels(f, size) for f in clip]), video=True),
           VisionInput(image_to_pixels(images[1], size)[None])]
    floats = [VisionInput(image_to_tensor(images[0], size)[None]),
              VisionInput(torch.stack([image_to_tensor(f, size) for f in clip]), video=True),
              VisionInput(image_to_tensor(images[1], size)[None])]
    assert all(v.pixels.dtype == torch.uint8 for v in raw)
    vision = stages["vision"]
    for got in (vision(raw, Routing.none(3)),  # all uint8: normalised on the device
                vision([raw[0], floats[1], raw[2]], Routing.none(3))):  # mixed with float probes in one batch
        want = vision(floats, Routing.none(3))
        for g, w in zip(got, want, strict=True):
            assert g.states.dtype == dtype
            assert torch.equal(g.states, w.states)
            assert g.embedding is not None and w.embedding is not None
            assert torch.equal(g.embedding, w.embedding)
    # and not trivially: other pixels give other states
    other = vision([VisionInput(image_to_pixels(photo(9), size)[None])], Routing.none(1))
    assert not torch.equal(other[0].states, want[0].states)
