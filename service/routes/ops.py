"""Health, readiness and Prometheus metrics."""

from __future__ import annotations

import os
from typing import Any

import torch
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST

from uniadapter_serve import __version__
from uniadapter_serve.service.auth import admin_when, check_key
from uniadapter_serve.service.deps import (
    CollectionsDep,
    DecoderDep,
    EngineDep,
    FaissDep,
    MetricsDep,
    RedisDep,
    RegistryDep,
    ServingDep,
    SettingsDep,
    StoreDep,
)

router = APIRouter(tags=["ops"])


@router.get("/healthz", summary="The process is up")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Ready to serve: backbone loaded, batcher running (503 while not)")
@admin_when("verbose")  # the auth middleware asks for the admin key before the route runs
def readyz(request: Request, settings: SettingsDep, engine: EngineDep, registry: RegistryDep, serving: ServingDep,
           redis_link: RedisDep, store_backend: StoreDep, faiss: FaissDep, decoder: DecoderDep,
           collections: CollectionsDep, verbose: bool = False) -> JSONResponse:
    """Without `verbose`: the status and the name of each check with its state, nothing more (no paths,
    hosts or versions: probes run without keys). `verbose=true` adds every detail and needs the admin key."""
    if verbose:
        check_key("admin", request)
    redis = redis_link.status()
    store = store_backend.status()
    golden = engine.verification()
    states = {
        "store": "ok" if store.get("ok") else "degraded",
        "backbone": "ok",
        "engine": "ok" if serving and engine.ready else "stopped",
        "adapters": "ok" if not registry.errors() else "degraded",
        "redis": "off" if not redis.get("configured") else ("ok" if redis.get("ok") else "degraded"),
        "faiss": "degraded" if faiss.warning else ("gpu" if faiss.on_gpu else "cpu"),
        "golden": _golden_state(golden),
    }
    warnings = []
    if states["redis"] == "degraded":
        warnings.append("redis unreachable: using the in-process embedding cache; replicas learn of changes "
                        "on their next read")
    if states["store"] == "degraded":
        warnings.append("collection store unreachable: searches answer from this replica's memory; adding, "
                        "deleting and creating answer 503 until it is back")
    if faiss.warning:
        warnings.append("collection indexes on the CPU: FAISS cannot run on this GPU" +
                        (f" ({faiss.warning})" if verbose else " (verbose=true says why)"))
    if states["golden"] == "mismatch":
        warnings.append("the backbone does not reproduce its golden record on this device and dtype: not serving"
                        + (f" ({golden['backbone']['detail']})" if verbose else " (verbose=true says why)"))
    elif states["golden"] == "degraded":
        warnings.append("some adapter sets failed their golden record and are refused (verbose=true names them)")
    if states["adapters"] == "degraded":
        warnings.append("some adapter-set folders cannot be read (GET /adapters lists them)")
    ready = serving and states["golden"] != "mismatch"
    body: dict[str, Any] = {"status": "ready" if ready else "not ready", "checks": states, "warnings": warnings}
    if verbose:
        body["version"], body["torch"] = __version__, torch.__version__
        body["details"] = {
            "backbone": {"source": settings.backbone, **engine.describe()},
            "adapters": {"available": len(registry.all()), "errors": len(registry.errors()),
                         "resident": [r["ref"] for r in engine.residency()["rows"] if r["tier"] == "device"]},
            "queue": engine.queued(),
            "decode_budget": {"capacity_pixels": decoder.budget.capacity, "used_pixels": decoder.budget.used,
                              "waiting": decoder.budget.waiting},
            "collections": len(collections.names()),
            "process": {"pid": os.getpid(), "processes": settings.processes, "torch_threads": torch.get_num_threads()},
            "faiss": {"gpu": faiss.gpu, "warning": faiss.warning},
            "golden": golden,
            "redis": redis,
            "store": store,
        }
    return JSONResponse(body, status_code=200 if ready else 503)


def _golden_state(golden: dict[str, Any]) -> str:
    """off (not checked), mismatch (the backbone failed: not ready), degraded (a set failed), ok."""
    if not golden.get("enabled"):
        return "off"
    if (golden.get("backbone") or {}).get("result") == "mismatch":
        return "mismatch"
    if any(o.get("result") == "mismatch" for o in (golden.get("sets") or {}).values()):
        return "degraded"
    return "ok"


@router.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics")
def metrics(service_metrics: MetricsDep) -> PlainTextResponse:
    return PlainTextResponse(service_metrics.render(), media_type=CONTENT_TYPE_LATEST)
