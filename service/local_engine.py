"""The in-process engine: one backbone, the adapter manager, and the mixed-set batcher feeding one model
thread. `uniadapter serve` runs it; on Ray Serve every model replica runs one."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import torch

from uniadapter_serve.adapters.format import AdapterSetMeta, SetLimits, check_compatible, load_adapter_set
from uniadapter_serve.adapters.golden import GOLDEN_FILE, Prober, read_record, tolerance
from uniadapter_serve.adapters.manager import AdapterManager
from uniadapter_serve.adapters.registry import AdapterRegistry
from uniadapter_serve.adapters.verification import Verifier
from uniadapter_serve.errors import BackboneMismatchError
from uniadapter_serve.model.backbone import BlipBackbone, vision_config
from uniadapter_serve.model.loading import local_folder
from uniadapter_serve.model.routing import Routing
from uniadapter_serve.model.stages import (
    AnswerInput,
    AnswerOutput,
    GeneratePlan,
    MatchInput,
    RankPlan,
    Stage,
    TextInput,
    VisionOutput,
    make_stages,
)
from uniadapter_serve.model.tokenizer import BlipTokenizer, default_answer_list, load_answer_list, load_tokenizer
from uniadapter_serve.service.batcher import Batcher, SelfCheck
from uniadapter_serve.service.engine import Engine
from uniadapter_serve.service.jobs import Handler, Job
from uniadapter_serve.service.metrics import ServiceMetrics
from uniadapter_serve.service.runtime import DtypeChoice, dtype_name, load_served_backbone, resolve_device
from uniadapter_serve.service.settings import MB, Settings
from uniadapter_serve.service.tasks import (
    Answer,
    AnswerJob,
    Deadline,
    EmbedJob,
    MatchJob,
    Ranking,
    RankJob,
    Task,
    VisionInput,
)

log = logging.getLogger(__name__)

R = TypeVar("R")

ANSWER_LISTS_KEPT = 32
"""sets' own answer lists kept tokenised (least recently used first out)"""


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
        self.backbone: BlipBackbone
        self.dtype_choice: DtypeChoice
        """the compute dtype and why (DTYPE=auto on a CPU: timed at load, see runtime.load_served_backbone)"""
        self.backbone, self.dtype_choice = load_served_backbone(settings.backbone, self.device, settings.dtype,
                                                                 vit_bf16_from=settings.vit_bf16_from)
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
        self.stages = make_stages(self.backbone, self.tokenizer)
        where = str(self.device), self.backbone.precision  # tolerances: bfloat16's where the ViT autocasts
        check = SelfCheck(settings.self_check_rate, {n: st.difference for n, st in self.stages.items()},
                          {n: 2 * tolerance(st.kind, where[1], where[0]) for n, st in self.stages.items()})
        self.batcher = Batcher(self.manager, {name: _on_payloads(stage) for name, stage in self.stages.items()},
                               max_batch_size=settings.max_batch_size,
                               max_wait_ms=settings.max_wait_ms, max_queue=settings.max_queue, metrics=metrics,
                               stage_batch_sizes={"vision": settings.max_vision_batch_size}
                               if settings.max_vision_batch_size else None, workers=workers,
                               threads=torch.get_num_threads(), parallel=self._parallel, self_check=check,
                               split=settings.split_batches and self.device.type != "cuda")
        self.limits = SetLimits(max_rank_k=settings.max_rank_k, max_answers=settings.max_answer_list)
        """what a set may ask of this server (checked at publish, applied on every request)"""
        self._clamped: set[str] = set()
        """sets on disk whose extra.rank_k was over MAX_RANK_K (logged once each)"""
        self.default_answers = self._answer_list(self._default_answer_strings())
        self._answer_lists: OrderedDict[str, concurrent.futures.Future[AnswerList]] = OrderedDict()
        """sets' own lists, tokenised once in a worker thread (never on the event loop); concurrent first
        requests share the one tokenisation"""
        self._lists_lock = threading.Lock()
        self._tokenising = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="uniadapter-answers")
        self.verifier = Verifier(Prober(self.backbone, self.tokenizer, self.default_answers.answers, self.stages),
                                 required=settings.golden_required)
        """golden records: each set's checked before it first serves here (the manager's hook), the backbone's at
        start"""
        if settings.golden_check:
            self.manager.verify = self.verifier.check_set
        metrics.golden_checks.collect_from(lambda: [({"subject": s, "result": r}, float(n))
                                                    for (s, r), n in sorted(self.verifier.counts.items())])
        self.backbone_error: str | None = None
        """why the backbone failed its golden record (the engine then refuses every task: 503)"""
        self._ready = False

    @property
    def ready(self) -> bool:
        return self._ready

    def start(self) -> None:
        if self.settings.golden_check:
            outcome = self.verifier.check_backbone(local_folder(self.settings.backbone), self.settings.data_root)
            if outcome.result == "mismatch":
                self.backbone_error = outcome.detail
        self.batcher.start()
        self._ready = True
        log.info("model on %s (%s%s)", self.backbone.device, dtype_name(self.backbone.dtype),
                 "" if self.backbone.vision_model.bf16_from is None
                 else f", ViT under bfloat16 autocast from {self.backbone.vision_model.bf16_from} frames a batch")

    def verification(self) -> dict[str, Any]:
        table = self.verifier.table()
        return {"enabled": self.settings.golden_check, "backbone": table.pop("backbone", None), "sets": table,
                "self_check_rate": self.settings.self_check_rate}

    async def golden(self, folder: Path) -> bytes:
        return await asyncio.to_thread(self._golden, folder)

    def _golden(self, folder: Path) -> bytes:
        """The record to publish with the set in `folder`: the one uploaded with it, once this server reproduces
        it (GoldenMismatchError otherwise), else one computed here."""
        loaded = load_adapter_set(folder, self.backbone, device=self.backbone.device, dtype=self.backbone.dtype)
        uploaded = read_record(folder)
        if uploaded is not None:
            self.verifier.verify(uploaded, loaded.module, loaded.meta.ref, loaded.meta.answer_list
                                 ).raise_for_mismatch()
            return (folder / GOLDEN_FILE).read_bytes()  # as uploaded
        return self.verifier.prober.record(loaded.module, ref=loaded.meta.ref,
                                           answer_list=loaded.meta.answer_list).to_json()

    def stop(self, drain_timeout: float = 30.0) -> None:
        self._ready = False
        self.batcher.stop(drain_timeout)
        self._tokenising.shutdown(wait=False, cancel_futures=True)

    @contextlib.contextmanager
    def admit(self, jobs: int) -> Iterator[None]:
        with self.batcher.admit(jobs):
            yield

    def queued(self) -> int:
        return self.batcher.queued()

    def describe(self) -> dict[str, Any]:
        b = self.backbone
        return {**super().describe(), "components": list(b.components), "fingerprints": b.fingerprints,
                "device": str(b.device), "dtype": dtype_name(b.dtype), "precision": b.precision,
                "dtype_choice": self.dtype_choice.describe()}

    # -- answer lists ---------------------------------------------------------------------------------

    def _meta(self, ref: str | None) -> AdapterSetMeta | None:
        return None if ref is None else self.registry.resolve(ref)

    async def _answers_for(self, meta: AdapterSetMeta | None) -> AnswerList:
        """The answer list rank mode scores for `meta` (checked against the limits by the caller), tokenised in a
        worker thread the first time; later requests find it by the set's ref, with no work on the event loop."""
        if meta is None or meta.answer_list is None:
            return self.default_answers
        with self._lists_lock:
            future = self._answer_lists.get(meta.ref)
            if future is None:
                future = self._answer_lists[meta.ref] = self._tokenising.submit(self._own_list, meta.answer_list)
                while len(self._answer_lists) > ANSWER_LISTS_KEPT:
                    self._answer_lists.popitem(last=False)
            self._answer_lists.move_to_end(meta.ref)
        return await asyncio.wrap_future(future)

    def _own_list(self, answers: list[str]) -> AnswerList:
        """A set's own list; the default one when it is the same (jobs of both then batch together)."""
        return self.default_answers if answers == self.default_answers.answers else self._answer_list(answers)

    def _parallel(self, stage: str, payloads: list[Any]) -> bool:
        return self.stages[stage].macs(self.backbone.config, payloads) >= self.settings.parallel_min_mmacs * 1e6

    def rank_k(self, meta: AdapterSetMeta | None, top_k: int = 1, answers: int | None = None) -> int:
        """Candidates scored in full in rank mode (`SetLimits.rank_k`, the one place that decides it): the set's
        `extra.rank_k`, else the RANK_K setting, never over MAX_RANK_K; logs once a set that asks for more."""
        k = self.limits.rank_k(meta, self.settings.rank_k, top_k=top_k, answers=answers)
        if (meta is not None and meta.ref not in self._clamped
                and self.limits.rank_k(meta, self.settings.rank_k) < meta.extra.get("rank_k", 0)):
            self._clamped.add(meta.ref)
            log.warning("adapter set %s asks for extra.rank_k = %s, over MAX_RANK_K: it is served with k = %d",
                        meta.ref, meta.extra["rank_k"], k)
        return k

    def _default_answer_strings(self) -> list[str]:
        if self.settings.answer_list is not None:
            return load_answer_list(self.settings.answer_list)
        return default_answer_list(self.settings.backbone)

    def _answer_list(self, answers: list[str]) -> AnswerList:
        return AnswerList(answers, self.tokenizer.encode_answers(answers))

    # -- tasks ---------------------------------------------------------------------------------------------

    async def run(self, job: Task[R]) -> R:
        if self.backbone_error is not None:
            raise BackboneMismatchError(f"this server does not serve: {self.backbone_error}")
        if isinstance(job, AnswerJob):
            return cast(R, await self._answer(job))
        if isinstance(job, EmbedJob):
            return cast(R, await self._embed(job))
        if isinstance(job, RankJob):
            return cast(R, await self._rank(job))
        if isinstance(job, MatchJob):
            return cast(R, await self._match_all(job))
        raise TypeError(f"no such task job: {type(job).__name__}")

    async def _answer(self, job: AnswerJob) -> list[Answer]:
        meta = self._meta(job.ref)
        if meta is not None:
            self.limits.check_answers(meta)  # a set over this server's limits is refused before any model work
        plan: RankPlan | GeneratePlan
        answers = await self._answers_for(meta) if job.mode == "rank" else None
        out = await self._vision(job.visual, job.ref, job.deadline, embed=False)
        if answers is not None:
            size = len(answers.answers)
            plan = RankPlan(answers.tensors, k=self.rank_k(meta, job.top_k, size), top_k=min(job.top_k, size),
                            score=job.rank_score)
        else:
            plan = GeneratePlan(job.max_length, job.num_beams, top_k=min(job.top_k, job.num_beams))
        result: AnswerOutput = await self.batcher.submit("answer", AnswerInput(job.question, out.states, plan),
                                                         job.ref, job.deadline.at)
        if answers is not None:
            assert result.indices is not None
            return [Answer(answers.answers[i], s) for i, s in zip(result.indices, result.scores, strict=True)]
        assert result.texts is not None
        return [Answer(t, s) for t, s in zip(result.texts, result.scores, strict=True)]

    async def _embed(self, job: EmbedJob) -> torch.Tensor:
        if isinstance(job.query, str):
            return await self._text(job.query, job.ref, job.deadline)
        return _embedding(await self._vision(job.query, job.ref, job.deadline))

    async def _rank(self, job: RankJob) -> Ranking:
        query, texts, visuals = _sides(job.query, job.candidates)
        if isinstance(query, str):
            query_emb, outs = await asyncio.gather(self._text(query, job.ref, job.deadline), asyncio.gather(
                *(self._vision(v, job.ref, job.deadline) for v in visuals)))
            itc = (torch.stack([_embedding(o) for o in outs]) @ query_emb).tolist()
            top = _best(itc, job.rerank_k)
            scores = await asyncio.gather(*(self._match(query, outs[i], job.ref, job.deadline, query_emb)
                                            for i in top))
        else:
            out, embs = await asyncio.gather(self._vision(query, job.ref, job.deadline), asyncio.gather(
                *(self._text(t, job.ref, job.deadline) for t in texts)))
            itc = (torch.stack(embs) @ _embedding(out)).tolist()
            top = _best(itc, job.rerank_k)
            scores = await asyncio.gather(*(self._match(texts[i], out, job.ref, job.deadline) for i in top))
        return Ranking(itc, dict(zip(top, scores, strict=True)))

    async def _match_all(self, job: MatchJob) -> list[float]:
        query, texts, visuals = _sides(job.query, job.candidates)
        ref, deadline = job.ref, job.deadline
        if isinstance(query, str):
            query_emb = await self._text(query, ref, deadline) if any(v.video for v in visuals) else None

            async def one(v: VisionInput) -> float:
                return await self._match(query, await self._vision(v, ref, deadline), ref, deadline, query_emb)

            return list(await asyncio.gather(*(one(v) for v in visuals)))
        out = await self._vision(query, ref, deadline)
        return list(await asyncio.gather(*(self._match(t, out, ref, deadline) for t in texts)))

    # -- stage steps -------------------------------------------------------------------------------------

    async def _vision(self, item: VisionInput, ref: str | None, deadline: Deadline,
                      embed: bool = True) -> VisionOutput:
        payload = item if item.embed == embed else dataclasses.replace(item, embed=embed)
        result: VisionOutput = await self.batcher.submit("vision", payload, ref, deadline.at)
        return result

    async def _text(self, text: str, ref: str | None, deadline: Deadline) -> torch.Tensor:
        result: torch.Tensor = await self.batcher.submit("text", TextInput(text), ref, deadline.at)
        return result

    async def _match(self, text: str, visual: VisionOutput, ref: str | None, deadline: Deadline,
                     text_embedding: torch.Tensor | None = None) -> float:
        """ITM match probability of `text` with an image or video (frame-aware when the set enables it)."""
        if visual.frame_embeddings is not None and text_embedding is None:
            text_embedding = await self._text(text, ref, deadline)
        payload = MatchInput(text, visual.states, text_embedding, visual.frame_embeddings, visual.tokens_per_frame)
        result: float = await self.batcher.submit("itm", payload, ref, deadline.at)
        return result

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


def _on_payloads(stage: Stage[Any, Any, Any]) -> Handler:
    """The batcher's handler for a stage: its jobs' payloads, run as one batch."""
    def handler(jobs: Sequence[Job], routing: Routing) -> list[Any]:
        return stage([j.payload for j in jobs], routing)
    return handler


def _sides(query: str | VisionInput, candidates: Sequence[str] | Sequence[VisionInput]
           ) -> tuple[str | VisionInput, list[str], list[VisionInput]]:
    """A text against visuals or a visual against texts, never a mix."""
    texts = [c for c in candidates if isinstance(c, str)]
    visuals = [c for c in candidates if isinstance(c, VisionInput)]
    if (texts if isinstance(query, str) else visuals) or len(texts) + len(visuals) != len(candidates):
        raise TypeError("a text query ranks images or clips, an image or clip query ranks texts")
    return query, texts, visuals


def _best(scores: list[float], k: int) -> list[int]:
    return sorted(range(len(scores)), key=lambda i: -scores[i])[:k]


def _embedding(out: VisionOutput) -> torch.Tensor:
    """The ITC embedding of a vision job submitted with embed=True."""
    assert out.embedding is not None
    return out.embedding
