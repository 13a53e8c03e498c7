"""Collection routes: create, list, stats, add/delete items, re-index (writes need the admin key)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import TypeAdapter
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from uniadapter_serve.errors import InputError, UnsupportedMediaTypeError
from uniadapter_serve.service.auth import AdminAuth, ReadAuth
from uniadapter_serve.service.bodies import b64decode, component_ref, read_form
from uniadapter_serve.service.collections.ingest import IncomingItem
from uniadapter_serve.service.collections.store import MomentSpec
from uniadapter_serve.service.deps import CollectionsDep, DeadlineDep, SettingsDep
from uniadapter_serve.service.openapi_errors import ERRORS
from uniadapter_serve.service.schemas import (
    CollectionCreate,
    CollectionStats,
    ItemIn,
    ItemsAdd,
    ItemsAdded,
    ReindexRequest,
)
from uniadapter_serve.service.validation import (
    ITEM_ID_PATTERN,
    METADATA_MAX_BYTES,
    METADATA_MAX_DEPTH,
    ItemId,
    Metadata,
    form_field,
    form_json,
    lookup_id,
)

router = APIRouter(prefix="/collections", tags=["collections"], responses=ERRORS)

ITEMS_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": component_ref(ItemsAdd)},
    "multipart/form-data": {"schema": {"type": "object", "required": ["files"], "properties": {
        "files": {"type": "array", "items": {"type": "string", "format": "binary"}, "minItems": 1},
        "ids": {"type": "array", "items": {"type": "string", "minLength": 1, "maxLength": 256,
                                          "pattern": ITEM_ID_PATTERN},
                "description": "One per file (default: hashes); the rules of `id` in a JSON body."},
        "metadata": {"type": "string", "description": "JSON list of objects, one per file (each with the file's "
                     f"name under 'filename'); at most {METADATA_MAX_DEPTH} levels of nesting and about "
                     f"{METADATA_MAX_BYTES // 1024} KiB of JSON each, as in a JSON body."},
    }}},
}}}


@router.post("", response_model=CollectionStats, status_code=201, dependencies=[AdminAuth],
             summary="Create a collection bound to one adapter version")
async def create(body: CollectionCreate, collections: CollectionsDep, settings: SettingsDep) -> CollectionStats:
    moments = None
    if body.moments is not None:
        window = body.moments.window_s or settings.moment_window_s
        moments = MomentSpec(window, body.moments.stride_s or min(settings.moment_stride_s, window))
    collection = await run_in_threadpool(collections.create, body.name, body.kind, body.adapter, body.index,
                                         moments)
    return CollectionStats(**collection.stats())


@router.get("", response_model=list[CollectionStats], dependencies=[ReadAuth], summary="All collections")
def list_collections(collections: CollectionsDep) -> list[CollectionStats]:
    return [CollectionStats(**stats) for stats in collections.all_stats()]


@router.get("/{name}", response_model=CollectionStats, dependencies=[ReadAuth], summary="Stats of one collection")
def stats(name: str, collections: CollectionsDep) -> CollectionStats:
    return CollectionStats(**collections.get(name).stats())


@router.delete("/{name}", status_code=204, dependencies=[AdminAuth], summary="Delete a collection")
def drop(name: str, collections: CollectionsDep) -> None:
    collections.drop(name)


def _from_json(items: list[ItemIn]) -> list[IncomingItem]:
    out = []
    for i, it in enumerate(items):
        media = [(k, v) for k, v in (("image", it.image), ("video", it.video)) if v is not None]
        if len(media) > 1:
            raise InputError(f"items[{i}]: give one of image and video")
        data = b64decode(media[0][1], f"items[{i}].{media[0][0]}") if media else None
        out.append(IncomingItem(id=it.id, data=data, path=it.path, text=it.text, metadata=it.metadata))
    return out


FORM_IDS: TypeAdapter[list[str]] = TypeAdapter(list[ItemId])
FORM_METADATA: TypeAdapter[list[dict[str, Any]]] = TypeAdapter(list[Metadata])
ONE_METADATA: TypeAdapter[dict[str, Any]] = TypeAdapter(Metadata)


async def _from_form(request: Request) -> list[IncomingItem]:
    """The multipart twin of an ItemsAdd body: the same id and metadata rules (service/validation.py)."""
    form = await read_form(request)
    files = [f for f in form.getlist("files") if isinstance(f, UploadFile)]
    if not files:
        raise InputError("files: send at least one file")
    ids = form_field(FORM_IDS, [v for v in form.getlist("ids") if isinstance(v, str) and v], "ids")
    if ids and len(ids) != len(files):
        raise InputError(f"ids: {len(ids)} ids for {len(files)} files")
    raw = form.get("metadata")
    given: list[dict[str, Any]] = [{} for _ in files]
    if isinstance(raw, str) and raw:
        given = form_json(FORM_METADATA, raw, "metadata")
        if len(given) != len(files):
            raise InputError(f"metadata: a JSON list with one object per file ({len(given)} for {len(files)} files)")
    metadata = [form_field(ONE_METADATA, {"filename": f.filename, **given[i]}, f"metadata[{i}] with files[{i}]'s "
                           "name") if f.filename else given[i] for i, f in enumerate(files)]
    return [IncomingItem(id=ids[i] if ids else None, data=await f.read(), content_type=f.content_type,
                         metadata=metadata[i]) for i, f in enumerate(files)]


@router.post("/{name}/items", response_model=ItemsAdded, status_code=201, dependencies=[AdminAuth],
             openapi_extra=ITEMS_BODY, summary="Add items (all or nothing); acknowledged once stored")
async def add_items(name: str, request: Request, deadline: DeadlineDep, collections: CollectionsDep,
                    settings: SettingsDep) -> ItemsAdded:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "application/json":
        items = _from_json(ItemsAdd.model_validate_json(await request.body()).items)
    elif content_type == "multipart/form-data":
        items = await _from_form(request)
    else:
        raise UnsupportedMediaTypeError("send application/json or multipart/form-data")
    limit = settings.max_items_per_request
    if len(items) > limit:
        raise InputError(f"items: {len(items)} is over the limit of {limit} per request")
    added = await collections.add(name, items, deadline)
    return ItemsAdded(collection=name, uid=added.uid, ids=added.ids, items=added.count)


@router.delete("/{name}/items/{item_id:path}", status_code=204, dependencies=[AdminAuth],
               summary="Delete an item (its id may hold '/', as the read routes take it)")
def delete_item(name: str, item_id: str, collections: CollectionsDep) -> None:
    collections.delete_item(name, lookup_id(item_id))


@router.post("/{name}/reindex", response_model=CollectionStats, status_code=202, dependencies=[AdminAuth],
             summary="Re-embed with another adapter version in the background; switch atomically when done")
async def reindex(name: str, body: ReindexRequest, collections: CollectionsDep) -> CollectionStats:
    collections.start_reindex(name, body.adapter)
    return CollectionStats(**collections.get(name).stats())
