"""Request phase timing: spans merge into wall time per phase, and the header says the same."""

from __future__ import annotations

import asyncio

from uniadapter_serve.service import timing
from uniadapter_serve.service.timing import RequestTiming


def test_overlapping_spans_count_once():
    t = RequestTiming()
    t.add("queue", 0.0, 1.0)
    t.add("queue", 0.5, 1.5)  # overlaps the first
    t.add("queue", 3.0, 4.0)
    t.add("queue", 3.2, 3.8)  # inside the third
    t.add("compute", 1.5, 1.75)
    t.add("decode", 2.0, 2.0)  # empty: ignored
    assert t.durations() == {"queue": 2.5, "compute": 0.25}
    assert t.header(5.0) == "queue;dur=2500.0, compute;dur=250.0, total;dur=5000.0"


def test_spans_record_into_the_request_of_their_context_only():
    async def job(phase: str) -> None:
        with timing.span(phase):
            await asyncio.sleep(0)

    async def request() -> dict[str, float]:
        with timing.request_scope() as t:
            await asyncio.gather(job("decode"), job("decode"), asyncio.to_thread(lambda: None))
            async with asyncio.timeout(5):
                await asyncio.create_task(job("compute"))  # a task started by the request records into it
        return t.durations()

    async def main() -> tuple[dict[str, float], dict[str, float]]:
        a, b = await asyncio.gather(request(), request())
        return a, b

    first, second = asyncio.run(main())
    assert set(first) == set(second) == {"decode", "compute"}
    assert timing.current() is None
    with timing.span("decode"):  # outside any request: nothing to record into, and no error
        pass
