"""What the batcher queues: a `Job` (one stage's work for one request) and the `Admission` of the request it
belongs to."""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from uniadapter_serve.model.routing import Routing
from uniadapter_serve.service.timing import RequestTiming
from uniadapter_serve.service.timing import current as timing_current

Handler = Callable[[Sequence["Job"], Routing], Sequence[Any]]
"""Runs jobs as one batch; returns one result (or an Exception instance) per job."""


CURRENT_ADMISSION: contextvars.ContextVar[Admission | None] = contextvars.ContextVar("uniadapter_admission",
                                                                                  default=None)
"""the request being handled in this context, once admitted"""


class Admission:
    """A request admitted as a unit: room for its jobs is reserved up front, and its jobs (submitted
    from this context or tasks it starts) never get 429 half-way through the request."""

    def __init__(self, batcher: object, jobs: int, release: Callable[[Admission], None]) -> None:
        self.batcher = batcher
        """the batcher that admitted it"""
        self.reserved = jobs
        self._release = release
        self._token: contextvars.Token[Admission | None] | None = None

    def __enter__(self) -> Admission:
        self._token = CURRENT_ADMISSION.set(self)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._token is not None:
            CURRENT_ADMISSION.reset(self._token)
        self._release(self)


@dataclass(eq=False)
class Job:
    stage: str
    payload: Any
    adapter: str | None
    """Exact `name@version`, or None for the bare backbone."""
    deadline: float
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop
    enqueued: float = field(default_factory=time.monotonic)
    timing: RequestTiming | None = field(default_factory=timing_current)
    """the submitting request's timing (queue and compute spans are recorded into it)"""
    started: float | None = None
    """when its batch started computing (after leasing its sets)"""
    ended: float | None = None
    admission: Admission | None = None
    """the admitted request it belongs to (None: submitted outside one)"""

    def finish(self, result: Any) -> None:
        def settle() -> None:
            if self.future.done():
                return
            if isinstance(result, BaseException):
                self.future.set_exception(result)
            else:
                self.future.set_result(result)

        self.loop.call_soon_threadsafe(settle)

    @property
    def abandoned(self) -> bool:
        """The awaiting request was cancelled (client went away) or timed out."""
        return self.future.done()
