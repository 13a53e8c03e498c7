"""Redis never runs on the event loop: against a real redis-server, healthy and hung (SIGSTOP)."""

from __future__ import annotations

import asyncio
import signal

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

    async def main() -> tuple[bytes | None, int]:
        cache.set("k2", b"x")  # background: returns at once
        bus.publish({"type": "collection", "name": "c"})
        read = asyncio.ensure_future(cache.get("missing"))  # a worker thread waits out the timeout
        turns = 0
        while not read.done():  # ... while the loop keeps going
            turns += 1
            await asyncio.sleep(0.01)
        return await read, turns

    got, turns = asyncio.run(main())
    assert got is None
    # No Redis call ran on the loop thread (each would have stalled it for the whole timeout): the link counts
    # calls made where an event loop runs, so this holds however slow the machine is.
    assert link.loop_calls == 0
    assert turns >= 2  # the loop took turns while the read was pending (it took the 1 s timeout)
    assert link.last_error is not None  # the outage was noticed


def test_a_call_made_on_the_event_loop_is_reported(redis_server):
    link = RedisLink(redis_server.url)

    async def misuse() -> None:
        link.call(lambda c: c.ping())

    asyncio.run(misuse())
    assert link.loop_calls == 1
