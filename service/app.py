"""The FastAPI application, built in `lifespan` from `Settings`."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from starlette.concurrency import run_in_threadpool

from uniadapter_serve import __version__
from uniadapter_serve.service import demo, docs, errors
from uniadapter_serve.service.auth import AuthMiddleware, log_key_settings
from uniadapter_serve.service.bodies import BODY_MODELS
from uniadapter_serve.service.body_budget import BodyBudget
from uniadapter_serve.service.metrics import ServiceMetrics
from uniadapter_serve.service.middleware import BodyBudgetMiddleware, BodyLimitMiddleware, MetricsMiddleware
from uniadapter_serve.service.parts import EngineFactory, Parts, build_parts
from uniadapter_serve.service.routes import adapters, collections, items, ops, tasks, web
from uniadapter_serve.service.schemas import apply_limits
from uniadapter_serve.service.security import SecurityHeadersMiddleware
from uniadapter_serve.service.server_limits import ConnectionGate
from uniadapter_serve.service.settings import MB, Settings

if TYPE_CHECKING:
    from uniadapter_serve.adapters.registry import AdapterRegistry
    from uniadapter_serve.service.engine import Engine

log = logging.getLogger(__name__)

DESCRIPTION = """
One frozen BLIP backbone, many UniAdapter sets swapped per request and mixed in one batch.

Task routes take **JSON** (media as base64) or **multipart/form-data** (media as files: pick
`multipart/form-data` in "Try it out" to get a file picker). Every answer names the exact adapter
set (`name@version`) that produced it.
"""


def local_engine(settings: Settings, registry: AdapterRegistry, metrics: ServiceMetrics) -> Engine:
    """The default engine: the backbone in this process."""
    from uniadapter_serve.service.local_engine import LocalEngine

    return LocalEngine(settings, registry, metrics)


def create_app(settings: Settings | None = None, engine: EngineFactory = local_engine) -> FastAPI:
    """Build the app. Its parts (`parts.Parts`: the engine with the backbone, in-process by default, the
    collections, ...) are built and started in the lifespan, on `app.state.parts`."""
    settings = settings or Settings()
    metrics = ServiceMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        parts: Parts = await run_in_threadpool(build_parts, settings, metrics, engine)
        app.state.parts = parts
        parts.start()
        if parts.demo:
            try:
                await demo.ensure_collections(parts.collections, parts.registry, settings.media_dir)
            except Exception:  # the demo is a convenience: never a reason not to serve
                log.exception("could not create the demo collections")
        try:
            yield
        finally:
            await run_in_threadpool(parts.stop)

    app = FastAPI(title="UniAdapter Serve", version=__version__, description=DESCRIPTION, lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    docs.install(app)
    app.include_router(tasks.router)
    app.include_router(adapters.router)
    app.include_router(collections.router)
    app.include_router(items.router)
    app.include_router(ops.router)
    app.include_router(web.router)
    app.mount("/static", web.static_files(), name="static")
    errors.install(app)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in BODY_MODELS:
                model_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(model_schema.pop("$defs", {}))
                components[model.__name__] = model_schema
            apply_limits(schema, settings)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    # Starlette: the middleware added LAST runs FIRST. From the outside in: metrics (every answer counted),
    # security headers (on every answer, auth refusals included), auth (keys, Origin/Host: from the headers,
    # before any body byte is read), then body limits. Body-reading middleware goes above the AuthMiddleware line.
    # Body budget (bytes of bodies in flight, all requests): innermost, it charges only when a route reads its
    # body, so auth's refusals and BodyLimitMiddleware's 413 by Content-Length never read or charge one.
    app.add_middleware(BodyBudgetMiddleware, budget=BodyBudget(round(settings.body_budget_mb * MB)).watch(metrics),
                       wait_s=settings.body_wait_s)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_request_bytes)
    app.add_middleware(AuthMiddleware, routes=app.router.routes, settings=settings)
    app.add_middleware(SecurityHeadersMiddleware)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    log_key_settings(settings)
    # connection caps and read timeouts live in the uvicorn protocol (cli.py); their counts show in /metrics
    app.state.connection_gate = ConnectionGate.from_settings(settings).watch(metrics)
    return app
