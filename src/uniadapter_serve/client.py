"""A small Python client for a UniAdapter Serve server (httpx; sync `Client` and async `AsyncClient`).

    from uniadapter_serve.client import Client
    with Client("http://127.0.0.1:8000", api_key="...") as c:
        print(c.vqa("cat.png", "what colour is the cat?").answer)
        for hit in c.retrieve(query_text="a red circle", collection="demo-images", top_k=3).results:
            print(hit.id, hit.score, hit.metadata.get("caption"))
        for hit in c.retrieve(query_text="a red circle", collection="demo-long-videos").results:
            print(hit.id, hit.moment, hit.start_s, hit.end_s)  # a moment collection: where in the video

Media arguments take bytes or a path. Every non-2xx answer raises `ApiError` with the status, the server's error
class and its detail. Only httpx is needed (`pip install uniadapter-serve[client]`); nothing here imports the server.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

Media = bytes | str | os.PathLike[str]
"""Raw bytes, or the path of a file."""


class ApiError(Exception):
    """A non-2xx answer: `status` (HTTP), `error` (the server's error class) and `detail` (what is wrong)."""

    def __init__(self, status: int, error: str, detail: str) -> None:
        super().__init__(f"{status} {error}: {detail}")
        self.status, self.error, self.detail = status, error, detail


@dataclass(frozen=True)
class Answer:
    answer: str
    score: float
    alternatives: list[tuple[str, float]]
    mode: str
    adapter: str | None


@dataclass(frozen=True)
class Hit:
    id: str
    score: float
    itc_score: float
    itm_score: float | None
    metadata: dict[str, Any]
    media_url: str | None = None
    thumbnail_url: str | None = None
    moment: int | None = None
    """moment collections: which of the video's moments matched (its index in `ItemInfo.moments`)"""
    start_s: float | None = None
    """... where it starts, seconds from the video's first frame"""
    end_s: float | None = None
    """... and ends"""


@dataclass(frozen=True)
class Retrieval:
    results: list[Hit]
    adapter: str | None
    collection: str | None


@dataclass(frozen=True)
class Moments:
    """How a moment collection cuts its videos: windows of `window_s` every `stride_s` seconds; `indexed`
    moments in the server's index."""

    window_s: float
    stride_s: float
    indexed: int


@dataclass(frozen=True)
class CollectionInfo:
    name: str
    kind: str
    adapter: str
    items: int
    indexed: int
    raw: dict[str, Any] = field(repr=False)
    moments: Moments | None = None
    """None: one embedding per item"""


@dataclass(frozen=True)
class ItemInfo:
    id: str
    kind: str
    metadata: dict[str, Any]
    size: int
    content_type: str | None
    added: float
    adapter: str
    text: str | None
    media_url: str | None
    thumbnail_url: str | None
    moments: list[tuple[float, float]] | None = None
    """moment collections: the video's moments (start_s, end_s), in order (a hit's `moment` indexes this)"""


@dataclass(frozen=True)
class ItemPage:
    items: list[ItemInfo]
    next_cursor: int | None


@dataclass(frozen=True)
class AdapterInfo:
    ref: str
    name: str
    version: str
    task: str
    resident: bool
    pinned: bool
    bytes: int
    percent_of_backbone: float
    raw: dict[str, Any] = field(repr=False)


# -- requests and results, shared by both clients ----------------------------------------------------------------

@dataclass
class _Call:
    method: str
    path: str
    json: Any = None
    params: dict[str, Any] | None = None
    files: list[tuple[str, tuple[str, bytes]]] | None = None
    data: dict[str, Any] | None = None


def _bytes(media: Media) -> bytes:
    return media if isinstance(media, bytes) else Path(media).read_bytes()


def _b64(media: Media) -> str:
    return base64.b64encode(_bytes(media)).decode()


def _q(part: str) -> str:
    return quote(part, safe="")


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


def _check(r: httpx.Response) -> httpx.Response:
    if r.is_success:
        return r
    try:
        body = r.json()
        error, detail = str(body.get("error", "HTTPError")), str(body.get("detail", r.text))
    except ValueError:
        error, detail = "HTTPError", r.text[:500]
    raise ApiError(r.status_code, error, detail)


def _answer(d: dict[str, Any]) -> Answer:
    return Answer(d["answer"], d["score"], [(a["answer"], a["score"]) for a in d["alternatives"]], d["mode"],
                  d["adapter"])


def _retrieval(d: dict[str, Any]) -> Retrieval:
    hits = [Hit(h["id"], h["score"], h["itc_score"], h.get("itm_score"), h.get("metadata", {}), h.get("media_url"),
                h.get("thumbnail_url"), h.get("moment"), h.get("start_s"), h.get("end_s")) for h in d["results"]]
    return Retrieval(hits, d.get("adapter"), d.get("collection"))


def _collection(d: dict[str, Any]) -> CollectionInfo:
    m = d.get("moments")
    moments = Moments(m["window_s"], m["stride_s"], m["indexed"]) if m else None
    return CollectionInfo(d["name"], d["kind"], d["adapter"], d["items"], d["indexed"], d, moments)


def _item(d: dict[str, Any]) -> ItemInfo:
    spans = d.get("moments")
    return ItemInfo(d["id"], d["kind"], d["metadata"], d["size"], d.get("content_type"), d["added"], d["adapter"],
                    d.get("text"), d.get("media_url"), d.get("thumbnail_url"),
                    None if spans is None else [(m["start_s"], m["end_s"]) for m in spans])


def _page(d: dict[str, Any]) -> ItemPage:
    return ItemPage([_item(i) for i in d["items"]], d.get("next_cursor"))


def _adapter(d: dict[str, Any]) -> AdapterInfo:
    return AdapterInfo(d["ref"], d["name"], d["version"], d["task"], d["resident"], d["pinned"], d["bytes"],
                       d["percent_of_backbone"], d)


def _qa(route: str, media_field: str, media: Media | None, question: str, opts: dict[str, Any]) -> _Call:
    return _Call("POST", route, json=_drop_none({media_field: None if media is None else _b64(media),
                                                 "question": question, **opts}))


MomentsArg = bool | Mapping[str, float] | None
"""create_collection's `moments`: True (the server's MOMENT_WINDOW_S / MOMENT_STRIDE_S), {"window_s": 8,
"stride_s": 4} (either may be left out; {} is True), or None / False (one embedding per video)."""


def _create(name: str, kind: str, adapter: str | None, index: str | None, moments: MomentsArg) -> _Call:
    spec = None if moments is None or moments is False else dict(moments) if isinstance(moments, Mapping) else {}
    return _Call("POST", "/collections", json=_drop_none({"name": name, "kind": kind, "adapter": adapter,
                                                          "index": index, "moments": spec}))


def _retrieve(query_text: str | None, query_image: Media | None, query_video: Media | None, collection: str | None,
              candidate_texts: Sequence[str] | None, candidate_images: Sequence[Media] | None, top_k: int,
              rerank_k: int, filter: dict[str, Any] | None, adapter: str | None, group_by_item: bool | None
              ) -> _Call:
    return _Call("POST", "/retrieve", json=_drop_none({
        "query_text": query_text, "query_image": None if query_image is None else _b64(query_image),
        "query_video": None if query_video is None else _b64(query_video), "collection": collection,
        "candidate_texts": list(candidate_texts) if candidate_texts else None,
        "candidate_images": [_b64(m) for m in candidate_images] if candidate_images else None,
        "top_k": top_k, "rerank_k": rerank_k, "filter": filter, "adapter": adapter, "group_by_item": group_by_item}))


def _add_items(name: str, files: Sequence[Media], ids: Sequence[str] | None) -> _Call:
    parts = [("files", (Path(m).name if not isinstance(m, bytes) else f"item-{i}", _bytes(m)))
             for i, m in enumerate(files)]
    return _Call("POST", f"/collections/{_q(name)}/items", files=parts, data={"ids": list(ids)} if ids else None)


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


class Client:
    """Synchronous client. `api_key`: the read key for task and read routes, the admin key for writes too."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 60.0,
                 http: httpx.Client | None = None) -> None:
        self.http = http or httpx.Client(base_url=base_url, headers=_headers(api_key), timeout=timeout)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def _send(self, c: _Call) -> httpx.Response:
        return _check(self.http.request(c.method, c.path, json=c.json, params=c.params, files=c.files, data=c.data))

    def _json(self, c: _Call) -> Any:
        return self._send(c).json()

    # tasks
    def vqa(self, image: Media, question: str, *, mode: str = "rank", top_k: int = 3, num_beams: int | None = None,
            adapter: str | None = None) -> Answer:
        return _answer(self._json(_qa("/vqa", "image", image, question,
                                      {"mode": mode, "top_k": top_k, "num_beams": num_beams, "adapter": adapter})))

    def videoqa(self, video: Media | None = None, question: str = "", *, mode: str = "rank", top_k: int = 3,
                num_frames: int | None = None, adapter: str | None = None, collection: str | None = None,
                item: str | None = None, moment: int | None = None, start_s: float | None = None,
                end_s: float | None = None) -> Answer:
        """About an uploaded `video`, or a `collection`'s `item` (video=None); the whole video, its part from
        `start_s` to `end_s` (either may be left out), or one of a moment collection item's moments (`moment`,
        as a hit names it)."""
        return _answer(self._json(_qa("/videoqa", "video", video, question, {
            "mode": mode, "top_k": top_k, "num_frames": num_frames, "adapter": adapter, "collection": collection,
            "item": item, "moment": moment, "start_s": start_s, "end_s": end_s})))

    def retrieve(self, *, query_text: str | None = None, query_image: Media | None = None,
                 query_video: Media | None = None, collection: str | None = None,
                 candidate_texts: Sequence[str] | None = None, candidate_images: Sequence[Media] | None = None,
                 top_k: int = 10, rerank_k: int = 0, filter: dict[str, Any] | None = None,
                 adapter: str | None = None, group_by_item: bool | None = None) -> Retrieval:
        """`group_by_item` (moment collections): the best moment per video (True, the server's default) or every
        moment, best first (False)."""
        return _retrieval(self._json(_retrieve(query_text, query_image, query_video, collection, candidate_texts,
                                               candidate_images, top_k, rerank_k, filter, adapter, group_by_item)))

    # collections
    def collections(self) -> list[CollectionInfo]:
        return [_collection(d) for d in self._json(_Call("GET", "/collections"))]

    def collection(self, name: str) -> CollectionInfo:
        return _collection(self._json(_Call("GET", f"/collections/{_q(name)}")))

    def create_collection(self, name: str, kind: str = "image", adapter: str | None = None, *,
                          index: str | None = None, moments: MomentsArg = None) -> CollectionInfo:
        """`moments` (video collections): index each video's windows (see `MomentsArg`)."""
        return _collection(self._json(_create(name, kind, adapter, index, moments)))

    def delete_collection(self, name: str) -> None:
        self._send(_Call("DELETE", f"/collections/{_q(name)}"))

    def add_items(self, name: str, files: Sequence[Media], ids: Sequence[str] | None = None) -> list[str]:
        return list(self._json(_add_items(name, files, ids))["ids"])

    def delete_item(self, name: str, item_id: str) -> None:
        self._send(_Call("DELETE", f"/collections/{_q(name)}/items/{_q(item_id)}"))

    def items(self, name: str, *, limit: int = 50, cursor: int = 0) -> ItemPage:
        return _page(self._json(_Call("GET", f"/collections/{_q(name)}/items",
                                      params={"limit": limit, "cursor": cursor})))

    def all_items(self, name: str, page_size: int = 200) -> Iterator[ItemInfo]:
        cursor: int | None = 0
        while cursor is not None:
            page = self.items(name, limit=page_size, cursor=cursor)
            yield from page.items
            cursor = page.next_cursor

    def item(self, name: str, item_id: str) -> ItemInfo:
        return _item(self._json(_Call("GET", f"/collections/{_q(name)}/items/{_q(item_id)}")))

    def media(self, name: str, item_id: str) -> bytes:
        return self._send(_Call("GET", f"/collections/{_q(name)}/items/{_q(item_id)}/media")).content

    def thumbnail(self, name: str, item_id: str, size: int = 256, t: float | None = None) -> bytes:
        """JPEG; `t`: a video's frame at that second (e.g. a moment hit's middle)."""
        return self._send(_Call("GET", f"/collections/{_q(name)}/items/{_q(item_id)}/thumbnail",
                                params=_drop_none({"size": size, "t": t}))).content

    # adapters
    def adapters(self) -> list[AdapterInfo]:
        return [_adapter(d) for d in self._json(_Call("GET", "/adapters"))["adapters"]]

    def adapter(self, ref: str) -> AdapterInfo:
        return _adapter(self._json(_Call("GET", f"/adapters/{_q(ref)}")))

    def adapter_action(self, ref: str, action: str) -> AdapterInfo:
        """action: load, unload, pin or unpin (admin key)."""
        return _adapter(self._json(_Call("POST", f"/adapters/{_q(ref)}/{action}")))


class AsyncClient:
    """The same calls as `Client`, awaited."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 60.0,
                 http: httpx.AsyncClient | None = None) -> None:
        self.http = http or httpx.AsyncClient(base_url=base_url, headers=_headers(api_key), timeout=timeout)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.http.aclose()

    async def _send(self, c: _Call) -> httpx.Response:
        return _check(await self.http.request(c.method, c.path, json=c.json, params=c.params, files=c.files,
                                              data=c.data))

    async def _json(self, c: _Call) -> Any:
        return (await self._send(c)).json()

    async def vqa(self, image: Media, question: str, *, mode: str = "rank", top_k: int = 3,
                  num_beams: int | None = None, adapter: str | None = None) -> Answer:
        return _answer(await self._json(_qa("/vqa", "image", image, question, {
            "mode": mode, "top_k": top_k, "num_beams": num_beams, "adapter": adapter})))

    async def videoqa(self, video: Media | None = None, question: str = "", *, mode: str = "rank", top_k: int = 3,
                      num_frames: int | None = None, adapter: str | None = None, collection: str | None = None,
                      item: str | None = None, moment: int | None = None, start_s: float | None = None,
                      end_s: float | None = None) -> Answer:
        return _answer(await self._json(_qa("/videoqa", "video", video, question, {
            "mode": mode, "top_k": top_k, "num_frames": num_frames, "adapter": adapter, "collection": collection,
            "item": item, "moment": moment, "start_s": start_s, "end_s": end_s})))

    async def retrieve(self, *, query_text: str | None = None, query_image: Media | None = None,
                       query_video: Media | None = None, collection: str | None = None,
                       candidate_texts: Sequence[str] | None = None, candidate_images: Sequence[Media] | None = None,
                       top_k: int = 10, rerank_k: int = 0, filter: dict[str, Any] | None = None,
                       adapter: str | None = None, group_by_item: bool | None = None) -> Retrieval:
        return _retrieval(await self._json(_retrieve(query_text, query_image, query_video, collection,
                                                     candidate_texts, candidate_images, top_k, rerank_k, filter,
                                                     adapter, group_by_item)))

    async def collections(self) -> list[CollectionInfo]:
        return [_collection(d) for d in await self._json(_Call("GET", "/collections"))]

    async def collection(self, name: str) -> CollectionInfo:
        return _collection(await self._json(_Call("GET", f"/collections/{_q(name)}")))

    async def create_collection(self, name: str, kind: str = "image", adapter: str | None = None, *,
                                index: str | None = None, moments: MomentsArg = None) -> CollectionInfo:
        return _collection(await self._json(_create(name, kind, adapter, index, moments)))

    async def delete_collection(self, name: str) -> None:
        await self._send(_Call("DELETE", f"/collections/{_q(name)}"))

    async def add_items(self, name: str, files: Sequence[Media], ids: Sequence[str] | None = None) -> list[str]:
        return list((await self._json(_add_items(name, files, ids)))["ids"])

    async def delete_item(self, name: str, item_id: str) -> None:
        await self._send(_Call("DELETE", f"/collections/{_q(name)}/items/{_q(item_id)}"))

    async def items(self, name: str, *, limit: int = 50, cursor: int = 0) -> ItemPage:
        return _page(await self._json(_Call("GET", f"/collections/{_q(name)}/items",
                                            params={"limit": limit, "cursor": cursor})))

    async def item(self, name: str, item_id: str) -> ItemInfo:
        return _item(await self._json(_Call("GET", f"/collections/{_q(name)}/items/{_q(item_id)}")))

    async def media(self, name: str, item_id: str) -> bytes:
        return (await self._send(_Call("GET", f"/collections/{_q(name)}/items/{_q(item_id)}/media"))).content

    async def thumbnail(self, name: str, item_id: str, size: int = 256, t: float | None = None) -> bytes:
        return (await self._send(_Call("GET", f"/collections/{_q(name)}/items/{_q(item_id)}/thumbnail",
                                       params=_drop_none({"size": size, "t": t})))).content

    async def adapters(self) -> list[AdapterInfo]:
        return [_adapter(d) for d in (await self._json(_Call("GET", "/adapters")))["adapters"]]

    async def adapter(self, ref: str) -> AdapterInfo:
        return _adapter(await self._json(_Call("GET", f"/adapters/{_q(ref)}")))

    async def adapter_action(self, ref: str, action: str) -> AdapterInfo:
        """action: load, unload, pin or unpin (admin key)."""
        return _adapter(await self._json(_Call("POST", f"/adapters/{_q(ref)}/{action}")))
