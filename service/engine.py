"""The task engine: what runs the model for the routes, behind one interface.

Two implementations, and no route, schema or error code differs between them:
- `LocalEngine` (`local_engine.py`): the backbone, adapter manager and mixed-set batcher in this process
  (`uniadapter serve`, the embedded default);
- `RayEngine` (`ray_app.py`): handles to a Ray Serve model deployment whose replicas each run a
  `LocalEngine`, called with `multiplexed_model_id` = the set's `name@version`.

A task is one typed job (`service/tasks.py`) built by the route and run whole by `Engine.run`, so one request
is one call to one replica (a VQA request's image states never leave the replica that computed them). Sets are
named by exact `name@version` (None: the bare backbone); the job's `Deadline` is the request's, and survives a
hop to another host.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

from uniadapter_serve.adapters.format import AdapterSetMeta
from uniadapter_serve.service.tasks import Task

R = TypeVar("R")


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
    async def run(self, job: Task[R]) -> R:
        """Run one task job (`tasks.AnswerJob`, `EmbedJob`, `RankJob`, `MatchJob`) on its set, within its
        deadline."""

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

    @abc.abstractmethod
    async def golden(self, folder: Path) -> bytes:
        """The golden record to publish with the set in `folder` (`adapter_config.json` + weights, maybe a
        `golden.json` from where it was trained): the uploaded one once the model reproduces it
        (GoldenMismatchError otherwise), else one computed by the model."""

    def verification(self) -> dict[str, Any]:
        """Golden-record outcomes: {"enabled", "backbone": outcome or None, "sets": {ref: outcome},
        "self_check_rate"} (outcome: {"result": pass|mismatch|unrecorded|recorded, "detail", ...})."""
        return {"enabled": False, "backbone": None, "sets": {}}

    def describe(self) -> dict[str, Any]:
        """What /readyz?verbose=true shows of the model side."""
        return {"engine": type(self).__name__, "image_size": self.image_size, "embed_dim": self.embed_dim}

    def queued(self) -> int:
        """Jobs waiting for the model (0 where the engine does not know)."""
        return 0
