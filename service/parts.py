"""The service's parts, each built once (in the app's lifespan, or by `uniadapter index add`) and handed to
what uses it: settings, metrics, the adapter registry and the resolver of request names, the engine that runs
the model, the vision decoder with its decode budget, Redis (embedding cache, events between replicas), the
FAISS device, the collection store and the collections. Routes reach them through `deps.py`; no part is
given this container."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from uniadapter_serve.adapters.registry import AdapterRegistry
from uniadapter_serve.service import demo
from uniadapter_serve.service.collections import faiss_device
from uniadapter_serve.service.collections.backends import open_backend
from uniadapter_serve.service.collections.index import FaissDevice
from uniadapter_serve.service.collections.manager import CollectionManager
from uniadapter_serve.service.collections.store import StoreBackend
from uniadapter_serve.service.decoding import VisionDecoder
from uniadapter_serve.service.engine import Engine
from uniadapter_serve.service.metrics import ServiceMetrics
from uniadapter_serve.service.redis_glue import EmbeddingCache, EventBus, RedisLink
from uniadapter_serve.service.resolver import AdapterResolver
from uniadapter_serve.service.runtime import resolve_device
from uniadapter_serve.service.settings import Settings
from uniadapter_serve.service.tasks import TASK_KINDS

log = logging.getLogger(__name__)

EngineFactory = Callable[[Settings, AdapterRegistry, ServiceMetrics], Engine]


@dataclass
class Parts:
    settings: Settings
    metrics: ServiceMetrics
    registry: AdapterRegistry
    adapters: AdapterResolver
    engine: Engine
    decoder: VisionDecoder
    redis: RedisLink
    cache: EmbeddingCache
    events: EventBus
    faiss: FaissDevice
    store: StoreBackend
    collections: CollectionManager
    demo: bool
    """serving the shipped demo (its sets are the defaults; its collections are made at start)"""
    ready: bool = False
    """started and not stopping: /readyz and the Ray health check read it"""

    def start(self) -> None:
        self.engine.start()
        self.events.start()
        self.ready = True
        log.info("serving %s", self.settings.backbone)

    def stop(self, drain_timeout: float = 30.0) -> None:
        self.ready = False
        self.engine.stop(drain_timeout)
        self.collections.close()
        self.store.close()
        self.faiss.close()
        self.events.stop()
        self.redis.close()


def build_parts(settings: Settings, metrics: ServiceMetrics, engine: EngineFactory) -> Parts:
    """Every part, in the order they need each other (the engine loads the backbone: seconds)."""
    registry = AdapterRegistry(settings.adapters_dir)
    registry.refresh()
    on_demo = demo.enabled(settings)
    defaults: dict[str, str | None] = {task: getattr(settings, f"default_{task}_adapter") for task in TASK_KINDS}
    if on_demo:
        for task, name in demo.install_sets(registry).items():
            defaults[task] = defaults[task] or name
    adapters = AdapterResolver(registry, defaults)
    model = engine(settings, registry, metrics)
    decoder = VisionDecoder(settings, model.image_size).export(metrics)
    redis = RedisLink(settings.redis_url, socket_timeout=settings.redis_timeout_s)
    cache = EmbeddingCache(redis)
    events = EventBus(redis, _ignore)
    device = faiss_device.choose(settings.faiss_device, resolve_device(settings.device))
    store = open_backend(settings)
    collections = CollectionManager(store, settings.media_dir, settings=settings, engine=model, adapters=adapters,
                                    decoder=decoder, cache=cache, events=events, metrics=metrics, device=device)
    events.handler = partial(on_event, registry, collections)
    return Parts(settings, metrics, registry, adapters, model, decoder, redis, cache, events, device, store,
                 collections, on_demo)


def _ignore(event: dict[str, Any]) -> None:
    """No event is listened to before every part exists."""


def on_event(registry: AdapterRegistry, collections: CollectionManager, event: dict[str, Any]) -> None:
    """Another replica changed shared state."""
    if event.get("type") == "adapter":
        registry.refresh()
    elif event.get("type") == "collection":
        name = event.get("name")
        collections.on_store_change(name if isinstance(name, str) else "")
