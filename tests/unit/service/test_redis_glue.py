"""Redis never runs on the event loop: against a real redis-server, healthy and hung (SIGSTOP)."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest
from support.redis_server import RedisServer

from uniadapter_serve.service.redis_glue import EmbeddingCache, EventBus, RedisLink


@pytest.fixture
def redis_server():
    server = RedisServer()
    yield server
    server.process.send_signal(signal.SIGCONT)
    server.stop()


def test_cache_round_trip_through_redis(redis_server):
    link = RedisLink(redis_server.url)
    writer, reader = EmbeddingCache(link), EmbeddingCache(RedisLink(redis_server.url))
    writer.set("k", b"vector")
    link.close()  # the background write has landed
    assert asyncio.run(reader.get("k")) == b"vector"
    assert link.loop_calls == 0


def test_a_hung_redis_never_blocks_the_event_loop(redis_server):
    link = RedisLink(redis_server.url, socket_timeout=1.0)
    cache, bus = EmbeddingCache(link), EventBus(link, lambda event: None)
    redis_server.process.send_signal(signal.SIGSTOP)

    async def main() -> tuple[bytes | None, int, float]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)

        beat = asyncio.ensure_future(ticker())
        started = time.monotonic()
        cache.set("k2", b"x")  # background: returns at once
        bus.publish({"type": "collection", "name": "c"})
        writes_took = time.monotonic() - started
        got = await cache.get("missing")  # a worker thread waits out the timeout; the loop keeps going
        beat.cancel()
        return got, ticks, writes_took

    got, ticks, writes_took = asyncio.run(main())
    assert got is None
    assert writes_took < 0.5  # a write on the loop would have waited for the 1 s timeout
    assert ticks >= 20  # the loop ran on while the read waited (about 1 s of 10 ms ticks)
    assert link.loop_calls == 0
    assert link.last_error is not None  # the outage was noticed


def test_a_call_made_on_the_event_loop_is_reported(redis_server):
    link = RedisLink(redis_server.url)

    async def misuse() -> None:
        link.call(lambda c: c.ping())

    asyncio.run(misuse())
    assert link.loop_calls == 1
