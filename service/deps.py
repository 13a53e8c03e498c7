"""FastAPI dependencies: each route asks for the parts it uses, by type (`EngineDep`, `CollectionsDep`, ...).
The parts are built in the app's lifespan (`parts.build_parts`) and kept on `app.state.parts`. Every dependency
is `async def`: FastAPI runs a plain `def` dependency in its thread pool, one thread hop per dependency per
request."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from uniadapter_serve.adapters.registry import AdapterRegistry
from uniadapter_serve.service.collections.index import FaissDevice
from uniadapter_serve.service.collections.manager import CollectionManager
from uniadapter_serve.service.collections.store import StoreBackend
from uniadapter_serve.service.decoding import VisionDecoder
from uniadapter_serve.service.engine import Engine
from uniadapter_serve.service.metrics import ServiceMetrics
from uniadapter_serve.service.redis_glue import EventBus, RedisLink
from uniadapter_serve.service.resolver import AdapterResolver
from uniadapter_serve.service.settings import Settings
from uniadapter_serve.service.tasks import Deadline


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.parts.settings
    return settings


async def get_metrics(request: Request) -> ServiceMetrics:
    metrics: ServiceMetrics = request.app.state.parts.metrics
    return metrics


async def get_registry(request: Request) -> AdapterRegistry:
    registry: AdapterRegistry = request.app.state.parts.registry
    return registry


async def get_adapters(request: Request) -> AdapterResolver:
    adapters: AdapterResolver = request.app.state.parts.adapters
    return adapters


async def get_engine(request: Request) -> Engine:
    engine: Engine = request.app.state.parts.engine
    return engine


async def get_decoder(request: Request) -> VisionDecoder:
    decoder: VisionDecoder = request.app.state.parts.decoder
    return decoder


async def get_collections(request: Request) -> CollectionManager:
    collections: CollectionManager = request.app.state.parts.collections
    return collections


async def get_events(request: Request) -> EventBus:
    events: EventBus = request.app.state.parts.events
    return events


async def get_redis(request: Request) -> RedisLink:
    redis: RedisLink = request.app.state.parts.redis
    return redis


async def get_store(request: Request) -> StoreBackend:
    store: StoreBackend = request.app.state.parts.store
    return store


async def get_faiss(request: Request) -> FaissDevice:
    device: FaissDevice = request.app.state.parts.faiss
    return device


async def request_deadline(request: Request) -> Deadline:
    """The request's one deadline, REQUEST_TIMEOUT_S from its admission: every step of it spends from this."""
    return Deadline.after(request.app.state.parts.settings.request_timeout_s)


async def is_serving(request: Request) -> bool:
    """Started and not stopping."""
    return bool(request.app.state.parts.ready)


SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[ServiceMetrics, Depends(get_metrics)]
RegistryDep = Annotated[AdapterRegistry, Depends(get_registry)]
AdaptersDep = Annotated[AdapterResolver, Depends(get_adapters)]
EngineDep = Annotated[Engine, Depends(get_engine)]
DecoderDep = Annotated[VisionDecoder, Depends(get_decoder)]
CollectionsDep = Annotated[CollectionManager, Depends(get_collections)]
EventsDep = Annotated[EventBus, Depends(get_events)]
RedisDep = Annotated[RedisLink, Depends(get_redis)]
StoreDep = Annotated[StoreBackend, Depends(get_store)]
FaissDep = Annotated[FaissDevice, Depends(get_faiss)]
ServingDep = Annotated[bool, Depends(is_serving)]
DeadlineDep = Annotated[Deadline, Depends(request_deadline)]
