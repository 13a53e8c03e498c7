"""POST /vqa, /videoqa, /retrieve: thin routes composing the core's batched steps."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request

from uniadapter_serve.adapters.format import AdapterSetMeta
from uniadapter_serve.errors import ConflictError, InputError
from uniadapter_serve.service import demo
from uniadapter_serve.service.auth import CoreDep, ReadAuth
from uniadapter_serve.service.bodies import Media, body_openapi, parse_body
from uniadapter_serve.service.core import ServiceCore
from uniadapter_serve.service.routes.search import check_length, passes, search_collection
from uniadapter_serve.service.schemas import (
    AnswerItem,
    ErrorResponse,
    RetrieveHit,
    RetrieveRequest,
    RetrieveResponse,
    VideoQaRequest,
    VqaRequest,
    VqaResponse,
)

router = APIRouter(tags=["tasks"], dependencies=[ReadAuth])

ERRORS: dict[int | str, dict[str, object]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        400: "Malformed JSON or undecodable media", 401: "Missing API key", 403: "Wrong API key",
        404: "Unknown adapter set or collection", 409: "Adapter set of the wrong task or incompatible",
        413: "Media over a limit (bytes, pixels, duration)", 415: "Unsupported media or body type",
        422: "Invalid field", 429: "Queue full (see Retry-After)", 503: "No room for the adapter set now",
        504: "Deadline passed",
    }.items()
}

EXAMPLES = demo.request_examples()
VQA_MEDIA = {"image": False}
VIDEOQA_MEDIA = {"video": False}
RETRIEVE_MEDIA = {"query_image": False, "query_video": False, "candidate_images": True}


def _vqa_response(answers: list[tuple[str, float]], mode: str, adapter: str | None) -> VqaResponse:
    best_answer, best_score = answers[0]
    return VqaResponse(answer=best_answer, score=best_score, mode=mode, adapter=adapter,
                       alternatives=[AnswerItem(answer=a, score=s) for a, s in answers])


@router.post("/vqa", response_model=VqaResponse, responses=ERRORS,
             openapi_extra=body_openapi(VqaRequest, VQA_MEDIA, EXAMPLES["vqa"]),
             summary="Answer a question about an image")
async def vqa(request: Request, core: CoreDep) -> VqaResponse:
    body, media = await parse_body(request, VqaRequest, VQA_MEDIA)
    core.check_text(body.question, "question")
    meta = core.resolve_adapter(body.adapter, "vqa")
    image = media["image"][0]
    with core.engine.admit(2):  # vision + answer
        visual = await core.image_input(image.data, image.content_type, "image")
        answers = await core.engine.answer(visual, body.question, _ref(meta), mode=body.mode, top_k=body.top_k,
                                           max_length=body.max_answer_length, timeout=core.timeout(),
                                           num_beams=body.num_beams, rank_score=body.rank_score)
    return _vqa_response(answers, body.mode, _ref(meta))


@router.post("/videoqa", response_model=VqaResponse, responses=ERRORS,
             openapi_extra=body_openapi(VideoQaRequest, VIDEOQA_MEDIA, EXAMPLES["videoqa"]),
             summary="Answer a question about a video")
async def videoqa(request: Request, core: CoreDep) -> VqaResponse:
    body, media = await parse_body(request, VideoQaRequest, VIDEOQA_MEDIA)
    core.check_text(body.question, "question")
    meta = core.resolve_adapter(body.adapter, "videoqa")
    frames = body.num_frames or (meta.config.num_frames if meta is not None else core.settings.num_frames)
    if meta is not None and meta.config.temporal_embedding and frames != meta.config.num_frames:
        raise ConflictError(f"num_frames: adapter set {meta.ref} has a temporal embedding for "
                            f"{meta.config.num_frames} frames, got {frames}")
    with core.engine.admit(2):
        visual = await core.video_input(media["video"][0].data, frames, "video")
        answers = await core.engine.answer(visual, body.question, _ref(meta), mode=body.mode, top_k=body.top_k,
                                           max_length=body.max_answer_length, timeout=core.timeout(),
                                           num_beams=body.num_beams, rank_score=body.rank_score)
    return _vqa_response(answers, body.mode, _ref(meta))


@router.post("/retrieve", response_model=RetrieveResponse, responses=ERRORS,
             openapi_extra=body_openapi(RetrieveRequest, RETRIEVE_MEDIA, EXAMPLES["retrieve"]),
             summary="Text -> images, or image -> texts, ranked by the adapter's ITC (+ optional ITM re-rank)")
async def retrieve(request: Request, core: CoreDep) -> RetrieveResponse:
    body, media = await parse_body(request, RetrieveRequest, RETRIEVE_MEDIA, list_fields=("candidate_texts",))
    s = core.settings
    if body.top_k > s.max_top_k:
        raise InputError(f"top_k: {body.top_k} is over the limit of {s.max_top_k}")
    if body.rerank_k > s.max_top_k:
        raise InputError(f"rerank_k: {body.rerank_k} is over the limit of {s.max_top_k}")
    if sum((body.query_text is not None, "query_image" in media, "query_video" in media)) != 1:
        raise InputError("give exactly one of query_text, query_image and query_video")
    if body.filter is not None and body.filter.caption_contains is not None:
        check_length(body.filter.caption_contains, "filter.caption_contains", s.max_text_chars)
    candidates = len(media.get("candidate_images", [])) + len(body.candidate_texts or [])
    with core.engine.admit(1 + candidates + 2 * body.rerank_k):  # query, candidates, re-rank (vision + ITM)
        if body.collection is not None:
            return await search_collection(core, body, media)
        if "query_video" in media:
            raise InputError("a video query needs a collection")
        return await _rank_inline(core, body, media)


def _ref(meta: AdapterSetMeta | None) -> str | None:
    return meta.ref if meta is not None else None


async def _rank_inline(core: ServiceCore, body: RetrieveRequest, media: dict[str, list[Media]]) -> RetrieveResponse:
    """Rank the request's own candidates: texts for an image query, images for a text query."""
    s = core.settings
    meta = core.resolve_adapter(body.adapter, "retrieval")
    if body.query_text is not None:
        query = core.check_text(body.query_text, "query_text")
        images = media.get("candidate_images", [])
        if not images:
            raise InputError("a text query needs a collection or candidate_images")
        if len(images) > s.max_candidates:
            raise InputError(f"candidate_images: {len(images)} is over the limit of {s.max_candidates}")
        decoded = await asyncio.gather(*(core.image_input(m.data, m.content_type, f"candidate_images[{i}]")
                                         for i, m in enumerate(images)))
        ranking = await core.engine.rank_images(query, decoded, _ref(meta), body.rerank_k, core.timeout())
        metadata = [{"filename": m.filename} if m.filename else {} for m in images]
    else:
        texts = body.candidate_texts or []
        if not texts:
            raise InputError("an image query needs a collection or candidate_texts")
        if len(texts) > s.max_candidates:
            raise InputError(f"candidate_texts: {len(texts)} is over the limit of {s.max_candidates}")
        for i, t in enumerate(texts):
            core.check_text(t, f"candidate_texts[{i}]")
        q = media["query_image"][0]
        visual = await core.image_input(q.data, q.content_type, "query_image")
        ranking = await core.engine.rank_texts(visual, texts, _ref(meta), body.rerank_k, core.timeout())
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
