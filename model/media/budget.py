"""A memory budget for decoding: pixels held by decodes in flight, across every request.

A decode asks for its pixel count before it starts and gives it back when its result is at model
size. Two classes of decode share the budget:

- task decodes (an upload to /vqa, /videoqa, /retrieve or a search: someone waits for the answer) may
  use all of it, and wait a short time at most (the caller's `timeout`, DECODE_WAIT_S in the service);
- bulk decodes (collection adds, re-indexing, thumbnails) may wait as long as their caller allows (the
  request's deadline), but together hold at most `bulk_share` of the budget, so task decodes always
  find the rest. A bulk decode larger than the share runs only when no other bulk decode holds any
  (the largest allowed image must still be addable; while it runs, tasks have what it leaves).

Within a class, waiters are served first come, first served (a large image is not starved by a stream
of small ones). Across classes, task decodes go first: a bulk waiter queues as if it had come
`bulk_patience` seconds later than it did, so it yields to task decodes for that long and is in line
with them after (a steady stream of tasks never starves bulk work for good). A bulk waiter held back
only by the bulk share never holds up a task decode (tasks do not use that share). A waiter that times
out leaves the queue and takes nothing. Threads wait with `acquire`, coroutines with `acquire_async`
(no thread is blocked while a request waits).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass

from uniadapter_serve.errors import DeadlineExceededError, MediaTooLargeError, ServerBusyError

log = logging.getLogger(__name__)

TRIM_AFTER_PIXELS = 50_000_000
"""Hand freed decode memory back to the OS once this many pixels were decoded since the last time."""
CLASSES = ("task", "bulk")


class _Waiter:
    def __init__(self, pixels: int, bulk: bool, order: tuple[float, int], wake: Callable[[], None]) -> None:
        self.pixels = pixels
        self.bulk = bulk
        self.order = order
        """(when it is in line, arrival order): a bulk waiter is in line at its arrival plus the patience"""
        self.wake = wake
        self.granted = False


@dataclass(frozen=True)
class BudgetState:
    """One consistent reading of the budget, by class ("task", "bulk")."""

    used: int
    held: dict[str, int]
    """pixels held now"""
    waiting: dict[str, int]
    """decodes waiting now"""
    waited: dict[str, int]
    """acquisitions that had to wait, since the start"""
    timeouts: dict[str, int]
    """acquisitions that gave up, since the start"""


class DecodeBudget:
    def __init__(self, capacity_pixels: int, bulk_share: float = 1.0, bulk_patience: float = 0.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if capacity_pixels < 1:
            raise ValueError(f"decode budget must be at least 1 pixel, got {capacity_pixels}")
        if not 0 < bulk_share <= 1:
            raise ValueError(f"bulk share must be in (0, 1], got {bulk_share}")
        if bulk_patience < 0:
            raise ValueError(f"bulk patience must be >= 0 seconds, got {bulk_patience}")
        self.capacity = capacity_pixels
        self.bulk_capacity = max(1, int(capacity_pixels * bulk_share))
        """pixels bulk decodes may hold together (but see the module docstring for one larger decode)"""
        self.bulk_patience = bulk_patience
        self._clock = clock
        self._used = 0
        self._bulk_used = 0
        self._lock = threading.Lock()
        self._queues: tuple[deque[_Waiter], deque[_Waiter]] = (deque(), deque())
        """task and bulk waiters, each in serving order"""
        self._seq = itertools.count()
        self._since_trim = 0
        self._waited = dict.fromkeys(CLASSES, 0)
        self._timeouts = dict.fromkeys(CLASSES, 0)

    @property
    def used(self) -> int:
        with self._lock:
            return self._used

    @property
    def waiting(self) -> int:
        with self._lock:
            return len(self._queues[0]) + len(self._queues[1])

    @property
    def waited(self) -> int:
        """Acquisitions (of either class) that had to wait."""
        with self._lock:
            return sum(self._waited.values())

    @property
    def timeouts(self) -> int:
        """Acquisitions (of either class) that gave up."""
        with self._lock:
            return sum(self._timeouts.values())

    def state(self) -> BudgetState:
        with self._lock:
            return BudgetState(self._used, {"task": self._used - self._bulk_used, "bulk": self._bulk_used},
                               {cls: len(q) for cls, q in zip(CLASSES, self._queues, strict=True)},
                               dict(self._waited), dict(self._timeouts))

    def _check(self, pixels: int, field: str) -> None:
        if pixels > self.capacity:
            raise MediaTooLargeError(f"{field}: decoding needs {pixels} pixels at once, over the decode budget of "
                                     f"{self.capacity} pixels (UNIADAPTER_DECODE_BUDGET_MPIX)")

    def _grant(self) -> None:
        """Under the lock: grant waiters in serving order (the earlier of the two heads) while they may go."""
        tasks, bulk = self._queues
        bulk_open = True  # False once the bulk head is held back by the share alone: tasks may pass it
        while tasks or (bulk and bulk_open):
            if not (bulk and bulk_open) or (tasks and tasks[0].order < bulk[0].order):
                if self._used + tasks[0].pixels > self.capacity:
                    return  # first come, first served: nobody after it passes it
                self._take(tasks)
                continue
            pixels = bulk[0].pixels
            share = self._bulk_used + pixels <= self.bulk_capacity or self._bulk_used == 0
            if not share:
                bulk_open = False  # tasks do not use the bulk share: they may pass
            elif self._used + pixels <= self.capacity:
                self._take(bulk)
            else:
                # It waits for room that the tasks in line after it (which came after its patience ran out)
                # would take: they wait behind it.
                return

    def _take(self, queue: deque[_Waiter]) -> None:
        waiter = queue.popleft()
        self._used += waiter.pixels
        if waiter.bulk:
            self._bulk_used += waiter.pixels
        waiter.granted = True
        waiter.wake()

    def _enqueue(self, pixels: int, bulk: bool, wake: Callable[[], None]) -> _Waiter | None:
        """Queue a waiter and grant what may go; -> None if it was granted at once, else the waiter."""
        with self._lock:
            # The clock never goes back and the patience is fixed, so each queue stays in serving order.
            in_line = self._clock() + (self.bulk_patience if bulk else 0.0)
            waiter = _Waiter(pixels, bulk, (in_line, next(self._seq)), wake)
            self._queues[bulk].append(waiter)
            self._grant()
            if waiter.granted:
                return None
            self._waited[CLASSES[bulk]] += 1
            return waiter

    def _give_up(self, waiter: _Waiter) -> bool:
        """Leave the queue after a timeout; True if the pixels were granted meanwhile (the caller has them)."""
        with self._lock:
            if waiter.granted:
                return True
            self._queues[waiter.bulk].remove(waiter)
            self._timeouts[CLASSES[waiter.bulk]] += 1
            self._grant()  # waiters behind this one may go now
            return False

    def _failed(self, field: str, pixels: int, timeout: float, bulk: bool) -> Exception:
        if bulk:
            return DeadlineExceededError(
                f"{field}: the deadline passed after waiting {timeout:.1f} s for {pixels} pixels of the decode "
                f"budget (bulk work may hold {self.bulk_capacity} of its {self.capacity} pixels at once, "
                "UNIADAPTER_DECODE_BULK_SHARE; the rest is kept for task routes); send fewer or smaller items "
                "per request")
        return ServerBusyError(f"{field}: waited {timeout:.1f} s for {pixels} pixels of the decode budget "
                               f"({self.capacity} pixels, all in use by other uploads); retry", retry_after=1.0)

    def acquire(self, pixels: int, timeout: float, field: str = "media", *, bulk: bool = False) -> None:
        """Block until `pixels` may be held: MediaTooLargeError if they never can; after `timeout` seconds,
        ServerBusyError (a task decode) or DeadlineExceededError (a bulk decode: its timeout is a deadline)."""
        self._check(pixels, field)
        event = threading.Event()
        waiter = self._enqueue(pixels, bulk, event.set)
        if waiter is not None and not event.wait(max(0.0, timeout)) and not self._give_up(waiter):
            raise self._failed(field, pixels, timeout, bulk)

    async def acquire_async(self, pixels: int, timeout: float, field: str = "media", *, bulk: bool = False) -> None:
        """`acquire` for coroutines: waits on the event loop, holding no thread."""
        self._check(pixels, field)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()

        def settle() -> None:
            if not future.done():
                future.set_result(None)

        def wake() -> None:
            loop.call_soon_threadsafe(settle)

        waiter = self._enqueue(pixels, bulk, wake)
        if waiter is None:
            return
        try:
            await asyncio.wait_for(future, max(0.0, timeout))
        except TimeoutError:
            if not self._give_up(waiter):
                raise self._failed(field, pixels, timeout, bulk) from None
        except asyncio.CancelledError:
            if self._give_up(waiter):
                self.release(pixels, bulk=bulk)
            raise

    def release(self, pixels: int, *, bulk: bool = False) -> None:
        with self._lock:
            self._used -= pixels
            if bulk:
                self._bulk_used -= pixels
            self._since_trim += pixels
            trim = self._used == 0 and self._since_trim >= TRIM_AFTER_PIXELS
            if trim:
                self._since_trim = 0
            self._grant()
        if trim:
            release_free_memory()

    @contextmanager
    def hold(self, pixels: int, timeout: float, field: str = "media", *, bulk: bool = False) -> Iterator[None]:
        self.acquire(pixels, timeout, field, bulk=bulk)
        try:
            yield
        finally:
            self.release(pixels, bulk=bulk)

    @asynccontextmanager
    async def hold_async(self, pixels: int, timeout: float, field: str = "media", *,
                         bulk: bool = False) -> AsyncIterator[None]:
        await self.acquire_async(pixels, timeout, field, bulk=bulk)
        try:
            yield
        finally:
            self.release(pixels, bulk=bulk)


_LIBC: ctypes.CDLL | None = None
_LIBC_LOADED = False
_last_trim = 0.0


def release_free_memory() -> None:
    """glibc keeps freed decode buffers in its arenas (the mmap threshold grows after the first large
    free), so a burst of large uploads would leave the process at its peak size for good. `malloc_trim`
    returns the free pages; a no-op elsewhere, and at most once a second."""
    global _LIBC, _LIBC_LOADED, _last_trim
    now = time.monotonic()
    if now - _last_trim < 1.0:
        return
    _last_trim = now
    if not _LIBC_LOADED:
        _LIBC_LOADED = True
        name = ctypes.util.find_library("c")
        try:
            libc = ctypes.CDLL(name) if name else None
            _LIBC = libc if libc is not None and hasattr(libc, "malloc_trim") else None
        except OSError:
            _LIBC = None
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
