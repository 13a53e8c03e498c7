"""A memory budget for request bodies: bytes being received or held by requests in flight, across every
request (the body-side twin of the decode budget, `model/media/budget.py`).

A request that reads a body larger than `FREE_BYTES` is charged its Content-Length before the first byte
is handed to the route (a chunked body is charged as it arrives), and gives it back when its response is
done. Waiters are served first come, first served; a waiter that times out (503) or whose client goes
away leaves the queue and takes nothing. Everything runs on the event loop: no lock is needed.
"""

from __future__ import annotations

import asyncio
from collections import deque

from starlette.exceptions import HTTPException

from uniadapter_serve.errors import ServerBusyError
from uniadapter_serve.service.metrics import CallbackMetric, ServiceMetrics

FREE_BYTES = 64 * 1024
"""Bodies up to this size are not charged: uvicorn buffers that much per connection before it stops
reading anyway, so the connection caps already bound them (and a small /vqa never queues behind uploads)."""


class BodyBudgetBusyError(ServerBusyError, HTTPException):
    """The body budget stayed full (503, Retry-After). Also an HTTPException so that FastAPI's own body
    parsing passes it on (it turns any other error raised while reading a body into a 400); the domain
    handler answers it, as the first in its MRO."""

    def __init__(self, message: str, retry_after: float) -> None:
        ServerBusyError.__init__(self, message, retry_after)
        HTTPException.__init__(self, 503, message, {"Retry-After": str(max(1, round(retry_after)))})

    def __str__(self) -> str:
        return str(self.args[0])


class ClientGoneError(HTTPException):
    """The client went away before its request body arrived (closed, or cut off by the body timeout): 408 for
    the metrics and the log; nobody reads it. Starlette's ClientDisconnect would be answered 500."""

    def __init__(self) -> None:
        super().__init__(408, "the client closed the connection before its request body arrived")


class _Waiter:
    def __init__(self, size: int, future: asyncio.Future[None]) -> None:
        self.size = size
        self.future = future


class BodyBudget:
    def __init__(self, capacity_bytes: int) -> None:
        if capacity_bytes < 1:
            raise ValueError(f"body budget must be at least 1 byte, got {capacity_bytes}")
        self.capacity = capacity_bytes
        self.used = 0
        self.peak = 0
        """the most bytes ever charged at once (never above `capacity`)"""
        self.waited = 0
        """charges that had to wait"""
        self.timeouts = 0
        """charges that gave up (503)"""
        self._waiters: deque[_Waiter] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def _take(self, size: int) -> None:
        self.used += size
        self.peak = max(self.peak, self.used)

    async def acquire(self, size: int, timeout: float) -> int:
        """Wait until `size` bytes fit (BodyBudgetBusyError after `timeout`); -> the bytes charged, to release.
        A size over the capacity is charged the capacity (the request-size limit, never larger, runs first)."""
        size = min(size, self.capacity)
        if not self._waiters and self.used + size <= self.capacity:
            self._take(size)
            return size
        waiter = _Waiter(size, asyncio.get_running_loop().create_future())
        self._waiters.append(waiter)
        self.waited += 1
        try:
            await asyncio.wait_for(asyncio.shield(waiter.future), max(0.0, timeout))
        except (TimeoutError, asyncio.CancelledError) as e:
            if waiter.future.done():  # granted as the timeout fired: keep it, the caller releases it
                if isinstance(e, asyncio.CancelledError):
                    self.release(size)
                    raise
                return size
            self._waiters.remove(waiter)
            self._grant()  # a smaller waiter behind this one may fit now
            if isinstance(e, asyncio.CancelledError):
                raise
            self.timeouts += 1
            raise BodyBudgetBusyError(
                f"request body: waited {timeout:.1f} s for {size} bytes of the body budget ({self.capacity} bytes, "
                "all held by other uploads; UNIADAPTER_BODY_BUDGET_MB); retry", retry_after=1.0) from None
        return size

    def release(self, size: int) -> None:
        self.used -= size
        self._grant()

    def _grant(self) -> None:
        while self._waiters and self.used + self._waiters[0].size <= self.capacity:
            waiter = self._waiters.popleft()
            self._take(waiter.size)
            waiter.future.set_result(None)

    def watch(self, metrics: ServiceMetrics) -> BodyBudget:
        """Export the budget on `metrics` (in use, peak, waiting; waits and timeouts)."""
        held = CallbackMetric("uniadapter_body_budget_bytes", "Request-body bytes charged to the body budget "
                              "(state: used now, peak since start, capacity).", ("state",))
        held.collect_from(lambda: [({"state": "used"}, self.used), ({"state": "peak"}, self.peak),
                                   ({"state": "capacity"}, self.capacity)])
        waiting = CallbackMetric("uniadapter_body_budget_waiting", "Request bodies waiting for the body budget now.")
        waiting.collect_from(lambda: [({}, self.waiting)])
        counter = CallbackMetric("uniadapter_body_budget_waits", "Request bodies that waited for the body budget, "
                                 "and those that gave up with 503 (outcome).", ("outcome",), kind="counter")
        counter.collect_from(lambda: [({"outcome": "waited"}, self.waited), ({"outcome": "timeout"}, self.timeouts)])
        for metric in (held, waiting, counter):
            metrics.registry.register(metric)
        return self
