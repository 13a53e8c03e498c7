"""POST /vqa, /videoqa, /retrieve: thin routes; the parts they use come as dependencies, the model work goes to
the engine as jobs."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from uniadapter_serve.adapters.format import AdapterSetMeta
from uniadapter_serve.errors import ConflictError, InputError
from uniadapter_serve.model.media.video import video_duration
from uniadapter_serve.service import demo
from uniadapter_serve.service.auth import ReadAuth
from uniadapter_serve.service.bodies import Upload, body_openapi, parse_body
from uniadapter_serve.service.collections.manager import CollectionManager
from uniadapter_serve.service.decoding import VisionDecoder
from uniadapter_serve.service.deps import (
    AdaptersDep,
    CollectionsDep,
    DeadlineDep,
    DecoderDep,
    EngineDep,
    SettingsDep,
)
from uniadapter_serve.service.engine import Engine
from uniadapter_serve.service.openapi_errors import ERRORS
from uniadapter_serve.service.resolver import AdapterResolver
from uniadapter_serve.service.routes.search import passes, search_collection
from uniadapter_serve.service.schemas import (
    AnswerItem,
    RetrieveHit,
    RetrieveRequest,
    RetrieveResponse,
    VideoQaRequest,
    VqaRequest,
    VqaResponse,
)
from uniadapter_serve.service.settings import Settings
from uniadapter_serve.service.tasks import Answer, AnswerJob, Deadline, RankJob, VisionInput, frames_for
from uniadapter_serve.service.texts import check_text
from uniadapter_serve.service.validation import lookup_id

router = APIRouter(tags=["tasks"], dependencies=[ReadAuth])

EXAMPLES = demo.request_examples()
VQA_MEDIA = {"image": False}
VIDEOQA_MEDIA = {"video": False}
RETRIEVE_MEDIA = {"query_image": False, "query_video": False, "candidate_images": True}


def _answer_job(body: VqaRequest | VideoQaRequest, visual: VisionInput, ref: str | None,
                deadline: Deadline) -> AnswerJob:
    return AnswerJob(visual=visual, question=body.question, mode=body.mode, top_k=body.top_k,
                     max_length=body.max_answer_length, num_beams=body.num_beams, rank_score=body.rank_score,
                     ref=ref, deadline=deadline)


def _vqa_response(answers: list[Answer], body: VqaRequest | VideoQaRequest, adapter: str | None) -> VqaResponse:
    return VqaResponse(answer=answers[0].text, score=answers[0].score, mode=body.mode, adapter=adapter,
                       alternatives=[AnswerItem(answer=a.text, score=a.score) for a in answers])


@router.post("/vqa", response_model=VqaResponse, responses=ERRORS,
             openapi_extra=body_openapi(VqaRequest, VQA_MEDIA, EXAMPLES["vqa"]),
             summary="Answer a question about an image")
async def vqa(request: Request, deadline: DeadlineDep, settings: SettingsDep, adapters: AdaptersDep,
              decoder: DecoderDep, engine: EngineDep) -> VqaResponse:
    body, media = await parse_body(request, VqaRequest, VQA_MEDIA)
    check_text(body.question, "question", settings.max_text_chars)
    ref = _ref(adapters.resolve(body.adapter, "vqa"))
    image = media["image"][0]
    with engine.admit(2):  # vision + answer
        visual = await decoder.image_input(image.data, image.content_type, "image", deadline=deadline)
        answers = await engine.run(_answer_job(body, visual, ref, deadline))
    return _vqa_response(answers, body, ref)


@router.post("/videoqa", response_model=VqaResponse, responses=ERRORS,
             openapi_extra=body_openapi(VideoQaRequest, VIDEOQA_MEDIA, EXAMPLES["videoqa"]),
             summary="Answer a question about a video")
async def videoqa(request: Request, deadline: DeadlineDep, settings: SettingsDep, adapters: AdaptersDep,
                  decoder: DecoderDep, engine: EngineDep, collections: CollectionsDep) -> VqaResponse:
    body, media = await parse_body(request, VideoQaRequest, VIDEOQA_MEDIA)
    check_text(body.question, "question", settings.max_text_chars)
    meta = adapters.resolve(body.adapter, "videoqa")
    frames = frames_for(meta, body.num_frames, settings.num_frames)
    with engine.admit(2):
        if body.collection is not None:
            data, field, span, long = await _collection_video(body, collections)
        else:
            data, field, span, long = media["video"][0].data, "video", None, False
        if span is None and (body.start_s is not None or body.end_s is not None):
            span = await _asked_span(body, data, field, decoder, long)
        visual = await decoder.video_input(data, frames, field, deadline=deadline, span=span, long=long)
        answers = await engine.run(_answer_job(body, visual, _ref(meta), deadline))
    return _vqa_response(answers, body, _ref(meta))


async def _collection_video(body: VideoQaRequest, collections: CollectionManager
                            ) -> tuple[bytes, str, tuple[float, float] | None, bool]:
    """The item a /videoqa body names -> (its bytes, how errors name it, the moment's span, moment collection)."""
    assert body.collection is not None and body.item is not None
    collection = collections.get(body.collection)
    cmeta = collection.meta
    if cmeta.kind != "video":
        raise ConflictError(f"collection {cmeta.name!r} holds {cmeta.kind}s: /videoqa asks about videos")
    item = await run_in_threadpool(collection.find, lookup_id(body.item))  # PostgreSQL text holds no NUL
    span = None
    if body.moment is not None:
        if cmeta.moments is None:
            raise InputError(f"moment: collection {cmeta.name!r} does not index moments (ask with start_s / end_s)")
        if body.moment >= len(item.moments):
            raise InputError(f"moment: item {item.external_id[:80]!r} has {len(item.moments)} moments "
                             f"(0-{len(item.moments) - 1}), not {body.moment}")
        span = item.moments[body.moment]
    content = await run_in_threadpool(collections.load_content, collection, item)
    assert isinstance(content, bytes)
    return content, f"item {item.external_id[:80]!r}", span, cmeta.moments is not None


async def _asked_span(body: VideoQaRequest, data: bytes, field: str, decoder: VisionDecoder,
                      long: bool) -> tuple[float, float]:
    """start_s / end_s, the missing one taken from the video (its start, or its end from the header)."""
    start = body.start_s or 0.0
    if body.end_s is not None:
        return start, body.end_s
    max_bytes, _ = decoder.video_limits(long)
    duration = await run_in_threadpool(video_duration, data, max_bytes=max_bytes,
                                       max_pixels=decoder.settings.max_video_pixels, field=field)
    if start >= duration:
        raise InputError(f"start_s: {start:g} s is at or past the end of the video ({duration:.3f} s)")
    return start, duration


@router.post("/retrieve", response_model=RetrieveResponse, responses=ERRORS,
             openapi_extra=body_openapi(RetrieveRequest, RETRIEVE_MEDIA, EXAMPLES["retrieve"]),
             summary="Text -> images, or image -> texts, ranked by the adapter's ITC (+ optional ITM re-rank)")
async def retrieve(request: Request, deadline: DeadlineDep, settings: SettingsDep, adapters: AdaptersDep,
                   decoder: DecoderDep, engine: EngineDep, collections: CollectionsDep) -> RetrieveResponse:
    body, media = await parse_body(request, RetrieveRequest, RETRIEVE_MEDIA, list_fields=("candidate_texts",))
    s = settings
    if body.top_k > s.max_top_k:
        raise InputError(f"top_k: {body.top_k} is over the limit of {s.max_top_k}")
    if body.rerank_k > s.max_top_k:
        raise InputError(f"rerank_k: {body.rerank_k} is over the limit of {s.max_top_k}")
    if sum((body.query_text is not None, "query_image" in media, "query_video" in media)) != 1:
        raise InputError("give exactly one of query_text, query_image and query_video")
    if body.filter is not None and body.filter.caption_contains is not None:
        check_text(body.filter.caption_contains, "filter.caption_contains", s.max_text_chars, words=False)
    candidates = len(media.get("candidate_images", [])) + len(body.candidate_texts or [])
    with engine.admit(1 + candidates + 2 * body.rerank_k):  # query, candidates, re-rank (vision + ITM)
        if body.collection is not None:
            return await search_collection(body, media, deadline, collections=collections, adapters=adapters,
                                           decoder=decoder, engine=engine, max_text_chars=s.max_text_chars)
        if "query_video" in media:
            raise InputError("a video query needs a collection")
        return await _rank_inline(body, media, deadline, settings, adapters, decoder, engine)


def _ref(meta: AdapterSetMeta | None) -> str | None:
    return meta.ref if meta is not None else None


async def _rank_inline(body: RetrieveRequest, media: dict[str, list[Upload]], deadline: Deadline, settings: Settings,
                       adapters: AdapterResolver, decoder: VisionDecoder, engine: Engine) -> RetrieveResponse:
    """Rank the request's own candidates: texts for an image query, images for a text query."""
    s = settings
    meta = adapters.resolve(body.adapter, "retrieval")
    if body.query_text is not None:
        query = check_text(body.query_text, "query_text", s.max_text_chars)
        images = media.get("candidate_images", [])
        if not images:
            raise InputError("a text query needs a collection or candidate_images")
        if len(images) > s.max_candidates:
            raise InputError(f"candidate_images: {len(images)} is over the limit of {s.max_candidates}")
        decoded = await asyncio.gather(*(decoder.image_input(m.data, m.content_type, f"candidate_images[{i}]",
                                                             deadline=deadline)
                                         for i, m in enumerate(images)))
        ranking = await engine.run(RankJob(query=query, candidates=decoded, rerank_k=body.rerank_k,
                                           ref=_ref(meta), deadline=deadline))
        metadata = [{"filename": m.filename} if m.filename else {} for m in images]
    else:
        texts = body.candidate_texts or []
        if not texts:
            raise InputError("an image query needs a collection or candidate_texts")
        if len(texts) > s.max_candidates:
            raise InputError(f"candidate_texts: {len(texts)} is over the limit of {s.max_candidates}")
        for i, t in enumerate(texts):
            check_text(t, f"candidate_texts[{i}]", s.max_text_chars)
        q = media["query_image"][0]
        visual = await decoder.image_input(q.data, q.content_type, "query_image", deadline=deadline)
        ranking = await engine.run(RankJob(query=visual, candidates=texts, rerank_k=body.rerank_k,
                                           ref=_ref(meta), deadline=deadline))
        metadata = [{"text": t} for t in texts]
    itc, itm = ranking.itc, ranking.itm
    order = [i for i in sorted(range(len(itc)), key=lambda i: -itc[i])
             if body.filter is None or passes(body.filter, metadata[i], metadata[i].get("text"))]
    head = order[: max(body.top_k, body.rerank_k)]
    if body.rerank_k:
        top = head[: body.rerank_k]
        head = sorted(top, key=lambda i: -itm[i]) + head[body.rerank_k:]
    hits = [RetrieveHit(id=str(i), score=itm.get(i, itc[i]), itc_score=itc[i], itm_score=itm.get(i),
                        metadata=metadata[i]) for i in head[: body.top_k]]
    return RetrieveResponse(results=hits, adapter=_ref(meta), collection=body.collection)
