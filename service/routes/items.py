"""What a collection holds, to look at: its items (cursor pages), one item, its media (ETag, Cache-Control, HTTP
ranges) and its thumbnails (bounded sizes, cached). Read key as for search."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from uniadapter_serve.errors import ConflictError, InputError, NotFoundError
from uniadapter_serve.model.media.image import probe_image
from uniadapter_serve.model.media.video import probe_video
from uniadapter_serve.service.auth import ReadAuth
from uniadapter_serve.service.collections import item_files
from uniadapter_serve.service.collections.collection import Collection
from uniadapter_serve.service.collections.store import Item
from uniadapter_serve.service.decoding import VisionDecoder
from uniadapter_serve.service.deps import CollectionsDep, DecoderDep, SettingsDep
from uniadapter_serve.service.errors import error_response
from uniadapter_serve.service.openapi_errors import ERRORS
from uniadapter_serve.service.routes.search import item_text, item_urls
from uniadapter_serve.service.schemas import ItemInfo, ItemPage, MomentSpan
from uniadapter_serve.service.validation import lookup_id

router = APIRouter(prefix="/collections", tags=["items"], dependencies=[ReadAuth], responses=ERRORS)

CACHE_CONTROL = "private, max-age=3600"
"""Media are content-addressed (the ETag is their sha256); private: they may sit behind a read key."""
CHUNK = 256 * 1024
BINARY = {"schema": {"type": "string", "format": "binary"}}
MEDIA_TYPES = {t: BINARY for t in ("image/jpeg", "image/png", "image/gif", "image/bmp", "image/webp", "video/mp4",
                                   "video/webm", "video/x-msvideo", "application/octet-stream")}
MEDIA_RESPONSES: dict[int | str, dict[str, object]] = {
    200: {"description": "The stored bytes, with their content type", "content": MEDIA_TYPES},
    206: {"description": "The requested byte range (Range: bytes=first-last)", "content": MEDIA_TYPES},
    304: {"description": "Not modified (If-None-Match matched the ETag)"},
    416: {"description": "The range starts past the end of the file", "content": {"application/json": {}}},
}
THUMB_RESPONSES: dict[int | str, dict[str, object]] = {
    200: {"description": "A JPEG, its longer side at most `size`", "content": {"image/jpeg": BINARY}},
    304: {"description": "Not modified (If-None-Match matched the ETag)"},
}
ItemId = Annotated[str, "an item's external id; may hold '/'"]


def info(collection: Collection, item: Item, media_root: Path) -> ItemInfo:
    meta = collection.meta
    if meta.kind == "text":
        text = item_text(item) or ""
        return ItemInfo(id=item.external_id, kind="text", metadata=item.metadata, size=len(text), content_type=None,
                        sha256=item.sha256, added=item.created, adapter=meta.adapter_ref, text=text)
    found = item_files.locate(collection.media_dir, item, media_root)
    media_url, thumbnail_url = item_urls(meta.name, item.external_id)
    return ItemInfo(id=item.external_id, kind="video" if meta.kind == "video" else "image", metadata=item.metadata,
                    size=found.size, content_type=found.content_type, sha256=item.sha256, added=item.created,
                    adapter=meta.adapter_ref, media_url=media_url, thumbnail_url=thumbnail_url,
                    moments=[MomentSpan(start_s=a, end_s=b) for a, b in item.moments] if meta.moments else None)


def _row(media_root: Path, collection: Collection, item: Item) -> ItemInfo:
    try:
        return info(collection, item, media_root)
    except NotFoundError:  # a listing shows an item whose file went missing, without its media
        return ItemInfo(id=item.external_id, kind="image" if collection.meta.kind == "image" else "video",
                        metadata=item.metadata, size=0, content_type=None, sha256=item.sha256, added=item.created,
                        adapter=collection.meta.adapter_ref)


@router.get("/{name}/items", response_model=ItemPage, summary="A page of a collection's items, in the order added")
def list_items(name: str, collections: CollectionsDep, settings: SettingsDep,
               limit: Annotated[int, Query(ge=1, le=500, description="Items per page.")] = 50,
               cursor: Annotated[int, Query(ge=0, le=2**62, description="`next_cursor` of the previous page; 0 "
                                            "for the first.")] = 0) -> ItemPage:
    collection = collections.get(name)
    rows, next_cursor = collection.page(cursor, limit)
    return ItemPage(collection=collection.name, items=[_row(settings.media_dir, collection, it) for it in rows],
                    next_cursor=next_cursor)


def _not_modified(request: Request, etag: str) -> bool:
    given = request.headers.get("if-none-match")
    return given is not None and (given.strip() == "*" or etag in [t.strip() for t in given.split(",")])


def _chunks(path: Path, first: int, last: int) -> Iterator[bytes]:
    with path.open("rb") as f:
        f.seek(first)
        left = last - first + 1
        while left > 0:
            data = f.read(min(CHUNK, left))
            if not data:
                return
            left -= len(data)
            yield data


@router.get("/{name}/items/{item_id:path}/media", responses=MEDIA_RESPONSES, response_class=Response,
            summary="The item's stored bytes (HTTP range requests: Range: bytes=first-last)")
def item_media(name: str, item_id: ItemId, request: Request, collections: CollectionsDep,
               settings: SettingsDep) -> Response:
    collection = collections.get(name)
    found = item_files.locate(collection.media_dir, collection.find(lookup_id(item_id)), settings.media_dir)
    headers = {"ETag": found.etag, "Cache-Control": CACHE_CONTROL, "Accept-Ranges": "bytes"}
    if _not_modified(request, found.etag):
        return Response(status_code=304, headers=headers)
    try:
        span = item_files.parse_range(request.headers.get("range"), found.size)
    except item_files.RangeNotSatisfiable:
        return error_response(416, "RangeNotSatisfiable", f"range {request.headers.get('range', '')[:80]!r}: the "
                              f"file has {found.size} bytes", {**headers, "Content-Range": f"bytes */{found.size}"})
    if span is None:
        return StreamingResponse(_chunks(found.path, 0, found.size - 1), media_type=found.content_type,
                                 headers={**headers, "Content-Length": str(found.size)})
    first, last = span
    return StreamingResponse(_chunks(found.path, first, last), status_code=206, media_type=found.content_type,
                             headers={**headers, "Content-Range": f"bytes {first}-{last}/{found.size}",
                                      "Content-Length": str(last - first + 1)})


@router.get("/{name}/items/{item_id:path}/thumbnail", responses=THUMB_RESPONSES, response_class=Response,
            summary="A JPEG thumbnail of the item (a video's first sampled frame, or its frame at `t`); cached")
async def item_thumbnail(name: str, item_id: ItemId, request: Request, collections: CollectionsDep,
                         settings: SettingsDep, decoder: DecoderDep,
                         size: Annotated[int, Query(description="Longer side in pixels (never enlarged): one of "
                                                    f"{list(item_files.THUMB_SIZES)}.",
                                                    json_schema_extra={"enum": list(item_files.THUMB_SIZES)})] = 256,
                         t: Annotated[float | None, Query(description="Videos: the frame on screen at this second "
                                                          "(from the first frame; rounded to 0.1 s), e.g. a "
                                                          "moment's middle. Not for images.")] = None,
                         ) -> Response:
    if size not in item_files.THUMB_SIZES:
        raise InputError(f"size: {size} is not one of {list(item_files.THUMB_SIZES)}")
    at = None if t is None else item_files.thumb_time(t)
    collection = collections.get(name)
    kind = collection.meta.kind
    if at is not None and kind != "video":
        raise ConflictError(f"t: collection {collection.name!r} holds {kind}s; a time applies to videos only")
    item = await run_in_threadpool(collection.find, lookup_id(item_id))
    found = await run_in_threadpool(item_files.locate, collection.media_dir, item, settings.media_dir)
    adapter = collections.adapter_of(collection) if kind == "video" else None
    frames = adapter.config.num_frames if adapter is not None else settings.num_frames
    etag = f'"{item_files.thumb_key(kind, item, size, frames, at)}"'
    headers = {"ETag": etag, "Cache-Control": CACHE_CONTROL}
    if _not_modified(request, etag):
        return Response(status_code=304, headers=headers)
    cache = item_files.thumb_path(collection.thumbs_dir, kind, item, size, frames, at)
    jpeg = await run_in_threadpool(item_files.cached_thumbnail, cache)
    if jpeg is None:
        field = f"item {item.external_id[:80]!r}"
        jpeg = await _make_thumbnail(decoder, kind, found.path, int(size), frames, field, at=at,
                                     long=collection.meta.moments is not None)
        await run_in_threadpool(item_files.store_thumbnail, cache, jpeg)
    return Response(jpeg, media_type="image/jpeg", headers=headers)


async def _make_thumbnail(decoder: VisionDecoder, kind: str, path: Path, size: int, frames: int, field: str, *,
                          at: float | None = None, long: bool = False) -> bytes:
    """Decode under the decode budget, like any upload (a stored file may be as large as the limits allow), as
    bulk work: a page asks for dozens at once and nobody's answer waits on them (they are cached after), so they
    wait their turn up to the request deadline within the bulk share and never crowd out task decodes. A video
    of a moment collection (`long`) has that collection's limits; `at`: the frame at that second (a seek)."""
    s = decoder.settings
    data = await run_in_threadpool(path.read_bytes)
    if kind == "image":
        probe = await run_in_threadpool(probe_image, data, declared_type=None, max_bytes=s.max_image_bytes,
                                        max_pixels=s.max_image_pixels, field=field, target_size=size)
        async with decoder.hold(probe.pixels, field, bulk=True):
            return await run_in_threadpool(item_files.image_thumbnail, probe, size)
    max_bytes, max_seconds = decoder.video_limits(long)
    pixels = await run_in_threadpool(probe_video, data, max_bytes=max_bytes, max_pixels=s.max_video_pixels,
                                     field=field)
    async with decoder.hold(pixels, field, bulk=True):
        if at is not None:
            return await run_in_threadpool(item_files.video_thumbnail_at, data, size, at, max_bytes=max_bytes,
                                           max_seconds=max_seconds, max_pixels=s.max_video_pixels, field=field)
        return await run_in_threadpool(item_files.video_thumbnail, data, size, frames, max_bytes=max_bytes,
                                       max_seconds=max_seconds, max_pixels=s.max_video_pixels, field=field)


@router.get("/{name}/items/{item_id:path}", response_model=ItemInfo,
            summary="One item: metadata, kind, size, when added, the adapter version it was embedded with")
def get_item(name: str, item_id: ItemId, collections: CollectionsDep, settings: SettingsDep) -> ItemInfo:
    collection = collections.get(name)
    return info(collection, collection.find(lookup_id(item_id)), settings.media_dir)
