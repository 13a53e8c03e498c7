"""Where a request's time goes: wall-clock spans per phase (decode, queue, compute, replica), kept on the
request's context and reported in its `Server-Timing` header and in `/metrics`.

A request may run several jobs at once (eight candidate images decode and wait side by side): a phase's
duration is the union of its spans, not their sum, so it never exceeds the request's own wall time.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
import time
from collections.abc import Iterator

PHASES = ("decode", "queue", "compute", "replica")
"""decode: media decode and preprocessing (waits for the decode budget included); queue: model jobs waiting
for their batch (and the adapter sets it leases); compute: model jobs running; replica: calls to a remote model
replica (Ray Serve), its queue and compute included"""

_CURRENT: contextvars.ContextVar[RequestTiming | None] = contextvars.ContextVar("uniadapter_timing", default=None)


class RequestTiming:
    def __init__(self) -> None:
        self._spans: dict[str, list[tuple[float, float]]] = {}
        self._lock = threading.Lock()

    def add(self, phase: str, start: float, end: float) -> None:
        """A span of `phase` from `start` to `end` (time.monotonic())."""
        if end > start:
            with self._lock:
                self._spans.setdefault(phase, []).append((start, end))

    def durations(self) -> dict[str, float]:
        """Seconds per phase that has spans, in PHASES order: the union of its spans."""
        with self._lock:
            spans = {p: sorted(s) for p, s in self._spans.items()}
        out: dict[str, float] = {}
        for phase in sorted(spans, key=lambda p: PHASES.index(p) if p in PHASES else len(PHASES)):
            total, end = 0.0, float("-inf")
            for a, b in spans[phase]:
                if a > end:
                    total += b - a
                    end = b
                elif b > end:
                    total += b - end
                    end = b
            out[phase] = total
        return out

    def header(self, total: float) -> str:
        """A `Server-Timing` value: each phase and the total, in milliseconds."""
        parts = [f"{phase};dur={seconds * 1000:.1f}" for phase, seconds in self.durations().items()]
        return ", ".join([*parts, f"total;dur={total * 1000:.1f}"])


def current() -> RequestTiming | None:
    return _CURRENT.get()


@contextlib.contextmanager
def request_scope() -> Iterator[RequestTiming]:
    """The timing of one request: what runs inside (and the tasks and threads it starts) records into it."""
    timing = RequestTiming()
    token = _CURRENT.set(timing)
    try:
        yield timing
    finally:
        _CURRENT.reset(token)


@contextlib.contextmanager
def span(phase: str) -> Iterator[None]:
    """Record the enclosed wall time (awaits included) as `phase` of the current request, if any."""
    timing = _CURRENT.get()
    start = time.monotonic()
    try:
        yield
    finally:
        if timing is not None:
            timing.add(phase, start, time.monotonic())
