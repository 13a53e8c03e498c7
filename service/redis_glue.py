"""Redis, when UNIADAPTER_REDIS_URL is set: an embedding cache shared by replicas, and pub/sub so
every replica learns of published adapter versions and changed collections.

Without Redis (or while it is unreachable) the cache is in-process and events stay local; a
Redis outage degrades to that with a warning in /readyz and never fails a request.

No Redis call runs on the event loop: writes (cache sets, event publishes) go to a background
thread and never delay a request; reads run in a worker thread and cost a request at most the
socket timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import redis
from starlette.concurrency import run_in_threadpool

log = logging.getLogger(__name__)

CHANNEL = "uniadapter:events"
CACHE_PREFIX = "uniadapter:emb:"
REDIS_ERRORS = (redis.RedisError, OSError)
MAX_PENDING_WRITES = 10_000
"""Background writes waiting beyond this are dropped (a cache fill or an event other replicas also get
from the data volume within seconds)."""


def on_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class RedisLink:
    """One client, with a health flag that flips on errors and recovers on the next success."""

    def __init__(self, url: str | None, *, socket_timeout: float = 0.5) -> None:
        self.url = url
        self.client: redis.Redis | None = (
            redis.Redis.from_url(url, socket_timeout=socket_timeout, socket_connect_timeout=socket_timeout)
            if url else None
        )
        self.last_error: str | None = None
        self._next_try = 0.0
        self._writer: ThreadPoolExecutor | None = None
        self._pending = 0
        self._pending_lock = threading.Lock()
        self.dropped_writes = 0
        self.loop_calls = 0
        """calls made on an event loop thread (a bug: they stall every request while Redis is slow)"""

    @property
    def configured(self) -> bool:
        return self.client is not None

    def call(self, fn: Callable[[redis.Redis], Any]) -> Any:
        """Run fn(client) in this thread; on failure record it, back off for 2 s, and return None.
        Never call it on the event loop: use `call_async` or `write`."""
        if self.client is None or time.monotonic() < self._next_try:
            return None
        if on_event_loop():
            self.loop_calls += 1
            log.error("redis call on the event loop: this stalls every request while redis is slow")
        try:
            result = fn(self.client)
        except REDIS_ERRORS as e:
            if self.last_error is None:
                log.warning("redis unavailable (%s): using the in-process cache and local events", e)
            self.last_error = str(e) or type(e).__name__
            self._next_try = time.monotonic() + 2.0
            return None
        if self.last_error is not None:
            log.info("redis is back")
        self.last_error = None
        return result

    async def call_async(self, fn: Callable[[redis.Redis], Any]) -> Any:
        """`call` in a worker thread: the event loop keeps serving meanwhile."""
        if self.client is None or time.monotonic() < self._next_try:
            return None
        return await run_in_threadpool(self.call, fn)

    def write(self, fn: Callable[[redis.Redis], Any]) -> None:
        """Run fn(client) on the background writer thread; returns at once (dropped when too many wait)."""
        if self.client is None:
            return
        with self._pending_lock:
            if self._pending >= MAX_PENDING_WRITES:
                self.dropped_writes += 1
                return
            self._pending += 1
            if self._writer is None:
                self._writer = ThreadPoolExecutor(1, thread_name_prefix="uniadapter-redis")

        def run() -> None:
            try:
                self.call(fn)
            finally:
                with self._pending_lock:
                    self._pending -= 1

        try:
            self._writer.submit(run)
        except RuntimeError:  # shut down
            with self._pending_lock:
                self._pending -= 1

    def close(self) -> None:
        """Finish queued writes (each bounded by the socket timeout, or skipped while backing off)."""
        if self._writer is not None:
            self._writer.shutdown(wait=True)

    def status(self) -> dict[str, Any]:
        if self.client is None:
            return {"configured": False}
        self.call(lambda c: c.ping())
        return {"configured": True, "ok": self.last_error is None, "error": self.last_error}


class EmbeddingCache:
    """(adapter version, media sha256) -> float32 vector: Redis when up, plus an in-process LRU."""

    def __init__(self, link: RedisLink, *, max_local: int = 50_000, ttl_s: int = 7 * 24 * 3600) -> None:
        self.link = link
        self.max_local = max_local
        self.ttl_s = ttl_s
        self._local: OrderedDict[str, bytes] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key(adapter_ref: str, sha256: str, kind: str) -> str:
        return f"{CACHE_PREFIX}{adapter_ref}:{kind}:{sha256}"

    def get_local(self, key: str) -> bytes | None:
        with self._lock:
            hit = self._local.get(key)
            if hit is not None:
                self._local.move_to_end(key)
            return hit

    async def get(self, key: str) -> bytes | None:
        """The in-process copy, else Redis (in a worker thread: at most its timeout)."""
        hit = self.get_local(key)
        if hit is not None:
            return hit
        value = await self.link.call_async(lambda c: c.get(key))
        if isinstance(value, bytes):
            self._remember(key, value)
            return value
        return None

    def set(self, key: str, value: bytes) -> None:
        """Remember locally now; write to Redis in the background."""
        self._remember(key, value)
        self.link.write(lambda c: c.set(key, value, ex=self.ttl_s))

    def _remember(self, key: str, value: bytes) -> None:
        with self._lock:
            self._local[key] = value
            self._local.move_to_end(key)
            while len(self._local) > self.max_local:
                self._local.popitem(last=False)


class EventBus:
    """Publish events to every replica; a listener thread hands received events to `handler`."""

    def __init__(self, link: RedisLink, handler: Callable[[dict[str, Any]], None]) -> None:
        self.link = link
        self.handler = handler
        self.origin = f"{time.time_ns()}-{id(self)}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.link.configured:
            self._thread = threading.Thread(target=self._listen, name="uniadapter-events", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=3)

    def publish(self, event: dict[str, Any]) -> None:
        """Send in the background: never waits on Redis."""
        message = json.dumps({**event, "origin": self.origin})
        self.link.write(lambda c: c.publish(CHANNEL, message))

    def _listen(self) -> None:
        while not self._stop.is_set():
            pubsub = None
            try:
                assert self.link.client is not None
                pubsub = self.link.client.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(CHANNEL)
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=0.5)
                    if message and message.get("type") == "message":
                        self._dispatch(message["data"])
            except REDIS_ERRORS as e:
                log.warning("event listener lost redis (%s); retrying", e)
                self._stop.wait(1.0)
            finally:
                if pubsub is not None:
                    with contextlib.suppress(*REDIS_ERRORS):
                        pubsub.close()

    def _dispatch(self, data: bytes | str) -> None:
        try:
            event = json.loads(data)
        except ValueError:
            return
        if not isinstance(event, dict) or event.get("origin") == self.origin:
            return
        try:
            self.handler(event)
        except Exception:
            log.exception("event handler failed for %s", event)
