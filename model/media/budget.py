"""A memory budget for decoding: pixels held by decodes in flight, across every request.

A decode asks for its pixel count before it starts and gives it back when its result is at model
size. Waiters are served first come, first served (a large image is not starved by a stream of
small ones); a waiter that times out leaves the queue and takes nothing. Threads wait with
`acquire`, coroutines with `acquire_async` (no thread is blocked while a request waits).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager

from uniadapter_serve.errors import MediaTooLargeError, ServerBusyError

log = logging.getLogger(__name__)

TRIM_AFTER_PIXELS = 50_000_000
"""Hand freed decode memory back to the OS once this many pixels were decoded since the last time."""


class _Waiter:
    def __init__(self, pixels: int, wake: Callable[[], None]) -> None:
        self.pixels = pixels
        self.wake = wake
        self.granted = False


class DecodeBudget:
    def __init__(self, capacity_pixels: int) -> None:
        if capacity_pixels < 1:
            raise ValueError(f"decode budget must be at least 1 pixel, got {capacity_pixels}")
        self.capacity = capacity_pixels
        self._used = 0
        self._lock = threading.Lock()
        self._waiters: deque[_Waiter] = deque()
        self._since_trim = 0
        self.waited = 0
        """acquisitions that had to wait"""
        self.timeouts = 0
        """acquisitions that gave up"""

    @property
    def used(self) -> int:
        with self._lock:
            return self._used

    @property
    def waiting(self) -> int:
        with self._lock:
            return len(self._waiters)

    def _check(self, pixels: int, field: str) -> None:
        if pixels > self.capacity:
            raise MediaTooLargeError(f"{field}: decoding needs {pixels} pixels at once, over the decode budget of "
                                     f"{self.capacity} pixels (UNIADAPTER_DECODE_BUDGET_MPIX)")

    def _try_now(self, pixels: int) -> bool:
        """Under the lock: take `pixels` if nobody waits ahead and they fit."""
        if not self._waiters and self._used + pixels <= self.capacity:
            self._used += pixels
            return True
        return False

    def _grant(self) -> None:
        """Under the lock: wake waiters from the head while they fit."""
        while self._waiters and self._used + self._waiters[0].pixels <= self.capacity:
            waiter = self._waiters.popleft()
            self._used += waiter.pixels
            waiter.granted = True
            waiter.wake()

    def _give_up(self, waiter: _Waiter) -> bool:
        """Leave the queue after a timeout; True if the pixels were granted meanwhile (the caller has them)."""
        with self._lock:
            if waiter.granted:
                return True
            self._waiters.remove(waiter)
            self.timeouts += 1
            self._grant()  # a smaller waiter behind this one may fit now
            return False

    def _busy(self, field: str, pixels: int, timeout: float) -> ServerBusyError:
        return ServerBusyError(f"{field}: waited {timeout:.1f} s for {pixels} pixels of the decode budget "
                               f"({self.capacity} pixels, all in use by other uploads); retry", retry_after=1.0)

    def acquire(self, pixels: int, timeout: float, field: str = "media") -> None:
        """Block until `pixels` fit (MediaTooLargeError if they never can, ServerBusyError after `timeout`)."""
        self._check(pixels, field)
        event = threading.Event()
        with self._lock:
            if self._try_now(pixels):
                return
            waiter = _Waiter(pixels, event.set)
            self._waiters.append(waiter)
            self.waited += 1
        if not event.wait(max(0.0, timeout)) and not self._give_up(waiter):
            raise self._busy(field, pixels, timeout)

    async def acquire_async(self, pixels: int, timeout: float, field: str = "media") -> None:
        """`acquire` for coroutines: waits on the event loop, holding no thread."""
        self._check(pixels, field)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()

        def settle() -> None:
            if not future.done():
                future.set_result(None)

        def wake() -> None:
            loop.call_soon_threadsafe(settle)

        with self._lock:
            if self._try_now(pixels):
                return
            waiter = _Waiter(pixels, wake)
            self._waiters.append(waiter)
            self.waited += 1
        try:
            await asyncio.wait_for(future, max(0.0, timeout))
        except TimeoutError:
            if not self._give_up(waiter):
                raise self._busy(field, pixels, timeout) from None
        except asyncio.CancelledError:
            if self._give_up(waiter):
                self.release(pixels)
            raise

    def release(self, pixels: int) -> None:
        with self._lock:
            self._used -= pixels
            self._since_trim += pixels
            trim = self._used == 0 and self._since_trim >= TRIM_AFTER_PIXELS
            if trim:
                self._since_trim = 0
            self._grant()
        if trim:
            release_free_memory()

    @contextmanager
    def hold(self, pixels: int, timeout: float, field: str = "media") -> Iterator[None]:
        self.acquire(pixels, timeout, field)
        try:
            yield
        finally:
            self.release(pixels)

    @asynccontextmanager
    async def hold_async(self, pixels: int, timeout: float, field: str = "media") -> AsyncIterator[None]:
        await self.acquire_async(pixels, timeout, field)
        try:
            yield
        finally:
            self.release(pixels)


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
