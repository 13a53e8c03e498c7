"""Uploads to model inputs: an image or a clip decoded and resized in worker threads (never on the event
loop or the model thread), each holding its pixels of the decode budget until it is at model size. The
inputs carry uint8 RGB (a quarter of float32's bytes to a Ray replica and over the bus): the vision stage
normalises on the device."""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager

from starlette.concurrency import run_in_threadpool

from uniadapter_serve.adapters.format import AdapterSetMeta
from uniadapter_serve.model.media.budget import DecodeBudget
from uniadapter_serve.model.media.image import load_image, probe_image
from uniadapter_serve.model.media.video import decode_video, probe_video
from uniadapter_serve.model.preprocess import image_to_pixels
from uniadapter_serve.service import timing
from uniadapter_serve.service.metrics import ServiceMetrics
from uniadapter_serve.service.settings import Settings
from uniadapter_serve.service.tasks import Deadline, VisionInput, frames_for


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
                          deadline: Deadline | None = None) -> VisionInput:
        """Sample and preprocess `num_frames` frames in a worker thread, holding the decode budget."""
        s = self.settings
        with timing.span("decode"):
            pixels = await run_in_threadpool(probe_video, data, max_bytes=s.max_video_bytes,
                                             max_pixels=s.max_video_pixels, field=field)
            async with self.hold(pixels, field, bulk=bulk, deadline=deadline):
                frames = await run_in_threadpool(decode_video, data, num_frames=num_frames, size=self.image_size,
                                                 max_bytes=s.max_video_bytes, max_seconds=s.max_video_seconds,
                                                 max_pixels=s.max_video_pixels, field=field, normalised=False)
        return VisionInput(frames, video=True)  # (T, 3, S, S) uint8

    async def media_input(self, kind: str, data: bytes, meta: AdapterSetMeta | None, field: str, *,
                          bulk: bool = False, deadline: Deadline | None = None) -> VisionInput:
        """An image, or a clip sampled at the set's frame count. bulk=True: collection work, which waits its turn
        for the decode budget up to the deadline and leaves task routes their share (`hold`)."""
        if kind == "image":
            return await self.image_input(data, None, field, bulk=bulk, deadline=deadline)
        frames = frames_for(meta, None, self.settings.num_frames)
        return await self.video_input(data, frames, field, bulk=bulk, deadline=deadline)
