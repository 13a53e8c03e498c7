"""Image and frame preprocessing as BLIP does it: resize (S, S) bicubic, scale to [0, 1],
normalise with the CLIP mean/std. Plain torch on a PIL image (no torchvision)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def image_to_tensor(image: Image.Image, size: int) -> torch.Tensor:
    """PIL image -> (3, size, size) float32."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.BICUBIC)
    return array_to_tensor(np.asarray(rgb))


def array_to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 at model size -> (3, H, W) normalised float32."""
    x = torch.tensor(pixels).permute(2, 0, 1).float().div_(255.0)  # copies: PIL arrays are read-only
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return (x - mean) / std
