"""The FastAPI application, built in `lifespan` from `Settings`."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request

from uniadapter_serve import __version__
from uniadapter_serve.adapters.format import CONFIG_FILE
from uniadapter_serve.adapters.inspect import inspect_adapter_set
from uniadapter_serve.errors import AdapterError
from uniadapter_serve.model.backbone import BlipBackbone
from uniadapter_serve.model.loading import load_backbone
from uniadapter_serve.service.runtime import resolve_device, resolve_dtype
from uniadapter_serve.service.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class AppState:
    settings: Settings
    backbone: BlipBackbone


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        device = resolve_device(settings.device)
        dtype = resolve_dtype(settings.dtype, device)
        backbone = load_backbone(settings.backbone, device=device, dtype=dtype)
        log.info("backbone %s loaded on %s/%s: %s", settings.backbone, device, dtype, backbone.fingerprints)
        app.state.core = AppState(settings=settings, backbone=backbone)
        yield

    app = FastAPI(title="UniAdapter Serve", version=__version__, lifespan=lifespan)

    @app.get("/healthz", tags=["ops"])
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"])
    def readyz(request: Request) -> dict[str, Any]:
        core: AppState = request.app.state.core
        return {
            "status": "ready",
            "backbone": {"source": core.settings.backbone, "components": list(core.backbone.components),
                         "fingerprints": core.backbone.fingerprints, "device": str(core.backbone.device),
                         "dtype": str(core.backbone.dtype).removeprefix("torch.")},
            "torch": torch.__version__,
        }

    @app.get("/adapters", tags=["adapters"])
    def list_adapters(request: Request) -> list[dict[str, Any]]:
        core: AppState = request.app.state.core
        return _available(core.settings.adapters_root, core.backbone)

    return app


def _available(root: Path | None, backbone: BlipBackbone) -> list[dict[str, Any]]:
    if root is None or not root.is_dir():
        return []
    reports = []
    for config in sorted(root.glob(f"**/{CONFIG_FILE}")):
        try:
            reports.append(inspect_adapter_set(config.parent, backbone))
        except AdapterError as e:
            reports.append({"path": str(config.parent), "error": str(e)})
    return reports
