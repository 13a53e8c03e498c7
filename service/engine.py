"""The task engine: what runs the model for the routes, behind one interface.

Two implementations, and no route, schema or error code differs between them:
- `LocalEngine` (`local_engine.py`): the backbone, adapter manager and mixed-set batcher in this process
  (`uniadapter serve`, the embedded default);
- `RayEngine` (`ray_app.py`): handles to a Ray Serve model deployment whose replicas each run a
  `LocalEngine`, called with `multiplexed_model_id` = the set's `name@version`.

Methods are task-level, so one request is one call to one replica (a VQA request's image states never leave
the replica that computed them). Sets are named by exact `name@version` (None: the bare backbone), and every
deadline is in seconds from now, so it survives a hop to another host.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from uniadapter_serve.adapters.format import AdapterSetMeta
from uniadapter_serve.service.stages import VisionInput


@dataclass
class Ranking:
    """Candidates scored against one query: ITC for all, ITM for the top `rerank_k` by ITC."""

    itc: list[float]
    itm: dict[int, float] = field(default_factory=dict)


class Engine(abc.ABC):
    image_size: int
    """the side images and frames are resized to"""
    embed_dim: int
    """ITC embedding size"""

    @property
    @abc.abstractmethod
    def ready(self) -> bool: ...

    def start(self) -> None:  # noqa: B027 - an engine with nothing to start
        """Start serving."""

    def stop(self, drain_timeout: float = 30.0) -> None:  # noqa: B027
        """Finish accepted work (up to `drain_timeout`), then stop."""

    @contextlib.contextmanager
    def admit(self, jobs: int) -> Iterator[None]:
        """Admit a request of up to `jobs` model jobs as a unit (429 when the engine is full)."""
        yield

    # -- tasks ---------------------------------------------------------------------------------------

    @abc.abstractmethod
    async def answer(self, visual: VisionInput, question: str, ref: str | None, *, mode: str, top_k: int,
                     max_length: int, timeout: float, num_beams: int = 1,
                     rank_score: str = "likelihood") -> list[tuple[str, float]]:
        """VQA / VideoQA: answers best first, with their scores (rank mode: log-likelihoods or BLIP's rank score
        per `rank_score`; generate mode: log-likelihoods, greedy or beam search with `num_beams`, the other
        finished beams as alternatives)."""

    @abc.abstractmethod
    async def embed_text(self, text: str, ref: str | None, timeout: float) -> torch.Tensor:
        """(E,) float32 L2-normalised ITC embedding, on the host."""

    @abc.abstractmethod
    async def embed_visual(self, visual: VisionInput, ref: str | None, timeout: float) -> torch.Tensor:
        """(E,) float32 L2-normalised ITC embedding of an image or a clip, on the host."""

    @abc.abstractmethod
    async def rank_images(self, query: str, visuals: Sequence[VisionInput], ref: str | None, rerank_k: int,
                          timeout: float) -> Ranking:
        """A text query against images/clips."""

    @abc.abstractmethod
    async def rank_texts(self, visual: VisionInput, texts: Sequence[str], ref: str | None, rerank_k: int,
                         timeout: float) -> Ranking:
        """An image query against texts."""

    @abc.abstractmethod
    async def match_images(self, query: str, visuals: Sequence[VisionInput], ref: str | None,
                           timeout: float) -> list[float]:
        """ITM match probability of the query with each image/clip."""

    @abc.abstractmethod
    async def match_texts(self, visual: VisionInput, texts: Sequence[str], ref: str | None,
                          timeout: float) -> list[float]:
        """ITM match probability of the image/clip with each text."""

    # -- adapter residency -----------------------------------------------------------------------------

    @abc.abstractmethod
    async def load(self, ref: str) -> None: ...

    @abc.abstractmethod
    async def unload(self, ref: str) -> None: ...

    @abc.abstractmethod
    async def pin(self, ref: str) -> None: ...

    @abc.abstractmethod
    async def unpin(self, ref: str) -> None: ...

    @abc.abstractmethod
    def check_compatible(self, meta: AdapterSetMeta) -> None:
        """AdapterIncompatibleError naming the first mismatch of a set with the backbone (no tensor read)."""

    @abc.abstractmethod
    def residency(self) -> dict[str, Any]:
        """{"rows": [{"ref", "tier", "pinned", "leases", "bytes"}...], "device_budget": ..., "cpu_budget": ...,
        "device_bytes": ..., "cpu_bytes": ..., "itemsize": bytes per parameter}; with several replicas, what
        each holds (rows name the replica)."""

    def describe(self) -> dict[str, Any]:
        """What /readyz?verbose=true shows of the model side."""
        return {"engine": type(self).__name__, "image_size": self.image_size, "embed_dim": self.embed_dim}

    def queued(self) -> int:
        """Jobs waiting for the model (0 where the engine does not know)."""
        return 0
