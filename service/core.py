"""Everything the routes need, built once in the app's lifespan: settings, the adapter registry, media
decoding under the decode budget, collections, Redis, metrics, and the engine that runs the model
(in-process by default; handles to a Ray Serve model deployment in a cluster)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

from starlette.concurrency import run_in_threadpool

from uniadapter_serve.adapters.format import AdapterSetMeta
from uniadapter_serve.adapters.registry import AdapterRegistry
from uniadapter_serve.errors import ConflictError, InputError, TextTooLongError
from uniadapter_serve.model.media.budget import DecodeBudget
from uniadapter_serve.model.media.image import load_image, probe_image
from uniadapter_serve.model.media.video import decode_video, probe_video
from uniadapter_serve.model.preprocess import image_to_tensor
from uniadapter_serve.model.tokenizer import clean_text
from uniadapter_serve.service import demo, timing
from uniadapter_serve.service.collections import faiss_device
from uniadapter_serve.service.collections.backends import open_backend
from uniadapter_serve.service.collections.manager import CollectionManager
from uniadapter_serve.service.engine import Engine
from uniadapter_serve.service.metrics import ServiceMetrics
from uniadapter_serve.service.redis_glue import EmbeddingCache, EventBus, RedisLink
from uniadapter_serve.service.runtime import resolve_device
from uniadapter_serve.service.settings import Settings
from uniadapter_serve.service.stages import VisionInput

log = logging.getLogger(__name__)

TASK_KINDS = {"retrieval": ("retrieval",), "vqa": ("vqa", "videoqa"), "videoqa": ("videoqa", "vqa")}
QUESTION_WORDS = 50

EngineFactory = Callable[[Settings, AdapterRegistry, ServiceMetrics], Engine]


def local_engine(settings: Settings, registry: AdapterRegistry, metrics: ServiceMetrics) -> Engine:
    from uniadapter_serve.service.local_engine import LocalEngine

    return LocalEngine(settings, registry, metrics)


class ServiceCore:
    def __init__(self, settings: Settings, metrics: ServiceMetrics | None = None,
                 engine: EngineFactory = local_engine) -> None:
        self.settings = settings
        self.metrics = metrics or ServiceMetrics()
        self.registry = AdapterRegistry(settings.adapters_dir)
        self.registry.refresh()
        self.demo = demo.enabled(settings)
        self.default_adapters: dict[str, str | None] = {
            task: getattr(settings, f"default_{task}_adapter") for task in TASK_KINDS}
        if self.demo:
            for task, name in demo.install_sets(self.registry).items():
                self.default_adapters[task] = self.default_adapters[task] or name
        self.engine = engine(settings, self.registry, self.metrics)
        self.image_size = self.engine.image_size
        # Bulk work yields to task decodes for as long as a task decode may wait at all.
        self.decode_budget = DecodeBudget(settings.decode_budget_pixels, bulk_share=settings.decode_bulk_share,
                                          bulk_patience=settings.decode_wait_s)
        self._export_decode_budget()
        self.redis = RedisLink(settings.redis_url, socket_timeout=settings.redis_timeout_s)
        self.cache = EmbeddingCache(self.redis)
        self.events = EventBus(self.redis, self._on_event)
        self.faiss = faiss_device.choose(settings.faiss_device, resolve_device(settings.device))
        self.store_backend = open_backend(settings)
        self.collections = CollectionManager(self.store_backend, settings.media_dir, self)
        self.ready = False

    def _export_decode_budget(self) -> None:
        budget, m = self.decode_budget, self.metrics
        m.decode_pixels.collect_from(lambda: [({}, float(budget.used))])
        m.decode_waits.collect_from(lambda: [({"outcome": "waited"}, float(budget.waited)),
                                             ({"outcome": "timed_out"}, float(budget.timeouts))])

        def by_class(field: str) -> list[tuple[dict[str, str], float]]:
            values: dict[str, int] = getattr(budget.state(), field)
            return [({"class": cls}, float(n)) for cls, n in values.items()]

        m.decode_class_pixels.collect_from(lambda: by_class("held"))
        m.decode_waiting.collect_from(lambda: by_class("waiting"))
        m.decode_class_waits.collect_from(lambda: by_class("waited"))

    def start(self) -> None:
        self.engine.start()
        self.events.start()
        self.ready = True
        log.info("serving %s", self.settings.backbone)

    def stop(self, drain_timeout: float = 30.0) -> None:
        self.ready = False
        self.engine.stop(drain_timeout)
        self.collections.close()
        self.store_backend.close()
        self.faiss.close()
        self.events.stop()
        self.redis.close()

    def _on_event(self, event: dict[str, object]) -> None:
        """Another replica changed shared state."""
        if event.get("type") == "adapter":
            self.registry.refresh()
        elif event.get("type") == "collection":
            name = event.get("name")
            self.collections.on_store_change(name if isinstance(name, str) else "")

    # -- adapters --------------------------------------------------------------------------------

    def resolve_adapter(self, ref: str | None, task: str) -> AdapterSetMeta | None:
        """The set a request names (or the task's default); None = bare backbone."""
        if ref is None:
            ref = self.default_adapters[task]
        if ref is None or ref in ("none", "bare"):
            return None
        meta = self.registry.resolve(ref)
        if meta.config.task not in TASK_KINDS[task]:
            raise ConflictError(f"adapter set {meta.ref} is a {meta.config.task} set; /{task} needs a "
                                f"{' or '.join(TASK_KINDS[task])} set")
        return meta

    # -- request steps (event loop) ------------------------------------------------------------------

    def timeout(self) -> float:
        """Seconds a request may take, from now."""
        return self.settings.request_timeout_s

    def deadline(self) -> float:
        return time.monotonic() + self.settings.request_timeout_s

    def check_text(self, text: str, field: str) -> str:
        limit = self.settings.max_text_chars
        if len(text) > limit:
            raise TextTooLongError(f"{field}: {len(text)} characters is over the limit of {limit}")
        if not clean_text(text, QUESTION_WORDS):
            raise InputError(f"{field}: must contain at least one word")
        return text

    def decode_hold(self, pixels: int, field: str, *, bulk: bool = False) -> AbstractAsyncContextManager[None]:
        """Hold `pixels` of the decode budget. A task decode (bulk=False) waits DECODE_WAIT_S at most (503 after);
        bulk work (collection adds, re-indexing, thumbnails) waits up to the request deadline (504 after),
        within DECODE_BULK_SHARE of the budget."""
        timeout = self.timeout() if bulk else self.settings.decode_wait_s
        return self.decode_budget.hold_async(pixels, timeout, field, bulk=bulk)

    async def image_input(self, data: bytes, content_type: str | None, field: str, *,
                          bulk: bool = False) -> VisionInput:
        """Decode + preprocess in a worker thread (never on the event loop or the model thread), holding
        the image's pixels of the decode budget until it is at model size."""
        s, size = self.settings, self.image_size
        with timing.span("decode"):
            probe = await run_in_threadpool(probe_image, data, declared_type=content_type,
                                            max_bytes=s.max_image_bytes, max_pixels=s.max_image_pixels, field=field,
                                            target_size=size)

            def work() -> VisionInput:
                return VisionInput(image_to_tensor(load_image(probe, size), size)[None])

            async with self.decode_hold(probe.pixels, field, bulk=bulk):
                return await run_in_threadpool(work)

    async def video_input(self, data: bytes, num_frames: int, field: str, *, bulk: bool = False) -> VisionInput:
        """Sample and preprocess `num_frames` frames in a worker thread, holding the decode budget."""
        s = self.settings
        with timing.span("decode"):
            pixels = await run_in_threadpool(probe_video, data, max_bytes=s.max_video_bytes,
                                             max_pixels=s.max_video_pixels, field=field)
            async with self.decode_hold(pixels, field, bulk=bulk):
                frames = await run_in_threadpool(decode_video, data, num_frames=num_frames, size=self.image_size,
                                                 max_bytes=s.max_video_bytes, max_seconds=s.max_video_seconds,
                                                 max_pixels=s.max_video_pixels, field=field)
        return VisionInput(frames, video=True)

    async def media_input(self, kind: str, data: bytes, meta: AdapterSetMeta | None, field: str, *,
                          bulk: bool = False) -> VisionInput:
        """An image, or a clip sampled at the set's frame count. bulk=True: collection work, which waits its turn
        for the decode budget up to the request deadline and leaves task routes their share (`decode_hold`)."""
        if kind == "image":
            return await self.image_input(data, None, field, bulk=bulk)
        frames = meta.config.num_frames if meta is not None else self.settings.num_frames
        return await self.video_input(data, frames, field, bulk=bulk)
