"""The decode budget: pixels all decodes hold at once, first come first served within a class; bulk work
(collection adds, re-indexing, thumbnails) within its share, behind task decodes for its patience."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any

import pytest
from support.waiting import until

from uniadapter_serve.errors import DeadlineExceededError, MediaTooLargeError, ServerBusyError
from uniadapter_serve.model.media.budget import DecodeBudget


def wait_for(condition, timeout: float = 10.0) -> None:
    until(condition, "the budget's state", timeout, every=0.001)


class Clock:
    """A clock the test moves by hand (patience is measured on it)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def held(budget: DecodeBudget) -> dict[str, int]:
    return budget.state().held


def waiting(budget: DecodeBudget) -> dict[str, int]:
    return budget.state().waiting


def run(main: Coroutine[Any, Any, None]) -> None:
    asyncio.run(asyncio.wait_for(main, 10))


class Waiters:
    """Async waiters that record the order in which they got their pixels (granting happens under the budget's
    lock at release time, so the order is decided there, whatever order the tasks resume in)."""

    def __init__(self, budget: DecodeBudget) -> None:
        self.budget = budget
        self.tasks: dict[str, asyncio.Task[None]] = {}

    async def add(self, name: str, pixels: int, *, bulk: bool = False, timeout: float = 10.0) -> None:
        before = self.budget.state().waiting
        self.tasks[name] = asyncio.ensure_future(self.budget.acquire_async(pixels, timeout, name, bulk=bulk))
        await asyncio.sleep(0)  # the task runs up to its first wait: queued (or granted at once)
        assert self.tasks[name].done() or sum(self.budget.state().waiting.values()) == sum(before.values()) + 1

    def granted(self) -> set[str]:
        return {name for name, task in self.tasks.items() if task.done() and task.exception() is None}

    async def finish(self) -> None:
        await asyncio.gather(*self.tasks.values())


# -- one class -----------------------------------------------------------------------------------

def test_budget_serves_waiters_first_come_first_served():
    budget = DecodeBudget(100)
    order: list[str] = []
    budget.acquire(80, 1.0)

    def take(name: str, pixels: int) -> None:
        budget.acquire(pixels, 10.0)
        order.append(name)
        budget.release(pixels)

    big = threading.Thread(target=take, args=("big", 95))  # big and small never fit together: a strict order
    big.start()
    wait_for(lambda: budget.waiting == 1)
    small = threading.Thread(target=take, args=("small", 10))  # would fit now, but the big one waits ahead
    small.start()
    wait_for(lambda: budget.waiting == 2)
    assert order == [] and budget.used == 80
    budget.release(80)
    big.join(10)
    small.join(10)
    assert order == ["big", "small"] and budget.used == 0 and budget.waited == 2


def test_budget_refuses_what_can_never_fit_and_times_out_with_nothing_taken():
    budget = DecodeBudget(100)
    with pytest.raises(MediaTooLargeError, match="over the decode budget"):
        budget.acquire(101, 1.0, "image")
    with pytest.raises(MediaTooLargeError, match="over the decode budget"):
        budget.acquire(101, 1.0, "image", bulk=True)
    budget.acquire(60, 1.0)
    with pytest.raises(ServerBusyError, match="decode budget") as busy:
        budget.acquire(50, 0.05, "image")
    assert busy.value.retry_after >= 1
    assert budget.used == 60 and budget.waiting == 0 and budget.timeouts == 1
    with budget.hold(40, 0.0):  # what timed out took nothing: the rest still fits
        assert budget.used == 100
    assert budget.used == 60


@pytest.mark.parametrize("bulk", [False, True])
def test_async_waiters_hold_no_thread_and_leave_cleanly_when_cancelled(bulk):
    budget = DecodeBudget(10)

    async def main() -> list[str]:
        got: list[str] = []
        budget.acquire(10, 0.0)

        async def take(name: str) -> None:
            async with budget.hold_async(6, 10.0, bulk=bulk):
                got.append(name)

        first = asyncio.ensure_future(take("first"))
        cancelled = asyncio.ensure_future(take("cancelled"))
        last = asyncio.ensure_future(take("last"))
        await asyncio.sleep(0)
        assert budget.waiting == 3
        cancelled.cancel()
        await asyncio.gather(cancelled, return_exceptions=True)
        assert budget.waiting == 2
        await asyncio.get_running_loop().run_in_executor(None, budget.release, 10)  # released from a thread
        await asyncio.gather(first, last)
        return got

    assert asyncio.run(main()) == ["first", "last"]
    assert budget.used == 0 and budget.waiting == 0 and held(budget) == {"task": 0, "bulk": 0}


# -- bulk work beside task decodes ------------------------------------------------------------------

def test_bulk_work_holds_at_most_its_share_and_task_decodes_get_the_rest_at_once():
    budget = DecodeBudget(100, bulk_share=0.5)  # no patience: a later task is behind earlier bulk waiters in line

    async def main() -> None:
        w = Waiters(budget)
        await w.add("b1", 30, bulk=True)
        await w.add("b2", 30, bulk=True)  # 60 > the share of 50
        await w.add("b3", 10, bulk=True)  # would fit the share, but b2 waits ahead of it
        assert w.granted() == {"b1"} and waiting(budget) == {"task": 0, "bulk": 2}
        budget.acquire(70, 0.0)  # a task decode: granted at once, past the bulk queue (tasks have the rest)
        assert held(budget) == {"task": 70, "bulk": 30}
        budget.release(70)
        assert held(budget) == {"task": 0, "bulk": 30}  # the bulk queue still waits for its share, not for room
        budget.release(30, bulk=True)
        assert held(budget) == {"task": 0, "bulk": 40} and waiting(budget)["bulk"] == 0  # b2 then b3
        for name in ("b2", "b3"):
            await w.tasks[name]
        budget.release(40, bulk=True)
        assert budget.state().waited == {"task": 0, "bulk": 2}

    run(main())
    assert budget.used == 0


def test_one_bulk_decode_larger_than_the_share_runs_alone():
    budget = DecodeBudget(100, bulk_share=0.3)

    async def main() -> None:
        w = Waiters(budget)
        await w.add("small", 10, bulk=True)
        await w.add("large", 40, bulk=True)  # over the share of 30: waits until no bulk decode holds any
        await w.add("after", 10, bulk=True)  # first come, first served: behind the large one
        assert w.granted() == {"small"}
        budget.release(10, bulk=True)
        assert held(budget)["bulk"] == 40 and waiting(budget)["bulk"] == 1
        budget.acquire(60, 0.0)  # tasks still have what it leaves
        budget.release(60)
        budget.release(40, bulk=True)
        assert held(budget)["bulk"] == 10
        await w.tasks["after"]
        budget.release(10, bulk=True)

    run(main())


def test_task_decodes_go_first():
    budget = DecodeBudget(100, bulk_patience=3600)  # bulk never out-waits its patience here

    async def main() -> None:
        w = Waiters(budget)
        budget.acquire(100, 0.0)
        await w.add("bulk", 60, bulk=True)
        await w.add("task", 60)  # came later, served first
        budget.release(100)
        assert held(budget) == {"task": 60, "bulk": 0} and waiting(budget) == {"task": 0, "bulk": 1}
        await w.tasks["task"]
        budget.release(60)
        assert held(budget) == {"task": 0, "bulk": 60}
        await w.tasks["bulk"]
        budget.release(60, bulk=True)

    run(main())


def test_a_waiting_task_holds_back_bulk_work_that_would_fit():
    budget = DecodeBudget(100, bulk_patience=3600)

    async def main() -> None:
        w = Waiters(budget)
        budget.acquire(60, 0.0)
        await w.add("big-task", 50)  # cannot fit beside the 60 held: it waits ...
        await w.add("small-bulk", 10, bulk=True)  # ... and bulk work that would fit now waits behind it
        assert waiting(budget) == {"task": 1, "bulk": 1} and held(budget) == {"task": 60, "bulk": 0}
        budget.release(60)
        assert held(budget) == {"task": 50, "bulk": 10}
        await w.finish()
        budget.release(50)
        budget.release(10, bulk=True)

    run(main())


def test_bulk_work_that_waited_out_its_patience_is_in_line_with_later_tasks():
    clock = Clock()
    budget = DecodeBudget(100, bulk_patience=5, clock=clock)

    async def main() -> None:
        w = Waiters(budget)
        budget.acquire(100, 0.0)
        await w.add("bulk", 60, bulk=True)  # at t=0: in line as of t=5
        clock.now = 1
        await w.add("early-task", 60)  # at t=1: ahead of the bulk waiter
        clock.now = 6
        await w.add("late-task", 60)  # at t=6: behind it (a stream of tasks cannot starve bulk work)
        budget.release(100)
        assert held(budget) == {"task": 60, "bulk": 0}
        await w.tasks["early-task"]
        budget.release(60)
        assert held(budget) == {"task": 0, "bulk": 60} and waiting(budget) == {"task": 1, "bulk": 0}
        await w.tasks["bulk"]
        budget.release(60, bulk=True)
        await w.tasks["late-task"]
        budget.release(60)

    run(main())
    assert budget.used == 0 and budget.state().waited == {"task": 2, "bulk": 1}


def test_a_bulk_waiter_held_back_by_its_share_never_holds_up_a_task_even_after_its_patience():
    clock = Clock()
    budget = DecodeBudget(100, bulk_share=0.5, bulk_patience=5, clock=clock)

    async def main() -> None:
        w = Waiters(budget)
        budget.acquire(50, 0.0, bulk=True)
        await w.add("bulk", 20, bulk=True)  # over the share: waits for bulk work to end, not for tasks
        clock.now = 100
        budget.acquire(50, 0.0)  # long after its patience: a task still goes at once
        assert waiting(budget) == {"task": 0, "bulk": 1}
        budget.release(50, bulk=True)
        await w.tasks["bulk"]
        budget.release(20, bulk=True)
        budget.release(50)

    run(main())


def test_bulk_work_that_outlives_its_deadline_is_504_naming_the_share_and_takes_nothing():
    budget = DecodeBudget(100, bulk_share=0.5)
    budget.acquire(50, 0.0, bulk=True)
    with pytest.raises(DeadlineExceededError, match=r"deadline passed .*\(bulk work may hold 50 of its 100") as e:
        budget.acquire(10, 0.01, "items[3]", bulk=True)
    assert str(e.value).startswith("items[3]:")
    state = budget.state()
    assert state.held == {"task": 0, "bulk": 50} and state.timeouts == {"task": 0, "bulk": 1}
    assert sum(state.waiting.values()) == 0
    budget.release(50, bulk=True)
    with budget.hold(50, 0.0, bulk=True):  # the share is whole again
        assert held(budget)["bulk"] == 50


@pytest.mark.parametrize(("share", "patience"), [(0.0, 0.0), (1.5, 0.0), (0.5, -1.0)])
def test_bad_shares_and_patience_are_refused(share, patience):
    with pytest.raises(ValueError, match="bulk"):
        DecodeBudget(100, bulk_share=share, bulk_patience=patience)
