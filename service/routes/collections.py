"""Collection routes: create, list, stats, add/delete items, re-index (writes need the admin key)."""

from __future__ import annotations

import json

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from uniadapter_serve.errors import InputError, UnsupportedMediaTypeError
from uniadapter_serve.service.auth import AdminAuth, CoreDep, ReadAuth
from uniadapter_serve.service.bodies import b64decode, component_ref
from uniadapter_serve.service.collections.ingest import IncomingItem
from uniadapter_serve.service.routes.tasks import ERRORS
from uniadapter_serve.service.schemas import (
    CollectionCreate,
    CollectionStats,
    ItemIn,
    ItemsAdd,
    ItemsAdded,
    ReindexRequest,
)

router = APIRouter(prefix="/collections", tags=["collections"], responses=ERRORS)

ITEMS_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": component_ref(ItemsAdd)},
    "multipart/form-data": {"schema": {"type": "object", "required": ["files"], "properties": {
        "files": {"type": "array", "items": {"type": "string", "format": "binary"}, "minItems": 1},
        "ids": {"type": "array", "items": {"type": "string"}, "description": "One per file (default: hashes)."},
        "metadata": {"type": "string", "description": "JSON list of objects, one per file."},
    }}},
}}}


@router.post("", response_model=CollectionStats, status_code=201, dependencies=[AdminAuth],
             summary="Create a collection bound to one adapter version")
async def create(body: CollectionCreate, core: CoreDep) -> CollectionStats:
    collection = await run_in_threadpool(core.collections.create, body.name, body.kind, body.adapter, body.index)
    return CollectionStats(**collection.stats())


@router.get("", response_model=list[CollectionStats], dependencies=[ReadAuth], summary="All collections")
def list_collections(core: CoreDep) -> list[CollectionStats]:
    return [CollectionStats(**stats) for stats in core.collections.all_stats()]


@router.get("/{name}", response_model=CollectionStats, dependencies=[ReadAuth], summary="Stats of one collection")
def stats(name: str, core: CoreDep) -> CollectionStats:
    return CollectionStats(**core.collections.get(name).stats())


@router.delete("/{name}", status_code=204, dependencies=[AdminAuth], summary="Delete a collection")
def drop(name: str, core: CoreDep) -> None:
    core.collections.drop(name)


def _from_json(items: list[ItemIn]) -> list[IncomingItem]:
    out = []
    for i, it in enumerate(items):
        media = [(k, v) for k, v in (("image", it.image), ("video", it.video)) if v is not None]
        if len(media) > 1:
            raise InputError(f"items[{i}]: give one of image and video")
        data = b64decode(media[0][1], f"items[{i}].{media[0][0]}") if media else None
        out.append(IncomingItem(id=it.id, data=data, path=it.path, text=it.text, metadata=it.metadata))
    return out


async def _from_form(request: Request) -> list[IncomingItem]:
    form = await request.form()
    files = [f for f in form.getlist("files") if isinstance(f, UploadFile)]
    if not files:
        raise InputError("files: send at least one file")
    ids = [v for v in form.getlist("ids") if isinstance(v, str) and v]
    if ids and len(ids) != len(files):
        raise InputError(f"ids: {len(ids)} ids for {len(files)} files")
    raw = form.get("metadata")
    metadata: list[dict[str, object]] = [{} for _ in files]
    if isinstance(raw, str) and raw:
        try:
            metadata = json.loads(raw)
        except ValueError as e:
            raise InputError(f"metadata: not valid JSON ({e})") from e
        if not (isinstance(metadata, list) and len(metadata) == len(files)
                and all(isinstance(m, dict) for m in metadata)):
            raise InputError("metadata: a JSON list with one object per file")
    return [IncomingItem(id=ids[i] if ids else None, data=await f.read(), content_type=f.content_type,
                         metadata={"filename": f.filename, **metadata[i]} if f.filename else dict(metadata[i]))
            for i, f in enumerate(files)]


@router.post("/{name}/items", response_model=ItemsAdded, status_code=201, dependencies=[AdminAuth],
             openapi_extra=ITEMS_BODY, summary="Add items (all or nothing); acknowledged once stored")
async def add_items(name: str, request: Request, core: CoreDep) -> ItemsAdded:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "application/json":
        items = _from_json(ItemsAdd.model_validate_json(await request.body()).items)
    elif content_type == "multipart/form-data":
        items = await _from_form(request)
    else:
        raise UnsupportedMediaTypeError("send application/json or multipart/form-data")
    limit = core.settings.max_items_per_request
    if len(items) > limit:
        raise InputError(f"items: {len(items)} is over the limit of {limit} per request")
    added = await core.collections.add(name, items)
    return ItemsAdded(collection=name, uid=added.uid, ids=added.ids, items=added.count)


@router.delete("/{name}/items/{item_id}", status_code=204, dependencies=[AdminAuth], summary="Delete an item")
def delete_item(name: str, item_id: str, core: CoreDep) -> None:
    core.collections.delete_item(name, item_id)


@router.post("/{name}/reindex", response_model=CollectionStats, status_code=202, dependencies=[AdminAuth],
             summary="Re-embed with another adapter version in the background; switch atomically when done")
async def reindex(name: str, body: ReindexRequest, core: CoreDep) -> CollectionStats:
    core.collections.start_reindex(name, body.adapter)
    return CollectionStats(**core.collections.get(name).stats())
