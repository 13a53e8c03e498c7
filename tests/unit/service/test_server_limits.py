"""The body budget's accounting (first come first served, timeouts, cancellation) and the connection gate's
counting, without a server (tests/integration/test_limits.py runs them under uvicorn)."""

from __future__ import annotations

import asyncio
import resource
import subprocess
import sys

import pytest

from uniadapter_serve.errors import ServerBusyError
from uniadapter_serve.service.body_budget import BodyBudget, BodyBudgetBusyError
from uniadapter_serve.service.server_limits import ConnectionGate, ReadLimits, client_key


def test_waiters_are_served_first_come_first_served_and_never_past_the_capacity() -> None:
    async def run() -> list[str]:
        budget = BodyBudget(100)
        order: list[str] = []
        assert await budget.acquire(60, timeout=1) == 60

        async def take(name: str, size: int) -> None:
            await budget.acquire(size, timeout=10)
            order.append(name)
            assert budget.used <= budget.capacity

        big = asyncio.create_task(take("big", 80))
        await asyncio.sleep(0)
        small = asyncio.create_task(take("small", 10))  # fits now, but the big one came first
        await asyncio.sleep(0)
        assert budget.waiting == 2 and order == []
        budget.release(60)
        await asyncio.gather(big, small)  # both fit now: the big one first
        assert budget.used == 90 and budget.peak == 90
        return order

    assert asyncio.run(run()) == ["big", "small"]


def test_a_waiter_that_times_out_gets_503_and_takes_nothing() -> None:
    async def run() -> BodyBudget:
        budget = BodyBudget(100)
        await budget.acquire(100, timeout=1)
        with pytest.raises(BodyBudgetBusyError) as caught:
            await budget.acquire(1, timeout=0)
        assert isinstance(caught.value, ServerBusyError) and caught.value.retry_after == 1.0
        assert caught.value.status_code == 503 and caught.value.headers == {"Retry-After": "1"}
        assert "body budget" in str(caught.value) and not str(caught.value).startswith("503")
        return budget

    budget = asyncio.run(run())
    assert (budget.used, budget.waiting, budget.timeouts, budget.waited) == (100, 0, 1, 1)


def test_a_cancelled_waiter_leaves_the_queue_and_lets_the_next_one_in() -> None:
    async def run() -> BodyBudget:
        budget = BodyBudget(100)
        await budget.acquire(50, timeout=1)
        blocked = asyncio.create_task(budget.acquire(80, timeout=10))
        await asyncio.sleep(0)
        behind = asyncio.create_task(budget.acquire(40, timeout=10))
        await asyncio.sleep(0)
        blocked.cancel()  # the client went away
        with pytest.raises(asyncio.CancelledError):
            await blocked
        assert await behind == 40
        return budget

    budget = asyncio.run(run())
    assert (budget.used, budget.waiting, budget.timeouts) == (90, 0, 0)


def test_a_body_larger_than_the_budget_is_charged_all_of_it() -> None:
    async def run() -> tuple[int, int]:
        budget = BodyBudget(100)
        return await budget.acquire(500, timeout=1), budget.used

    assert asyncio.run(run()) == (100, 100)


def test_connections_are_counted_per_client_and_refused_past_the_caps() -> None:
    gate = ConnectionGate(ReadLimits(max_connections=3, max_per_client=2))
    assert gate.admit("a") is None and gate.admit("a") is None
    assert "MAX_CONNECTIONS_PER_CLIENT" in (gate.admit("a") or "")
    assert gate.admit("b") is None
    assert "MAX_CONNECTIONS" in (gate.admit("c") or "")
    assert (gate.open, gate.per_client) == (3, {"a": 2, "b": 1})
    assert gate.refused == {"total": 1, "per_client": 1, "evicted": 0}
    gate.leave("a")
    gate.leave("b")
    assert (gate.open, gate.per_client) == (1, {"a": 1})
    assert gate.admit("c") is None


class FakeConnection:
    def __init__(self, gate: ConnectionGate, key: str) -> None:
        self.gate, self.key, self.evicted = gate, key, ""

    def evict(self, reason: str) -> None:
        self.evicted = reason
        self.gate.leave(self.key)


def test_a_full_server_evicts_the_oldest_connection_still_sending_headers() -> None:
    gate = ConnectionGate(ReadLimits(max_connections=3))
    slow = [FakeConnection(gate, f"slow{i}") for i in range(3)]
    for conn in slow:
        assert gate.admit(conn.key) is None
        gate.sending_headers(conn, True)
    gate.sending_headers(slow[0], False)  # its headers arrived: it is being served, not evictable
    gate.sending_headers(slow[0], True)  # the next request on it started: now the youngest
    assert gate.admit("new") is None
    assert slow[1].evicted and not slow[0].evicted and not slow[2].evicted
    assert "MAX_CONNECTIONS" in slow[1].evicted
    assert (gate.open, gate.refused["evicted"], gate.refused["total"]) == (3, 1, 0)
    for conn in (slow[2], slow[0]):
        gate.sending_headers(conn, False)  # both busy now
    assert "MAX_CONNECTIONS" in (gate.admit("late") or "")  # nobody to evict: refused
    assert gate.refused == {"total": 1, "per_client": 0, "evicted": 1}


def test_no_caps_admit_everything() -> None:
    gate = ConnectionGate(ReadLimits())
    assert all(gate.admit("a") is None for _ in range(10_000))


@pytest.mark.parametrize(("client", "key"), [
    (("203.0.113.7", 5000), "203.0.113.7"),
    (("2001:db8:1:2:aaaa::1", 5000), "2001:db8:1:2::/64"),  # one host gets a whole /64
    (("2001:db8:1:2:bbbb::9", 5001), "2001:db8:1:2::/64"),
    (("::ffff:203.0.113.7", 5000), "203.0.113.7"),
    (None, ""),
])
def test_client_key(client: tuple[str, int] | None, key: str) -> None:
    assert client_key(client) == key


def _file_limit_after(soft: int, hard: int, max_connections: int) -> subprocess.CompletedProcess[str]:
    code = (f"import logging, resource; logging.basicConfig(); resource.setrlimit(resource.RLIMIT_NOFILE, "
            f"({soft}, {hard})); from uniadapter_serve.service.server_limits import raise_file_limit; "
            f"raise_file_limit({max_connections}); print(resource.getrlimit(resource.RLIMIT_NOFILE)[0])")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)


def test_the_open_file_limit_is_raised_to_the_hard_limit() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard < 2000:
        pytest.skip(f"hard open-file limit {hard}")
    run = _file_limit_after(256, hard, 1000)
    assert int(run.stdout) == hard and "open-file limit" not in run.stderr


def test_a_hard_limit_under_max_connections_is_named() -> None:
    run = _file_limit_after(128, 512, 1000)
    assert int(run.stdout) == 512
    assert "open-file limit 512 is under MAX_CONNECTIONS (1000)" in run.stderr
