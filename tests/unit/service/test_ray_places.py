"""SetPlaces: a model replica's places for adapter sets, each held for a turn. A fake clock decides when a
turn is over; the real event loop only runs the requests (no assertion depends on how long anything takes)."""

from __future__ import annotations

import asyncio

import pytest

from uniadapter_serve.errors import ServerBusyError
from uniadapter_serve.service.ray_places import SetPlaces

TURN_S = 0.01  # the loop's re-check interval follows it; the fake clock alone says when a turn is over


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def settle() -> None:
    """Let every ready callback and task on the loop run."""
    for _ in range(20):
        await asyncio.sleep(0)


async def until(check, what: str) -> None:
    for _ in range(100_000):
        if check():
            return
        await asyncio.sleep(0.001)
    raise AssertionError(what)


def test_sets_up_to_the_places_run_at_once_and_the_next_waits_for_a_turn_to_end():
    async def main() -> None:
        clock = Clock()
        places = SetPlaces(2, TURN_S, clock)
        await places.enter("a", wait_s=60)
        await places.enter("b", wait_s=60)
        await places.enter("a", wait_s=60)  # a set that holds a place takes more requests at once
        assert places.held() == {"a": 2, "b": 1}
        c = asyncio.create_task(places.enter("c", wait_s=60))
        for ref in ("a", "a", "b"):
            places.leave(ref)
        await settle()
        assert not c.done() and places.held() == {"a": 0, "b": 0}  # idle, but their turns are not over
        clock.now = 1.0
        await until(c.done, "c got a place once the turns were over")
        assert set(places.held()) == {"b", "c"}  # one place changed hands: a's, the least recently used
        assert places.stats == {"place_turns": 3, "place_waits": 1}

    asyncio.run(main())


def test_a_turn_over_finishes_its_running_requests_and_takes_no_new_ones_while_others_wait():
    async def main() -> None:
        clock = Clock()
        places = SetPlaces(1, TURN_S, clock)
        await places.enter("a", wait_s=60)
        b = asyncio.create_task(places.enter("b", wait_s=60))
        clock.now = 1.0
        await settle()
        a_again = asyncio.create_task(places.enter("a", wait_s=60))  # a's turn is over: it queues behind b
        await settle()
        assert not b.done() and not a_again.done() and places.held() == {"a": 1}
        places.leave("a")  # a's running request ends: the place is b's
        await until(b.done, "b got the place")
        assert places.held() == {"b": 1} and not a_again.done()
        clock.now = 2.0
        places.leave("b")
        await until(a_again.done, "a got its next turn")
        assert places.held() == {"a": 1} and places.waiting() == 0

    asyncio.run(main())


def test_a_request_that_waits_past_its_share_of_the_deadline_is_shed_with_retry_after():
    async def main() -> None:
        places = SetPlaces(1, 5.0, Clock())
        await places.enter("a", wait_s=60)
        with pytest.raises(ServerBusyError) as caught:
            await places.enter("b", wait_s=0.01)
        assert caught.value.retry_after == 5.0 and "b waited" in str(caught.value)
        assert places.held() == {"a": 1} and places.waiting() == 0 and places.stats["place_sheds"] == 1

    asyncio.run(main())


def test_a_cancelled_waiter_leaves_nothing_behind():
    async def main() -> None:
        clock = Clock()
        places = SetPlaces(1, TURN_S, clock)
        await places.enter("a", wait_s=60)
        b = asyncio.create_task(places.enter("b", wait_s=60))
        await settle()
        b.cancel()
        await settle()
        assert b.cancelled() and places.waiting() == 0
        clock.now = 1.0
        places.leave("a")
        await places.enter("c", wait_s=60)  # a's turn is over and it is idle: c takes its place
        assert places.held() == {"c": 1}

    asyncio.run(main())


def test_more_sets_than_places_are_served_in_turns_not_cycled():
    """4 sets, 2 places, every set asking all the time: each turn of the clock moves at most 2 places, and
    every set gets served."""

    async def main() -> None:
        clock = Clock()
        places = SetPlaces(2, TURN_S, clock)
        served: dict[str, int] = dict.fromkeys("pqrs", 0)
        done = asyncio.Event()

        async def client(ref: str) -> None:
            while not done.is_set():
                await places.enter(ref, wait_s=60)
                served[ref] += 1
                await asyncio.sleep(0)
                places.leave(ref)

        clients = [asyncio.create_task(client(ref)) for ref in served for _ in range(2)]
        for tick in range(1, 9):
            await until(lambda: places.waiting() > 0, "the other sets wait")
            clock.now = float(tick)
            await until(lambda t=tick: places.stats["place_turns"] >= 2 + 2 * t, f"places moved at tick {tick}")
            assert places.stats["place_turns"] <= 2 + 2 * tick
        done.set()
        clock.now = 100.0
        await asyncio.gather(*clients)
        assert all(n > 0 for n in served.values()), served

    asyncio.run(main())
