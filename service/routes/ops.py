"""Health, readiness and Prometheus metrics."""

from __future__ import annotations

from typing import Any

import torch
from fastapi import APIRouter
from fastapi.responses import JSONResponse, PlainTextResponse

from uniadapter_serve import __version__
from uniadapter_serve.service.auth import CoreDep

router = APIRouter(tags=["ops"])


@router.get("/healthz", summary="The process is up")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Backbone loaded, batcher running, adapter root readable")
def readyz(core: CoreDep) -> JSONResponse:
    checks: dict[str, Any] = {
        "backbone": {"source": core.settings.backbone, "components": list(core.backbone.components),
                     "fingerprints": core.backbone.fingerprints, "device": str(core.backbone.device),
                     "dtype": str(core.backbone.dtype).removeprefix("torch.")},
        "adapters": {"available": len(core.registry.all()), "resident": core.manager.resident(),
                     "errors": len(core.registry.errors())},
        "queue": core.batcher.queued(),
        "collections": len(core.collections.names()),
        "redis": core.redis.status(),
    }
    ready = core.ready
    warnings = []
    if checks["redis"].get("configured") and not checks["redis"].get("ok"):
        warnings.append("redis unreachable: using the in-process embedding cache; replicas learn of changes "
                        "on their next read")
    body = {"status": "ready" if ready else "not ready", "version": __version__, "torch": torch.__version__,
            "checks": checks, "warnings": warnings}
    return JSONResponse(body, status_code=200 if ready else 503)


@router.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics")
def metrics(core: CoreDep) -> PlainTextResponse:
    return PlainTextResponse(core.metrics.render(), media_type="text/plain; version=0.0.4")
