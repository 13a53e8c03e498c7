"""The in-process engine: one backbone, the adapter manager, and the mixed-set batcher feeding one model
thread. `uniadapter serve` runs it; on Ray Serve every model replica runs one."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from uniadapter_serve.adapters.format import AdapterSetMeta, SetLimits, check_compatible
from uniadapter_serve.adapters.manager import AdapterManager
from uniadapter_serve.adapters.registry import AdapterRegistry
from uniadapter_serve.model.backbone import BlipBackbone, vision_config
from uniadapter_serve.model.loading import load_backbone, local_folder
from uniadapter_serve.model.tokenizer import BlipTokenizer, clean_text, load_answer_list, load_tokenizer
from uniadapter_serve.service.batcher import Batcher
from uniadapter_serve.service.engine import Engine, Ranking
from uniadapter_serve.service.metrics import ServiceMetrics
from uniadapter_serve.service.runtime import resolve_device, resolve_dtype
from uniadapter_serve.service.settings import MB, Settings
from uniadapter_serve.service.stages import (
    AnswerInput,
    AnswerOutput,
    MatchInput,
    TextInput,
    VisionInput,
    VisionOutput,
    make_handlers,
    step_macs,
)

log = logging.getLogger(__name__)

CAPTION_WORDS, QUESTION_WORDS = 30, 50


@dataclass
class AnswerList:
    answers: list[str]
    tensors: tuple[torch.Tensor, torch.Tensor]
    """(ids, mask) of the tokenised answers: one tuple per list, so the answer stage can batch every
    rank-mode job that shares it"""


class LocalEngine(Engine):
    def __init__(self, settings: Settings, registry: AdapterRegistry, metrics: ServiceMetrics) -> None:
        self.settings = settings
        self.registry = registry
        self.metrics = metrics
        if settings.torch_threads is not None:
            torch.set_num_threads(settings.torch_threads)
        self.device = resolve_device(settings.device)
        workers = settings.model_workers or (1 if self.device.type == "cuda" else 2)
        dtype = resolve_dtype(settings.dtype, self.device)
        self.backbone: BlipBackbone = load_backbone(settings.backbone, device=self.device, dtype=dtype)
        self.tokenizer: BlipTokenizer = load_tokenizer(settings.backbone, self.backbone.config)
        self.image_size = int(vision_config(self.backbone.config).image_size)  # type: ignore[arg-type]
        self.embed_dim = self.backbone.dims.embed_dim
        self.manager = AdapterManager(
            self.backbone, registry,
            device_budget_bytes=int(settings.device_adapter_budget_mb * MB),
            cpu_budget_bytes=int(settings.cpu_adapter_budget_mb * MB),
            # one model thread defers sets that find no room; several wait a little for each other's leases
            wait_timeout_s=0.0 if workers == 1 else 2.0,
        )
        metrics.adapter_events.collect_from(lambda: [({"event": k}, float(v))
                                                     for k, v in sorted(self.manager.stats.items())])
        handlers = make_handlers(self.backbone, bos_id=self.tokenizer.dec_id, sep_id=self.tokenizer.sep_id,
                                 pad_id=self.tokenizer.pad_id)
        self.batcher = Batcher(self.manager, handlers, max_batch_size=settings.max_batch_size,
                               max_wait_ms=settings.max_wait_ms, max_queue=settings.max_queue, metrics=metrics,
                               stage_batch_sizes={"vision": settings.max_vision_batch_size}
                               if settings.max_vision_batch_size else None, workers=workers,
                               threads=torch.get_num_threads(), parallel=self._parallel)
        self.limits = SetLimits(max_rank_k=settings.max_rank_k, max_answers=settings.max_answer_list)
        """what a set may ask of this server (checked at publish, applied on every request)"""
        self._clamped: set[str] = set()
        """sets on disk whose extra.rank_k was over MAX_RANK_K (logged once each)"""
        self.default_answers = self._answer_list(self._default_answer_strings())
        self._answer_lists: dict[str, AnswerList] = {}
        self._ready = False

    @property
    def ready(self) -> bool:
        return self._ready

    def start(self) -> None:
        self.batcher.start()
        self._ready = True
        log.info("model on %s (%s)", self.backbone.device, self.backbone.dtype)

    def stop(self, drain_timeout: float = 30.0) -> None:
        self._ready = False
        self.batcher.stop(drain_timeout)

    @contextlib.contextmanager
    def admit(self, jobs: int) -> Iterator[None]:
        with self.batcher.admit(jobs):
            yield

    def queued(self) -> int:
        return self.batcher.queued()

    def describe(self) -> dict[str, Any]:
        b = self.backbone
        return {**super().describe(), "components": list(b.components), "fingerprints": b.fingerprints,
                "device": str(b.device), "dtype": str(b.dtype).removeprefix("torch.")}

    # -- answer lists ---------------------------------------------------------------------------------

    def _meta(self, ref: str | None) -> AdapterSetMeta | None:
        return None if ref is None else self.registry.resolve(ref)

    def answers_for(self, meta: AdapterSetMeta | None) -> AnswerList:
        if meta is None or meta.answer_list is None:
            return self.default_answers
        self.limits.check_answers(meta)  # before anything is tokenised
        if meta.answer_list == self.default_answers.answers:
            return self.default_answers  # same list: jobs of both batch together
        cached = self._answer_lists.get(meta.ref)
        if cached is None:
            cached = self._answer_lists[meta.ref] = self._answer_list(meta.answer_list)
        return cached

    def _parallel(self, stage: str, payloads: list[Any]) -> bool:
        return step_macs(self.backbone.config, stage, payloads) >= self.settings.parallel_min_mmacs * 1e6

    def rank_k(self, meta: AdapterSetMeta | None) -> int:
        """Candidates scored in full in rank mode: the set's `extra.rank_k` (a positive integer, checked when the
        set is read), else the RANK_K setting; never over MAX_RANK_K (`SetLimits.rank_k`)."""
        k = self.limits.rank_k(meta, self.settings.rank_k)
        if meta is not None and meta.ref not in self._clamped and k < meta.extra.get("rank_k", k):
            self._clamped.add(meta.ref)
            log.warning("adapter set %s asks for extra.rank_k = %s, over MAX_RANK_K: it is served with k = %d",
                        meta.ref, meta.extra["rank_k"], k)
        return k

    def _default_answer_strings(self) -> list[str]:
        if self.settings.answer_list is not None:
            return load_answer_list(self.settings.answer_list)
        folder = local_folder(self.settings.backbone)
        beside = folder / "answer_list.json" if folder is not None else None
        return load_answer_list(beside if beside is not None and beside.is_file() else None)

    def _answer_list(self, answers: list[str]) -> AnswerList:
        return AnswerList(answers, self.tokenizer.encode_answers(answers))

    # -- stage steps -------------------------------------------------------------------------------------

    async def _vision(self, item: VisionInput, ref: str | None, deadline: float,
                      embed: bool = True) -> VisionOutput:
        payload = item if item.embed == embed else dataclasses.replace(item, embed=embed)
        result: VisionOutput = await self.batcher.submit("vision", payload, ref, deadline)
        return result

    async def _text(self, text: str, ref: str | None, deadline: float) -> torch.Tensor:
        ids, mask = self.tokenizer.encode([clean_text(text, CAPTION_WORDS)], mode="text")
        result: torch.Tensor = await self.batcher.submit("text", TextInput(ids[0], mask[0]), ref, deadline)
        return result

    async def _match(self, text: str, visual: VisionOutput, ref: str | None, deadline: float,
                     text_embedding: torch.Tensor | None = None) -> float:
        """ITM match probability of `text` with an image or video (frame-aware when the set enables it)."""
        ids, mask = self.tokenizer.encode([clean_text(text, CAPTION_WORDS)], mode="multimodal")
        if visual.frame_embeddings is not None and text_embedding is None:
            text_embedding = await self._text(text, ref, deadline)
        payload = MatchInput(ids[0], mask[0], visual.states, text_embedding, visual.frame_embeddings,
                             visual.tokens_per_frame)
        result: float = await self.batcher.submit("itm", payload, ref, deadline)
        return result

    # -- tasks ---------------------------------------------------------------------------------------------

    async def answer(self, visual: VisionInput, question: str, ref: str | None, *, mode: str, top_k: int,
                     max_length: int, timeout: float, num_beams: int = 1,
                     rank_score: str = "likelihood") -> list[tuple[str, float]]:
        deadline = time.monotonic() + timeout
        meta = self._meta(ref)
        answers = self.answers_for(meta)  # a set over this server's limits is refused before any model work
        out = await self._vision(visual, ref, deadline, embed=False)
        ids, mask = self.tokenizer.encode([clean_text(question, QUESTION_WORDS)], mode="multimodal")
        rank = mode == "rank"
        size = len(answers.answers)
        payload = AnswerInput(ids[0], mask[0], out.states, mode="rank" if rank else "generate",
                              top_k=min(top_k, size) if rank else min(top_k, num_beams),
                              candidates=answers.tensors, rank_k=min(max(top_k, self.rank_k(meta)), size),
                              rank_score="blip" if rank_score == "blip" else "likelihood",
                              max_length=max_length, num_beams=num_beams)
        result: AnswerOutput = await self.batcher.submit("answer", payload, ref, deadline)
        if result.indices is not None:
            return [(answers.answers[i], s) for i, s in zip(result.indices, result.scores, strict=True)]
        assert result.tokens is not None
        return [(self.tokenizer.decode(t), s) for t, s in zip(result.tokens, result.scores, strict=True)]

    async def embed_text(self, text: str, ref: str | None, timeout: float) -> torch.Tensor:
        return await self._text(text, ref, time.monotonic() + timeout)

    async def embed_visual(self, visual: VisionInput, ref: str | None, timeout: float) -> torch.Tensor:
        return _embedding(await self._vision(visual, ref, time.monotonic() + timeout))

    async def rank_images(self, query: str, visuals: Sequence[VisionInput], ref: str | None, rerank_k: int,
                          timeout: float) -> Ranking:
        deadline = time.monotonic() + timeout
        query_emb, outs = await asyncio.gather(
            self._text(query, ref, deadline), asyncio.gather(*(self._vision(v, ref, deadline) for v in visuals)))
        itc = (torch.stack([_embedding(o) for o in outs]) @ query_emb).tolist()
        top = sorted(range(len(itc)), key=lambda i: -itc[i])[:rerank_k]
        scores = await asyncio.gather(*(self._match(query, outs[i], ref, deadline, text_embedding=query_emb)
                                        for i in top))
        return Ranking(itc, dict(zip(top, scores, strict=True)))

    async def rank_texts(self, visual: VisionInput, texts: Sequence[str], ref: str | None, rerank_k: int,
                         timeout: float) -> Ranking:
        deadline = time.monotonic() + timeout
        out, embs = await asyncio.gather(self._vision(visual, ref, deadline),
                                         asyncio.gather(*(self._text(t, ref, deadline) for t in texts)))
        itc = (torch.stack(embs) @ _embedding(out)).tolist()
        top = sorted(range(len(itc)), key=lambda i: -itc[i])[:rerank_k]
        scores = await asyncio.gather(*(self._match(texts[i], out, ref, deadline) for i in top))
        return Ranking(itc, dict(zip(top, scores, strict=True)))

    async def match_images(self, query: str, visuals: Sequence[VisionInput], ref: str | None,
                           timeout: float) -> list[float]:
        deadline = time.monotonic() + timeout
        query_emb = await self._text(query, ref, deadline) if any(v.video for v in visuals) else None

        async def one(v: VisionInput) -> float:
            return await self._match(query, await self._vision(v, ref, deadline), ref, deadline, query_emb)

        return list(await asyncio.gather(*(one(v) for v in visuals)))

    async def match_texts(self, visual: VisionInput, texts: Sequence[str], ref: str | None,
                          timeout: float) -> list[float]:
        deadline = time.monotonic() + timeout
        out = await self._vision(visual, ref, deadline)
        return list(await asyncio.gather(*(self._match(t, out, ref, deadline) for t in texts)))

    # -- adapter residency -----------------------------------------------------------------------------

    async def load(self, ref: str) -> None:
        self.limits.check_answers(self.registry.resolve(ref))  # a set no request could use stays out
        await asyncio.to_thread(self.manager.load, ref)

    async def unload(self, ref: str) -> None:
        self.manager.unload(ref)

    async def pin(self, ref: str) -> None:
        self.limits.check_answers(self.registry.resolve(ref))
        await asyncio.to_thread(self.manager.pin, ref)

    async def unpin(self, ref: str) -> None:
        self.manager.unpin(ref)

    def check_compatible(self, meta: AdapterSetMeta) -> None:
        check_compatible(meta, self.backbone)
        self.limits.check(meta)  # publishing: nothing over this server's limits gets in

    def residency(self) -> dict[str, Any]:
        m = self.manager
        return {"rows": m.table(), "device_budget": m.device_budget, "cpu_budget": m.cpu_budget,
                "device_bytes": m.device_bytes(), "cpu_bytes": m.cpu_bytes(),
                "itemsize": self.backbone.dtype.itemsize}


def _embedding(out: VisionOutput) -> torch.Tensor:
    """The ITC embedding of a vision job submitted with embed=True."""
    assert out.embedding is not None
    return out.embedding
