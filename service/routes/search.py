"""/retrieve over a collection: a text, image or video query, metadata filters applied inside the index search,
optional ITM re-rank, and the URLs of each hit's media and thumbnail."""

from __future__ import annotations

import asyncio
from functools import partial
from typing import Any
from urllib.parse import quote

from starlette.concurrency import run_in_threadpool

from uniadapter_serve.errors import ConflictError, InputError
from uniadapter_serve.service.bodies import Upload
from uniadapter_serve.service.collections.manager import CollectionManager
from uniadapter_serve.service.collections.store import Item
from uniadapter_serve.service.decoding import VisionDecoder
from uniadapter_serve.service.engine import Engine
from uniadapter_serve.service.resolver import AdapterResolver
from uniadapter_serve.service.schemas import RetrieveFilter, RetrieveHit, RetrieveRequest, RetrieveResponse
from uniadapter_serve.service.tasks import Deadline, EmbedJob, MatchJob, VisionInput
from uniadapter_serve.service.texts import check_text


def _same(a: Any, b: Any) -> bool:
    """Equality without Python's True == 1: booleans match booleans, numbers numbers, strings strings."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    return type(a) is type(b) and a == b


def passes(f: RetrieveFilter, metadata: dict[str, Any], text: str | None) -> bool:
    """Whether a hit with this metadata (and text, for text items) passes every condition of the filter."""
    if f.caption_contains is not None:
        caption = metadata.get("caption", text)
        if not isinstance(caption, str) or f.caption_contains.casefold() not in caption.casefold():
            return False
    return all(key in metadata and _same(metadata[key], want) for key, want in (f.metadata or {}).items())


def item_text(item: Item) -> str | None:
    kind, _, rest = item.source.partition(":")
    return rest if kind == "text" else None


def item_urls(collection: str, item_id: str, span: tuple[float, float] | None = None) -> tuple[str, str]:
    """Relative URLs of an item's media and thumbnail (ids are quoted whole: they may hold '/'); for a moment
    (`span`), the media plays from its start (a media fragment) and the thumbnail is its middle frame."""
    base = f"/collections/{quote(collection, safe='')}/items/{quote(item_id, safe='')}"
    if span is None:
        return f"{base}/media", f"{base}/thumbnail"
    start, end = span
    return f"{base}/media#t={start:.3f},{end:.3f}", f"{base}/thumbnail?t={(start + end) / 2:.3f}"


async def search_collection(body: RetrieveRequest, media: dict[str, list[Upload]], deadline: Deadline, *,
                            collections: CollectionManager, adapters: AdapterResolver, decoder: VisionDecoder,
                            engine: Engine, max_text_chars: int) -> RetrieveResponse:
    """Search a collection with the adapter version that built it; optional ITM re-rank (text <-> visual)."""
    assert body.collection is not None
    collection = collections.get(body.collection)
    cmeta = collection.meta
    adapter = collections.adapter_of(collection)
    if body.adapter is not None:
        asked = adapters.resolve(body.adapter, "retrieval")
        asked_ref = asked.ref if asked else "none"
        if asked_ref != cmeta.adapter_ref:
            raise ConflictError(f"collection {cmeta.name!r} is indexed with {cmeta.adapter_ref}; the query names "
                                f"{asked_ref}: omit 'adapter' or re-index the collection")
    if body.candidate_texts or "candidate_images" in media:
        raise InputError("give either a collection or inline candidates, not both")
    k = max(body.top_k, body.rerank_k)
    ref = adapter.ref if adapter is not None else None
    f = body.filter
    keep = None if f is None else (lambda it: passes(f, it.metadata, item_text(it)))
    visual: VisionInput | None = None
    if body.query_text is not None:
        if cmeta.kind == "text":
            raise ConflictError(f"collection {cmeta.name!r} holds texts: query it with query_image or query_video")
        query = check_text(body.query_text, "query_text", max_text_chars)
        vector = await engine.run(EmbedJob(query=query, ref=ref, deadline=deadline))
    else:
        if "query_image" in media:
            q = media["query_image"][0]
            visual = await decoder.image_input(q.data, q.content_type, "query_image", deadline=deadline)
        else:
            visual = await decoder.media_input("video", media["query_video"][0].data, adapter, "query_video",
                                               deadline=deadline)
        vector = await engine.run(EmbedJob(query=visual, ref=ref, deadline=deadline))
    hits = await run_in_threadpool(partial(collection.search, group_by_item=body.group_by_item), vector.numpy(), k,
                                   keep)
    long = cmeta.moments is not None

    async def rerank(top: list[int]) -> list[float]:
        if visual is not None:  # an image or video query: the hits are texts
            texts = [item_text(hits[i].item) or "" for i in top]
            return await engine.run(MatchJob(query=visual, candidates=texts, ref=ref, deadline=deadline))
        contents = await asyncio.gather(*(run_in_threadpool(collections.load_content, collection,
                                                            hits[i].item) for i in top))
        visuals = await asyncio.gather(*(  # a moment: its own frames
            decoder.media_input(cmeta.kind, content, adapter, f"item {hits[i].item.external_id!r}",
                                deadline=deadline, span=hits[i].span, long=long)
            for i, content in zip(top, contents, strict=True) if isinstance(content, bytes)))
        assert len(visuals) == len(top)  # media collections hold bytes
        return await engine.run(MatchJob(query=body.query_text or "", candidates=visuals, ref=ref,
                                         deadline=deadline))

    order = list(range(len(hits)))
    itm_scores: dict[int, float] = {}
    crosses_modality = (visual is None) != (cmeta.kind == "text")
    if body.rerank_k and hits and crosses_modality:
        top = order[: body.rerank_k]
        itm_scores = dict(zip(top, await rerank(top), strict=True))
        order = sorted(top, key=lambda i: -itm_scores[i]) + order[body.rerank_k:]
    results = []
    for i in order[: body.top_k]:
        item = hits[i].item
        metadata = dict(item.metadata)
        media_url = thumbnail_url = None
        if cmeta.kind == "text":
            metadata.setdefault("text", item_text(item))
        else:
            media_url, thumbnail_url = item_urls(cmeta.name, item.external_id, hits[i].span)
        span = hits[i].span
        results.append(RetrieveHit(id=item.external_id, score=itm_scores.get(i, hits[i].score),
                                   itc_score=hits[i].score, itm_score=itm_scores.get(i), metadata=metadata,
                                   media_url=media_url, thumbnail_url=thumbnail_url, moment=hits[i].moment,
                                   start_s=None if span is None else span[0], end_s=None if span is None else span[1]))
    return RetrieveResponse(results=results, adapter=None if cmeta.adapter_ref == "none" else cmeta.adapter_ref,
                            collection=cmeta.name)
