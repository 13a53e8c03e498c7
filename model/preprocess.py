"""Image and frame preprocessing as BLIP does it: transparency composited onto white, resize (S, S)
bicubic, scale to [0, 1], normalise with the CLIP mean/std. Plain torch on a PIL image (no torchvision).

The service stops at the resized uint8 RGB (`image_to_pixels`, `array_to_pixels`): a quarter of the bytes of
float32 to move between processes and to the device; the vision stage normalises there (`normalize`).

The same settings, written as `preprocessor_config.json` beside a backbone (`write_preprocessor_config`),
make transformers' `BlipProcessor.from_pretrained(folder)` compute the tensor the service computes.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BACKGROUND = (255, 255, 255, 255)
"""what transparent pixels show: white, as transformers' BLIP processor composites them"""
PREPROCESSOR_CONFIG = "preprocessor_config.json"


def has_transparency(image: Image.Image) -> bool:
    """An alpha band (RGBA, LA, PA) or a transparent palette index / colour key (`info["transparency"]`)."""
    return "A" in image.getbands() or image.info.get("transparency") is not None


def to_rgb(image: Image.Image) -> Image.Image:
    """-> RGB, any transparency composited onto white (the colour under a transparent pixel is never seen)."""
    if has_transparency(image):
        rgba = image if image.mode == "RGBA" else image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, BACKGROUND), rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def image_to_pixels(image: Image.Image, size: int) -> torch.Tensor:
    """PIL image -> (3, size, size) uint8 RGB at model size, not yet normalised (`normalize` does that)."""
    rgb = to_rgb(image)
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.BICUBIC)
    return array_to_pixels(np.asarray(rgb))


def array_to_pixels(pixels: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) uint8, contiguous (a copy: PIL and PyAV arrays are read-only or reused)."""
    return torch.tensor(pixels).permute(2, 0, 1).contiguous()


def image_to_tensor(image: Image.Image, size: int) -> torch.Tensor:
    """PIL image -> (3, size, size) normalised float32."""
    return normalize(image_to_pixels(image, size))


def array_to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 at model size -> (3, H, W) normalised float32."""
    return normalize(array_to_pixels(pixels))


@functools.cache
def _clip_stats(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(3, 1, 1) CLIP mean and std on `device`, made once per device (no host->device copy per batch)."""
    return (torch.tensor(CLIP_MEAN, device=device).view(3, 1, 1),
            torch.tensor(CLIP_STD, device=device).view(3, 1, 1))


def normalize(pixels: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """(..., 3, H, W) uint8 RGB -> normalised: /255, minus the CLIP mean, over the CLIP std, on `pixels`'
    device. The one place this arithmetic is written (host preprocessing and the vision stage both call it).
    Computed in float32 then cast to `dtype` (None: float32), so a uint8 batch normalised on the device
    equals, bit for bit, frames normalised on the host in float32 and then cast, whatever the dtype."""
    mean, std = _clip_stats(pixels.device)
    x = (pixels.float().div_(255.0) - mean) / std  # (..., 3, H, W) float32
    return x if dtype is None or dtype == x.dtype else x.to(dtype)


def preprocessor_config(size: int) -> dict[str, Any]:
    """transformers' BlipImageProcessor settings for what `image_to_tensor(image, size)` does."""
    return {
        "image_processor_type": "BlipImageProcessor",
        "processor_class": "BlipProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"height": size, "width": size},
        "resample": int(Image.Resampling.BICUBIC),
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(CLIP_MEAN),
        "image_std": list(CLIP_STD),
    }


def write_preprocessor_config(folder: str | Path, size: int) -> None:
    """Write `preprocessor_config.json` for a backbone whose images are `size` pixels square."""
    text = json.dumps(preprocessor_config(size), indent=2, sort_keys=True) + "\n"
    (Path(folder) / PREPROCESSOR_CONFIG).write_text(text)
