"""Adapter-set routes: list, load, unload, pin, unpin, publish (writes need the admin key)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from uniadapter_serve.adapters.format import CONFIG_FILE, WEIGHTS_FILE, AdapterSetMeta
from uniadapter_serve.adapters.format import read_adapter_meta as read_meta
from uniadapter_serve.adapters.golden import GOLDEN_FILE, MAX_RECORD_BYTES, GoldenRecord
from uniadapter_serve.adapters.registry import AdapterRegistry
from uniadapter_serve.errors import (
    AdapterFormatError,
    ConflictError,
    GoldenMismatchError,
    GoldenRecordError,
    InputError,
    MalformedUploadError,
    UnsupportedMediaTypeError,
)
from uniadapter_serve.service.auth import AdminAuth, ReadAuth
from uniadapter_serve.service.bodies import read_form
from uniadapter_serve.service.deps import EngineDep, EventsDep, RegistryDep
from uniadapter_serve.service.engine import Engine
from uniadapter_serve.service.openapi_errors import ERRORS
from uniadapter_serve.service.schemas import AdapterInfo, AdapterList

router = APIRouter(prefix="/adapters", tags=["adapters"], responses=ERRORS)


def _info(registry: AdapterRegistry, engine: Engine, meta: AdapterSetMeta, newest: bool | None = None,
          residency: dict[str, Any] | None = None) -> AdapterInfo:
    """The listing row of one set version (`newest` and residency looked up unless the caller has them)."""
    if newest is None:
        newest = registry.resolve(meta.name).ref == meta.ref
    residency = residency or engine.residency()
    rows = [r for r in residency["rows"] if r["ref"] == meta.ref]
    nbytes = next((int(str(r["bytes"])) for r in rows), meta.num_parameters * residency.get("itemsize", 4))
    return AdapterInfo(
        ref=meta.ref, name=meta.name, version=meta.version, task=meta.config.task, bottleneck=meta.config.bottleneck,
        tunable_parameters=meta.num_parameters, percent_of_backbone=round(meta.percent_of_backbone(), 3),
        bytes=nbytes, created=meta.created, published=registry.published(meta), newest=newest,
        resident=any(r["tier"] == "device" for r in rows),
        pinned=any(bool(r["pinned"]) for r in rows), tier=[str(r["tier"]) for r in rows],
        answer_list_size=len(meta.answer_list) if meta.answer_list is not None else None,
    )


@router.get("", response_model=AdapterList, dependencies=[ReadAuth], summary="Available and resident sets")
def list_adapters(registry: RegistryDep, engine: EngineDep) -> AdapterList:
    registry.refresh()
    residency = engine.residency()
    infos = []
    for name in registry.names():
        for i, meta in enumerate(registry.versions(name)):
            infos.append(_info(registry, engine, meta, newest=i == 0, residency=residency))
    return AdapterList(adapters=infos, errors=registry.errors(), device_budget_bytes=residency["device_budget"],
                       device_bytes=residency["device_bytes"], cpu_budget_bytes=residency["cpu_budget"],
                       cpu_bytes=residency["cpu_bytes"])


@router.get("/{ref}", response_model=AdapterInfo, dependencies=[ReadAuth], summary="One set (name = newest)")
def get_adapter(ref: str, registry: RegistryDep, engine: EngineDep) -> AdapterInfo:
    meta = registry.resolve(ref)
    return _info(registry, engine, meta)


@router.post("/{ref}/load", response_model=AdapterInfo, dependencies=[AdminAuth], summary="Make a set resident")
async def load(ref: str, registry: RegistryDep, engine: EngineDep) -> AdapterInfo:
    meta = registry.resolve(ref)
    await engine.load(meta.ref)
    return _info(registry, engine, meta)


@router.post("/{ref}/unload", response_model=AdapterInfo, dependencies=[AdminAuth], summary="Drop a set from memory")
async def unload(ref: str, registry: RegistryDep, engine: EngineDep) -> AdapterInfo:
    meta = registry.resolve(ref)
    await engine.unload(meta.ref)
    return _info(registry, engine, meta)


@router.post("/{ref}/pin", response_model=AdapterInfo, dependencies=[AdminAuth], summary="Load and never evict")
async def pin(ref: str, registry: RegistryDep, engine: EngineDep) -> AdapterInfo:
    meta = registry.resolve(ref)
    await engine.pin(meta.ref)
    return _info(registry, engine, meta)


@router.post("/{ref}/unpin", response_model=AdapterInfo, dependencies=[AdminAuth], summary="Allow eviction again")
async def unpin(ref: str, registry: RegistryDep, engine: EngineDep) -> AdapterInfo:
    meta = registry.resolve(ref)
    await engine.unpin(meta.ref)
    return _info(registry, engine, meta)


@router.post(
    "/{name}/publish", response_model=AdapterInfo, dependencies=[AdminAuth], status_code=201,
    summary="Publish a new version (multipart: adapter_config.json + adapter_model.safetensors [+ golden.json])",
    description="The set's golden record (its outputs on fixed probes, `golden.json`) is published with it: the one "
                "uploaded as `golden` (from where the set was trained) once this server reproduces it within the "
                "dtypes' tolerance (409 naming the first probe that differs otherwise), else one this server computes.",
    openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["config", "weights"],
        "properties": {"config": {"type": "string", "format": "binary", "description": CONFIG_FILE},
                       "weights": {"type": "string", "format": "binary", "description": WEIGHTS_FILE},
                       "golden": {"type": "string", "format": "binary",
                                  "description": f"{GOLDEN_FILE} (optional)"}}}}}}},
)
async def publish(name: str, request: Request, registry: RegistryDep, engine: EngineDep,
                  events: EventsDep) -> AdapterInfo:
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise UnsupportedMediaTypeError("publish takes multipart/form-data with the files 'config' and 'weights'")
    form = await read_form(request)
    files = {key: form.get(key) for key in ("config", "weights")}
    missing = [k for k, v in files.items() if not isinstance(v, UploadFile)]
    if missing:
        raise InputError(f"missing file field(s) {missing}: send 'config' ({CONFIG_FILE}) "
                         f"and 'weights' ({WEIGHTS_FILE})")
    golden = form.get("golden")
    if golden is not None and not isinstance(golden, UploadFile):
        raise InputError(f"'golden' must be a file ({GOLDEN_FILE})")
    with tempfile.TemporaryDirectory(prefix="publish-") as tmp:
        folder = Path(tmp)

        def upload_named(message: str) -> str:  # name the uploaded files, not the server's temporary folder
            return message.replace(str(folder / CONFIG_FILE), "config").replace(
                str(folder / WEIGHTS_FILE), "weights").replace(str(folder / GOLDEN_FILE), "golden").replace(
                str(folder), "the upload")

        for key, filename in (("config", CONFIG_FILE), ("weights", WEIGHTS_FILE)):
            upload = files[key]
            assert isinstance(upload, UploadFile)
            (folder / filename).write_bytes(await upload.read())
        if golden is not None:
            data = await golden.read(MAX_RECORD_BYTES + 1)
            try:
                GoldenRecord.from_json(data, "golden")
            except GoldenRecordError as e:
                raise MalformedUploadError(f"not a golden record: {e}") from None
            (folder / GOLDEN_FILE).write_bytes(data)

        def validate() -> None:
            try:
                meta = read_meta(folder)
            except AdapterFormatError as e:
                raise MalformedUploadError(f"not a valid adapter set: {upload_named(str(e))}") from None
            if meta.name != name:
                raise ConflictError(f"the uploaded set is named {meta.name!r} in its config, not {name!r}")
            engine.check_compatible(meta)

        await run_in_threadpool(validate)
        try:
            record = await engine.golden(folder)
        except (AdapterFormatError, GoldenMismatchError) as e:
            raise type(e)(upload_named(str(e))) from None
        (folder / GOLDEN_FILE).write_bytes(record)
        meta = await run_in_threadpool(registry.publish_folder, folder, name)
    events.publish({"type": "adapter", "ref": meta.ref})
    return _info(registry, engine, meta)
