"""Image decoding that reduces as early as the format allows, and the decode budget that bounds the
pixels all decodes hold at once."""

from __future__ import annotations

import asyncio
import io
import threading
import time

import numpy as np
import pytest
from PIL import Image

from uniadapter_serve.errors import MediaTooLargeError, ServerBusyError
from uniadapter_serve.model.media.budget import DecodeBudget
from uniadapter_serve.model.media.image import decode_image, load_image, probe_image
from uniadapter_serve.model.preprocess import image_to_tensor

LIMITS = {"declared_type": None, "max_bytes": 50_000_000, "max_pixels": 100_000_000}


def encoded(image: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth gradients plus low-frequency noise: what downscaling filters disagree on least."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x / width * 255, y / height * 255, (x + y) / (width + height) * 255], axis=-1)
    coarse = rng.normal(0, 20, (height // 64 + 1, width // 64 + 1, 3)).repeat(64, 0).repeat(64, 1)[:height, :width]
    return Image.fromarray(np.clip(base + coarse, 0, 255).astype(np.uint8))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_large_images_are_reduced_yet_preprocess_like_a_full_decode(fmt):
    image = photo(2048, 1536)
    data = encoded(image, fmt, quality=95) if fmt != "PNG" else encoded(image, fmt)
    probe = probe_image(data, field="image", target_size=64, **LIMITS)
    if fmt == "JPEG":
        assert probe.pixels == 256 * 192  # DCT draft: decoded straight at 1/8 scale
    else:
        assert probe.pixels == 2048 * 1536  # decoded whole (no draft for these formats) ...
    loaded = load_image(probe, 64)
    assert min(loaded.size) >= 128 and loaded.size[0] < 2048  # ... then reduced before any conversion
    full = Image.open(io.BytesIO(data)).convert("RGB")
    reference = image_to_tensor(full, 64)
    assert (image_to_tensor(loaded, 64) - reference).abs().mean() < 0.02  # in normalised units (std ~1)


def test_small_images_and_other_modes_decode_as_before():
    for mode, colour in (("RGB", (200, 10, 30)), ("L", 128), ("P", 3), ("RGBA", (10, 200, 30, 128)), ("1", 1)):
        data = encoded(Image.new(mode, (40, 30), colour), "PNG")
        got = decode_image(data, target_size=64, **LIMITS)
        want = Image.open(io.BytesIO(data)).convert("RGB")
        assert got.mode == "RGB" and got.size == (40, 30)
        assert np.array_equal(np.asarray(got), np.asarray(want)), mode


def test_palette_images_are_reduced_after_conversion():
    image = photo(1024, 1024).convert("P", palette=Image.Palette.ADAPTIVE)
    got = decode_image(encoded(image, "PNG"), target_size=32, **LIMITS)
    assert got.mode == "RGB" and got.size == (64, 64)


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.001)


def test_budget_serves_waiters_first_come_first_served():
    budget = DecodeBudget(100)
    order: list[str] = []
    budget.acquire(80, 1.0)

    def take(name: str, pixels: int) -> None:
        budget.acquire(pixels, 10.0)
        order.append(name)
        budget.release(pixels)

    big = threading.Thread(target=take, args=("big", 95))  # big and small never fit together: a strict order
    big.start()
    wait_for(lambda: budget.waiting == 1)
    small = threading.Thread(target=take, args=("small", 10))  # would fit now, but the big one waits ahead
    small.start()
    wait_for(lambda: budget.waiting == 2)
    assert order == [] and budget.used == 80
    budget.release(80)
    big.join(10)
    small.join(10)
    assert order == ["big", "small"] and budget.used == 0 and budget.waited == 2


def test_budget_refuses_what_can_never_fit_and_times_out_with_nothing_taken():
    budget = DecodeBudget(100)
    with pytest.raises(MediaTooLargeError, match="over the decode budget"):
        budget.acquire(101, 1.0, "image")
    budget.acquire(60, 1.0)
    with pytest.raises(ServerBusyError, match="decode budget") as busy:
        budget.acquire(50, 0.05, "image")
    assert busy.value.retry_after >= 1
    assert budget.used == 60 and budget.waiting == 0 and budget.timeouts == 1
    with budget.hold(40, 0.0):  # what timed out took nothing: the rest still fits
        assert budget.used == 100
    assert budget.used == 60


def test_async_waiters_hold_no_thread_and_leave_cleanly_when_cancelled():
    budget = DecodeBudget(10)

    async def main() -> list[str]:
        got: list[str] = []
        budget.acquire(10, 0.0)

        async def take(name: str) -> None:
            async with budget.hold_async(6, 10.0):
                got.append(name)

        first = asyncio.ensure_future(take("first"))
        cancelled = asyncio.ensure_future(take("cancelled"))
        last = asyncio.ensure_future(take("last"))
        await asyncio.sleep(0)
        assert budget.waiting == 3
        cancelled.cancel()
        await asyncio.gather(cancelled, return_exceptions=True)
        assert budget.waiting == 2
        await asyncio.get_running_loop().run_in_executor(None, budget.release, 10)  # released from a thread
        await asyncio.gather(first, last)
        return got

    assert asyncio.run(main()) == ["first", "last"]
    assert budget.used == 0 and budget.waiting == 0
