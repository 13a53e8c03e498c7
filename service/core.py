"""Everything a request needs, built once in the app's lifespan: backbone, tokenizer, adapter
registry and manager, the batcher, metrics; plus the async task steps routes compose."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from starlette.concurrency import run_in_threadpool

from uniadapter_serve.adapters.format import AdapterSetMeta
from uniadapter_serve.adapters.manager import AdapterManager
from uniadapter_serve.adapters.registry import AdapterRegistry
from uniadapter_serve.errors import ConflictError, InputError, TextTooLongError
from uniadapter_serve.model.backbone import BlipBackbone, vision_config
from uniadapter_serve.model.loading import load_backbone, local_folder
from uniadapter_serve.model.media.budget import DecodeBudget
from uniadapter_serve.model.media.image import load_image, probe_image
from uniadapter_serve.model.media.video import decode_video, probe_video
from uniadapter_serve.model.preprocess import image_to_tensor
from uniadapter_serve.model.tokenizer import BlipTokenizer, clean_text, load_answer_list, load_tokenizer
from uniadapter_serve.service import demo
from uniadapter_serve.service.batcher import Batcher
from uniadapter_serve.service.collections import faiss_device
from uniadapter_serve.service.collections.backends import open_backend
from uniadapter_serve.service.collections.manager import CollectionManager
from uniadapter_serve.service.metrics import ServiceMetrics
from uniadapter_serve.service.redis_glue import EmbeddingCache, EventBus, RedisLink
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
)

log = logging.getLogger(__name__)

TASK_KINDS = {"retrieval": ("retrieval",), "vqa": ("vqa", "videoqa"), "videoqa": ("videoqa", "vqa")}
CAPTION_WORDS, QUESTION_WORDS = 30, 50


@dataclass
class AnswerList:
    answers: list[str]
    tensors: tuple[torch.Tensor, torch.Tensor]
    """(ids, mask) of the tokenised answers: one tuple per list, so the answer stage can batch every
    rank-mode job that shares it"""


class ServiceCore:
    def __init__(self, settings: Settings, metrics: ServiceMetrics | None = None) -> None:
        self.settings = settings
        if settings.torch_threads is not None:
            torch.set_num_threads(settings.torch_threads)
        device = resolve_device(settings.device)
        dtype = resolve_dtype(settings.dtype, device)
        self.backbone: BlipBackbone = load_backbone(settings.backbone, device=device, dtype=dtype)
        self.tokenizer: BlipTokenizer = load_tokenizer(settings.backbone, self.backbone.config)
        self.image_size = int(vision_config(self.backbone.config).image_size)  # type: ignore[arg-type]
        self.metrics = metrics or ServiceMetrics()
        self.registry = AdapterRegistry(settings.adapters_dir)
        self.registry.refresh()
        self.demo = demo.enabled(settings)
        self.default_adapters: dict[str, str | None] = {
            task: getattr(settings, f"default_{task}_adapter") for task in TASK_KINDS}
        if self.demo:
            for task, name in demo.install_sets(self.registry).items():
                self.default_adapters[task] = self.default_adapters[task] or name
        self.manager = AdapterManager(
            self.backbone, self.registry,
            device_budget_bytes=int(settings.device_adapter_budget_mb * MB),
            cpu_budget_bytes=int(settings.cpu_adapter_budget_mb * MB),
            wait_timeout_s=0.0,  # only the model thread leases; it defers sets that find no room
        )
        self.metrics.adapter_events.collect_from(lambda: [({"event": k}, float(v))
                                                          for k, v in sorted(self.manager.stats.items())])
        handlers = make_handlers(self.backbone, bos_id=self.tokenizer.dec_id, sep_id=self.tokenizer.sep_id,
                                 pad_id=self.tokenizer.pad_id)
        self.batcher = Batcher(self.manager, handlers, max_batch_size=settings.max_batch_size,
                               max_wait_ms=settings.max_wait_ms, max_queue=settings.max_queue, metrics=self.metrics,
                               stage_batch_sizes={"vision": settings.max_vision_batch_size}
                               if settings.max_vision_batch_size else None)
        self.decode_budget = DecodeBudget(settings.decode_budget_pixels)
        budget = self.decode_budget
        self.metrics.decode_pixels.collect_from(lambda: [({}, float(budget.used))])
        self.metrics.decode_waits.collect_from(lambda: [({"outcome": "waited"}, float(budget.waited)),
                                                        ({"outcome": "timed_out"}, float(budget.timeouts))])
        self.default_answers = self._answer_list(self._default_answer_strings())
        self._answer_lists: dict[str, AnswerList] = {}
        self.redis = RedisLink(settings.redis_url, socket_timeout=settings.redis_timeout_s)
        self.cache = EmbeddingCache(self.redis)
        self.events = EventBus(self.redis, self._on_event)
        self.faiss = faiss_device.choose(settings.faiss_device, device)
        self.store_backend = open_backend(settings)
        self.collections = CollectionManager(self.store_backend, settings.media_dir, self)
        self.ready = False

    def start(self) -> None:
        self.batcher.start()
        self.events.start()
        self.ready = True
        log.info("serving %s on %s (%s)", self.settings.backbone, self.backbone.device, self.backbone.dtype)

    def stop(self, drain_timeout: float = 30.0) -> None:
        self.ready = False
        self.batcher.stop(drain_timeout)
        self.collections.close()
        self.store_backend.close()
        self.faiss.close()
        self.events.stop()
        self.redis.close()

    def _on_event(self, event: dict[str, object]) -> None:
        """Another replica changed shared state on the data volume."""
        if event.get("type") == "adapter":
            self.registry.refresh()
        elif event.get("type") == "collection":
            self.collections.refresh()
            name = event.get("name")
            if isinstance(name, str) and name in self.collections.names():
                self.collections.get(name).sync()

    # -- adapters --------------------------------------------------------------------------------

    def resolve_adapter(self, ref: str | None, task: str) -> AdapterSetMeta | None:
        """The set a request names (or the task's default); None = bare backbone."""
        if ref is None:
            ref = self.default_adapters[task]
        if ref is None or ref in ("none", "bare"):
            return None
        meta = self.registry.resolve(ref)
        if meta.config.task not in TASK_KINDS[task]:
            raise ConflictError(f"adapter set {meta.ref} is a {meta.config.task} set; /{task} needs a "
                                f"{' or '.join(TASK_KINDS[task])} set")
        return meta

    def answers_for(self, meta: AdapterSetMeta | None) -> AnswerList:
        if meta is None or meta.answer_list is None:
            return self.default_answers
        if meta.answer_list == self.default_answers.answers:
            return self.default_answers  # same list: jobs of both batch together
        cached = self._answer_lists.get(meta.ref)
        if cached is None:
            cached = self._answer_lists[meta.ref] = self._answer_list(meta.answer_list)
        return cached

    def _default_answer_strings(self) -> list[str]:
        if self.settings.answer_list is not None:
            return load_answer_list(self.settings.answer_list)
        folder = local_folder(self.settings.backbone)
        beside = folder / "answer_list.json" if folder is not None else None
        return load_answer_list(beside if beside is not None and beside.is_file() else None)

    def _answer_list(self, answers: list[str]) -> AnswerList:
        return AnswerList(answers, self.tokenizer.encode_answers(answers))

    # -- request steps (event loop) ------------------------------------------------------------------

    def deadline(self) -> float:
        return time.monotonic() + self.settings.request_timeout_s

    def check_text(self, text: str, field: str) -> str:
        limit = self.settings.max_text_chars
        if len(text) > limit:
            raise TextTooLongError(f"{field}: {len(text)} characters is over the limit of {limit}")
        if not clean_text(text, QUESTION_WORDS):
            raise InputError(f"{field}: must contain at least one word")
        return text

    async def image_input(self, data: bytes, content_type: str | None, field: str) -> VisionInput:
        """Decode + preprocess in a worker thread (never on the event loop or the model thread), holding
        the image's pixels of the decode budget until it is at model size."""
        s, size = self.settings, self.image_size
        probe = await run_in_threadpool(probe_image, data, declared_type=content_type, max_bytes=s.max_image_bytes,
                                        max_pixels=s.max_image_pixels, field=field, target_size=size)

        def work() -> VisionInput:
            return VisionInput(image_to_tensor(load_image(probe, size), size)[None])

        async with self.decode_budget.hold_async(probe.pixels, s.decode_wait_s, field):
            return await run_in_threadpool(work)

    async def video_input(self, data: bytes, num_frames: int, field: str) -> VisionInput:
        """Sample and preprocess `num_frames` frames in a worker thread, holding the decode budget."""
        s = self.settings
        pixels = await run_in_threadpool(probe_video, data, max_bytes=s.max_video_bytes,
                                         max_pixels=s.max_video_pixels, field=field)
        async with self.decode_budget.hold_async(pixels, s.decode_wait_s, field):
            frames = await run_in_threadpool(decode_video, data, num_frames=num_frames, size=self.image_size,
                                             max_bytes=s.max_video_bytes, max_seconds=s.max_video_seconds,
                                             max_pixels=s.max_video_pixels, field=field)
        return VisionInput(frames, video=True)

    async def vision(self, item: VisionInput, meta: AdapterSetMeta | None, deadline: float) -> VisionOutput:
        result: VisionOutput = await self.batcher.submit("vision", item, _ref(meta), deadline)
        return result

    async def text_embedding(self, text: str, meta: AdapterSetMeta | None, deadline: float) -> torch.Tensor:
        ids, mask = self.tokenizer.encode([clean_text(text, CAPTION_WORDS)], mode="text")
        result: torch.Tensor = await self.batcher.submit("text", TextInput(ids[0], mask[0]), _ref(meta), deadline)
        return result

    async def match(self, text: str, visual: VisionOutput, meta: AdapterSetMeta | None, deadline: float,
                    text_embedding: torch.Tensor | None = None) -> float:
        """ITM match probability of `text` with an image or video (frame-aware when the set enables it)."""
        ids, mask = self.tokenizer.encode([clean_text(text, CAPTION_WORDS)], mode="multimodal")
        if visual.frame_embeddings is not None and text_embedding is None:
            text_embedding = await self.text_embedding(text, meta, deadline)
        payload = MatchInput(ids[0], mask[0], visual.states, text_embedding, visual.frame_embeddings,
                             visual.tokens_per_frame)
        result: float = await self.batcher.submit("itm", payload, _ref(meta), deadline)
        return result

    async def answer(self, question: str, states: torch.Tensor, meta: AdapterSetMeta | None, *, mode: str,
                     top_k: int, max_length: int, deadline: float) -> list[tuple[str, float]]:
        ids, mask = self.tokenizer.encode([clean_text(question, QUESTION_WORDS)], mode="multimodal")
        answers = self.answers_for(meta)
        payload = AnswerInput(ids[0], mask[0], states, mode="rank" if mode == "rank" else "generate",
                              top_k=min(top_k, len(answers.answers)), candidates=answers.tensors,
                              max_length=max_length)
        out: AnswerOutput = await self.batcher.submit("answer", payload, _ref(meta), deadline)
        if out.indices is not None:
            return [(answers.answers[i], s) for i, s in zip(out.indices, out.scores, strict=True)]
        assert out.tokens is not None
        return [(self.tokenizer.decode(t), s) for t, s in zip(out.tokens, out.scores, strict=True)]


def _ref(meta: AdapterSetMeta | None) -> str | None:
    return meta.ref if meta is not None else None
