"""Uploads to model inputs: an image or a clip decoded and resized in worker threads (never on the event
loop or the model thread), each holding its pixels of the decode budget until it is at model size. The
inputs carry uint8 RGB (a quarter of float32's bytes to a Ray replica and over the bus): the vision stage
normalises on the device."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass

import torch
from starlette.concurrency import run_in_threadpool

from uniadapter_serve.adapters.format import AdapterSetMeta
from uniadapter_serve.model.media.budget import DecodeBudget
from uniadapter_serve.model.media.image import load_image, probe_image
from uniadapter_serve.model.media.video import MomentDecoder, decode_video, probe_video
from uniadapter_serve.model.preprocess import image_to_pixels
from uniadapter_serve.service import timing
from uniadapter_serve.service.metrics import ServiceMetrics
from uniadapter_serve.service.settings import Settings
from uniadapter_serve.service.tasks import Deadline, VisionInput, frames_for

MOMENT_CHUNK = 16
"""windows a moment decode hands over at once (what it holds at model size)"""


class VisionDecoder:
    def __init__(self, settings: Settings, image_size: int, budget: DecodeBudget | None = None) -> None:
        self.settings = settings
        self.image_size = image_size
        """the side images and frames are resized to (the engine's)"""
        # Bulk work yields to task decodes for as long as a task decode may wait at all.
        self.budget = budget or DecodeBudget(settings.decode_budget_pixels, bulk_share=settings.decode_bulk_share,
                                             bulk_patience=settings.decode_wait_s)

    def export(self, metrics: ServiceMetrics) -> VisionDecoder:
        """Show the budget's state in `metrics` (read at each scrape)."""
        budget, m = self.budget, metrics
        m.decode_pixels.collect_from(lambda: [({}, float(budget.used))])
        m.decode_waits.collect_from(lambda: [({"outcome": "waited"}, float(budget.waited)),
                                             ({"outcome": "timed_out"}, float(budget.timeouts))])

        def by_class(field: str) -> list[tuple[dict[str, str], float]]:
            values: dict[str, int] = getattr(budget.state(), field)
            return [({"class": cls}, float(n)) for cls, n in values.items()]

        m.decode_class_pixels.collect_from(lambda: by_class("held"))
        m.decode_waiting.collect_from(lambda: by_class("waiting"))
        m.decode_class_waits.collect_from(lambda: by_class("waited"))
        return self

    def hold(self, pixels: int, field: str, *, bulk: bool = False,
             deadline: Deadline | None = None) -> AbstractAsyncContextManager[None]:
        """Hold `pixels` of the decode budget. A task decode (bulk=False) waits DECODE_WAIT_S at most, never past
        the request's `deadline` (503 after); bulk work (collection adds, re-indexing, thumbnails) waits up to the
        `deadline` (None: a request's time from now; 504 after), within DECODE_BULK_SHARE of the budget."""
        s = self.settings
        waits = s.request_timeout_s if deadline is None else deadline.remaining()
        timeout = waits if bulk else min(s.decode_wait_s, waits)
        return self.budget.hold_async(pixels, timeout, field, bulk=bulk)

    async def image_input(self, data: bytes, content_type: str | None, field: str, *, bulk: bool = False,
                          deadline: Deadline | None = None) -> VisionInput:
        """Decode + preprocess in a worker thread, holding the image's pixels of the budget."""
        s, size = self.settings, self.image_size
        with timing.span("decode"):
            probe = await run_in_threadpool(probe_image, data, declared_type=content_type,
                                            max_bytes=s.max_image_bytes, max_pixels=s.max_image_pixels, field=field,
                                            target_size=size)

            def work() -> VisionInput:
                return VisionInput(image_to_pixels(load_image(probe, size), size)[None])  # (1, 3, S, S) uint8

            async with self.hold(probe.pixels, field, bulk=bulk, deadline=deadline):
                return await run_in_threadpool(work)

    async def video_input(self, data: bytes, num_frames: int, field: str, *, bulk: bool = False,
                          deadline: Deadline | None = None, span: tuple[float, float] | None = None,
                          long: bool = False) -> VisionInput:
        """Sample and preprocess `num_frames` frames (of the whole video, or of `span`) in a worker thread,
        holding the decode budget. long=True: a moment collection's video (its own, larger limits)."""
        s = self.settings
        max_bytes, max_seconds = self.video_limits(long)
        with timing.span("decode"):
            pixels = await run_in_threadpool(probe_video, data, max_bytes=max_bytes,
                                             max_pixels=s.max_video_pixels, field=field)
            async with self.hold(pixels, field, bulk=bulk, deadline=deadline):
                frames = await run_in_threadpool(decode_video, data, num_frames=num_frames, size=self.image_size,
                                                 max_bytes=max_bytes, max_seconds=max_seconds,
                                                 max_pixels=s.max_video_pixels, field=field, normalised=False,
                                                 span=span)
        return VisionInput(frames, video=True)  # (T, 3, S, S) uint8

    def video_limits(self, long: bool) -> tuple[int, float]:
        """(max bytes, max seconds) of a video: a moment collection's (long) or any other."""
        s = self.settings
        if long:
            return s.max_moment_video_bytes, s.max_moment_video_seconds
        return s.max_video_bytes, s.max_video_seconds

    async def media_input(self, kind: str, data: bytes, meta: AdapterSetMeta | None, field: str, *,
                          bulk: bool = False, deadline: Deadline | None = None,
                          span: tuple[float, float] | None = None, long: bool = False) -> VisionInput:
        """An image, or a clip (or a moment of a video: `span`) sampled at the set's frame count. bulk=True:
        collection work, which waits its turn for the decode budget up to the deadline and leaves task routes
        their share (`hold`)."""
        if kind == "image":
            return await self.image_input(data, None, field, bulk=bulk, deadline=deadline)
        frames = frames_for(meta, None, self.settings.num_frames)
        return await self.video_input(data, frames, field, bulk=bulk, deadline=deadline, span=span, long=long)

    @contextlib.asynccontextmanager
    async def moments(self, data: bytes, num_frames: int, field: str, *, deadline: Deadline,
                      spans: list[tuple[float, float]] | None = None, window_s: float | None = None,
                      stride_s: float | None = None, chunk: int = MOMENT_CHUNK) -> AsyncIterator[Moments]:
        """A moment collection's video, cut into windows (planned from its duration, or the `spans` stored with it)
        and decoded in one streaming pass, `chunk` windows at a time, in worker threads: bulk work, holding the
        decoder's frames plus one chunk at model size of the budget for the whole pass."""
        s = self.settings
        max_bytes, max_seconds = self.video_limits(True)
        pixels = await run_in_threadpool(probe_video, data, max_bytes=max_bytes, max_pixels=s.max_video_pixels,
                                         field=field)
        pixels += chunk * num_frames * self.image_size ** 2
        async with self.hold(pixels, field, bulk=True, deadline=deadline):
            decoder = await run_in_threadpool(
                MomentDecoder, data, num_frames=num_frames, size=self.image_size, max_bytes=max_bytes,
                max_seconds=max_seconds, max_pixels=s.max_video_pixels, spans=spans, window_s=window_s,
                stride_s=stride_s, field=field, timeout_s=max(1.0, deadline.remaining()))
            with decoder:
                moments = Moments(list(decoder.spans), decoder.chunks(chunk))
                try:
                    yield moments
                finally:
                    await moments.settle()  # no worker thread still reads the container it closes



@dataclass
class Moments:
    """A video's moments being decoded: their spans (known before any frame is decoded), then their clips."""

    spans: list[tuple[float, float]]
    _chunks: Iterator[torch.Tensor]
    _pending: asyncio.Future[torch.Tensor | None] | None = None

    def _next(self) -> asyncio.Future[torch.Tensor | None]:
        self._pending = asyncio.ensure_future(run_in_threadpool(next, self._chunks, None))
        return self._pending

    async def clips(self) -> AsyncIterator[list[VisionInput]]:
        """Each chunk of consecutive windows as clips, in order; the next chunk decodes (in a worker thread)
        while the caller embeds this one."""
        pending = self._next()
        while True:
            frames = await pending
            if frames is None:
                return
            pending = self._next()
            yield [VisionInput(f, video=True) for f in frames]  # each (T, 3, S, S) uint8

    async def settle(self) -> None:
        """Wait for a chunk still being decoded (its result or error is dropped)."""
        if self._pending is not None:
            with contextlib.suppress(BaseException):
                await asyncio.shield(self._pending)
