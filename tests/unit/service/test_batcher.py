"""The batcher alone: batch closing, mixing sets, 429, 504, dropped cancellations, per-sample failures.

The handler is a deterministic function of the payload (as in LitServe's tests), so these tests pin the
batching logic; the model-backed handlers are tested through the HTTP service.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from uniadapter_serve.adapters.manager import AdapterManager
from uniadapter_serve.errors import AdapterNotFoundError, DeadlineExceededError, OverloadedError
from uniadapter_serve.service.batcher import Batcher
from uniadapter_serve.service.metrics import ServiceMetrics


class Recorder:
    def __init__(self) -> None:
        self.batches: list[list[tuple[object, str | None]]] = []
        self.routes: list[int] = []
        self.started = 0
        """batches the model thread has taken (counted before the gate)"""
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, jobs, routing):
        self.started += 1
        self.gate.wait(10)
        self.batches.append([(j.payload, j.adapter) for j in jobs])
        self.routes.append(len(routing.routes))
        if any(j.payload == "boom" for j in jobs):
            raise ValueError("boom")
        return [j.payload * 2 for j in jobs]


@pytest.fixture
def manager(backbone, tmp_path):
    from uniadapter_serve.adapters.format import BackboneInfo
    from uniadapter_serve.adapters.registry import AdapterRegistry
    from uniadapter_serve.model.testing import random_adapter
    from uniadapter_serve.model.uniadapter import UniAdapterConfig

    registry = AdapterRegistry(tmp_path / "adapters")
    for i, name in enumerate("ab"):
        registry.publish(random_adapter(backbone, UniAdapterConfig.for_task("vqa", bottleneck=4), seed=i), name,
                         BackboneInfo.of(backbone))
    return AdapterManager(backbone, registry, device_budget_bytes=1 << 30, cpu_budget_bytes=0, wait_timeout_s=0)


async def until(condition, what: str, timeout: float = 10.0) -> None:
    """Wait for the batcher's (or the model thread's) own state, with a deadline."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.002)


def make(manager, recorder, **kw):
    opts = {"max_batch_size": 4, "max_wait_ms": 1000.0, "max_queue": 64} | kw
    batcher = Batcher(manager, {"s": recorder}, metrics=ServiceMetrics(), **opts)
    batcher.start()
    return batcher


def refs(manager):
    return manager.registry.resolve("a").ref, manager.registry.resolve("b").ref


NEVER_MS = 3_600_000.0
"""a max_wait_ms no test outlives: a batch that closes did so for another reason"""


def test_batch_closes_at_max_batch_size(manager):
    rec = Recorder()
    batcher = make(manager, rec, max_batch_size=4, max_wait_ms=NEVER_MS)

    async def main():
        deadline = time.monotonic() + 30
        return await asyncio.wait_for(asyncio.gather(*(batcher.submit("s", i, None, deadline) for i in range(4))),
                                      30)

    out = asyncio.run(main())
    batcher.stop()
    assert out == [0, 2, 4, 6]
    assert [len(b) for b in rec.batches] == [4]


def test_batch_closes_after_max_wait(manager):
    """Three jobs, far from the batch size and outside any admitted request: they run once the oldest has
    waited max_wait_ms (held until all three are queued, so a slow event loop cannot split them)."""
    rec = Recorder()
    batcher = make(manager, rec, max_batch_size=100, max_wait_ms=50)

    async def main():
        with batcher.hold("s"):
            jobs = [asyncio.ensure_future(batcher.submit("s", i, None, time.monotonic() + 30)) for i in range(3)]
            await until(lambda: batcher.queued("s") == 3, "three queued jobs")
        return await asyncio.gather(*jobs)

    assert asyncio.run(main()) == [0, 2, 4]
    batcher.stop()
    assert [len(b) for b in rec.batches] == [3]


def test_a_held_stage_runs_nothing_until_released(manager):
    """The test hook: holds nest, nothing of a held stage runs (its jobs stay queued), leaving the last hold
    runs them as one batch; a stopping batcher ignores holds (it drains)."""
    rec = Recorder()
    batcher = make(manager, rec, max_batch_size=8, max_wait_ms=0)

    async def main():
        with batcher.hold("s"):
            with batcher.hold("s"):
                jobs = [asyncio.ensure_future(batcher.submit("s", i, None, time.monotonic() + 30)) for i in (1, 2)]
                await until(lambda: batcher.queued("s") == 2, "two queued jobs")
            assert batcher.queued("s") == 2 and rec.started == 0 and not any(j.done() for j in jobs)
        first = await asyncio.gather(*jobs)
        with batcher.hold("s"):
            late = asyncio.ensure_future(batcher.submit("s", 3, None, time.monotonic() + 30))
            await until(lambda: batcher.queued("s") == 1, "the job queued")
            await asyncio.get_running_loop().run_in_executor(None, batcher.stop)  # drains despite the hold
            return first, await late

    assert asyncio.run(main()) == ([2, 4], 6)
    assert [len(b) for b in rec.batches] == [2, 1]
    with pytest.raises(ValueError, match="no such stage"), batcher.hold("t"):
        pass


def test_one_batch_mixes_adapter_sets_and_bare(manager):
    rec = Recorder()
    batcher = make(manager, rec, max_batch_size=3, max_wait_ms=NEVER_MS)
    a, b = refs(manager)

    async def main():
        d = time.monotonic() + 10
        return await asyncio.gather(batcher.submit("s", 1, a, d), batcher.submit("s", 2, b, d),
                                    batcher.submit("s", 3, None, d))

    assert asyncio.run(main()) == [2, 4, 6]
    batcher.stop()
    assert rec.batches == [[(1, a), (2, b), (3, None)]]
    assert rec.routes == [2]  # two sets routed, the bare sample untouched
    assert batcher.metrics.registry.get_sample_value("uniadapter_mixed_batches_total", {"stage": "s"}) == 1


def test_queue_full_answers_overloaded_with_retry_after(manager):
    rec = Recorder()
    rec.gate.clear()  # the model thread blocks inside the first batch
    batcher = make(manager, rec, max_batch_size=1, max_wait_ms=0, max_queue=2)

    async def main():
        d = time.monotonic() + 10
        first = asyncio.ensure_future(batcher.submit("s", 1, None, d))
        await until(lambda: rec.started == 1, "the model thread to take the first job")
        queued = [asyncio.ensure_future(batcher.submit("s", i, None, d)) for i in (2, 3)]
        await until(lambda: batcher.queued() == 2, "two queued jobs")
        with pytest.raises(OverloadedError) as err:
            await batcher.submit("s", 4, None, d)
        rec.gate.set()
        return err.value, await first, await asyncio.gather(*queued)

    error, first, rest = asyncio.run(main())
    batcher.stop()
    assert error.retry_after >= 1 and "queue full" in str(error)
    assert first == 2 and rest == [4, 6]  # accepted work still completes
    assert batcher.metrics.registry.get_sample_value("uniadapter_rejected_total", {"reason": "queue_full"}) == 1


def test_deadline_passes_while_queued(manager):
    rec = Recorder()
    rec.gate.clear()
    batcher = make(manager, rec, max_batch_size=1, max_wait_ms=0)

    async def main():
        blocker = asyncio.ensure_future(batcher.submit("s", 1, None, time.monotonic() + 10))
        await until(lambda: rec.started == 1, "the model thread to take the blocker")
        with pytest.raises(DeadlineExceededError):
            await batcher.submit("s", 2, None, time.monotonic() + 0.1)
        rec.gate.set()
        return await blocker

    assert asyncio.run(main()) == 2
    batcher.stop()
    assert all(payload != 2 for batch in rec.batches for payload, _ in batch)  # never computed


def test_cancelled_requests_are_dropped_before_compute(manager):
    rec = Recorder()
    rec.gate.clear()
    batcher = make(manager, rec, max_batch_size=1, max_wait_ms=0)

    async def main():
        d = time.monotonic() + 10
        blocker = asyncio.ensure_future(batcher.submit("s", 1, None, d))
        await until(lambda: rec.started == 1, "the model thread to take the blocker")
        gone = asyncio.ensure_future(batcher.submit("s", 99, None, d))
        await until(lambda: batcher.queued() == 1, "the job to be queued")
        gone.cancel()  # what Starlette does when the client disconnects
        await until(gone.done, "the cancellation to land")
        rec.gate.set()
        return await blocker, await batcher.submit("s", 3, None, d)

    assert asyncio.run(main()) == (2, 6)
    batcher.stop()
    assert [p for batch in rec.batches for p, _ in batch] == [1, 3]
    assert batcher.metrics.registry.get_sample_value("uniadapter_rejected_total", {"reason": "cancelled"}) == 1


def test_a_failing_sample_fails_only_its_own_request(manager):
    rec = Recorder()
    batcher = make(manager, rec, max_batch_size=3, max_wait_ms=NEVER_MS)

    async def main():
        d = time.monotonic() + 10
        return await asyncio.gather(*(batcher.submit("s", p, None, d) for p in (1, "boom", 3)),
                                    return_exceptions=True)

    ok1, bad, ok3 = asyncio.run(main())
    batcher.stop()
    assert ok1 == 2 and ok3 == 6 and isinstance(bad, ValueError)
    assert [len(b) for b in rec.batches] == [3, 1, 1, 1]  # one batch of three, then re-run one by one


def test_unknown_adapter_fails_only_its_jobs(manager):
    rec = Recorder()
    batcher = make(manager, rec, max_batch_size=2, max_wait_ms=NEVER_MS)
    a, _ = refs(manager)

    async def main():
        d = time.monotonic() + 10
        return await asyncio.gather(batcher.submit("s", 1, a, d), batcher.submit("s", 2, "zzz@0000", d),
                                    return_exceptions=True)

    good, bad = asyncio.run(main())
    batcher.stop()
    assert good == 2 and isinstance(bad, AdapterNotFoundError)
    assert rec.batches == [[(1, a)]]  # the batch of both ran without the unknown set's job


def test_stop_drains_queued_work_then_refuses(manager):
    rec = Recorder()
    batcher = make(manager, rec, max_batch_size=2, max_wait_ms=200)

    async def main():
        d = time.monotonic() + 10
        jobs = [asyncio.ensure_future(batcher.submit("s", i, None, d)) for i in range(5)]
        await asyncio.sleep(0)  # each task runs to its first await: all five are queued
        await asyncio.get_running_loop().run_in_executor(None, batcher.stop)
        with pytest.raises(OverloadedError, match="shutting down"):
            await batcher.submit("s", 9, None, d)
        return await asyncio.gather(*jobs)

    assert asyncio.run(main()) == [0, 2, 4, 6, 8]


def test_a_request_larger_than_the_queue_is_admitted_whole_when_the_queue_is_empty(manager):
    rec = Recorder()
    batcher = make(manager, rec, max_batch_size=4, max_wait_ms=0, max_queue=2)

    async def main():
        d = time.monotonic() + 10
        with batcher.admit(6):
            return await asyncio.gather(*(batcher.submit("s", i, None, d) for i in range(6)))

    assert asyncio.run(main()) == [0, 2, 4, 6, 8, 10]
    batcher.stop()


def test_admission_counts_reserved_jobs_and_refuses_what_does_not_fit(manager):
    rec = Recorder()
    rec.gate.clear()
    batcher = make(manager, rec, max_batch_size=1, max_wait_ms=0, max_queue=4)

    async def main():
        d = time.monotonic() + 10
        blocker = asyncio.ensure_future(batcher.submit("s", 1, None, d))
        await until(lambda: rec.started == 1, "the model thread to take the blocker")
        queued = asyncio.ensure_future(batcher.submit("s", 2, None, d))
        await until(lambda: batcher.queued() == 1, "one queued job")
        with pytest.raises(OverloadedError, match="limit 4"):
            batcher.admit(4)  # 1 queued + 4 > 4, and the queue is not empty
        admission = batcher.admit(2)  # 1 + 2 fit: two places reserved, nothing queued yet
        other = asyncio.ensure_future(batcher.submit("s", 3, None, d))  # 1 queued + 2 reserved + 1 = 4: fits
        await until(lambda: batcher.queued() == 2, "the other request's job")
        with pytest.raises(OverloadedError):
            await batcher.submit("s", 6, None, d)  # 2 queued + 2 reserved: full
        with admission:  # the admitted request's jobs take their reserved places, never 429
            admitted = [asyncio.ensure_future(batcher.submit("s", i, None, d)) for i in (4, 5)]
            await asyncio.sleep(0)
        assert batcher.queued() == 4
        rec.gate.set()
        return await blocker, await queued, await other, await asyncio.gather(*admitted)

    assert asyncio.run(main()) == (2, 4, 6, [8, 10])
    batcher.stop()
    with pytest.raises(OverloadedError, match="shutting down"):
        batcher.admit(1)


def test_model_workers_run_batches_side_by_side(manager):
    """MODEL_WORKERS = 2: while one batch is held in compute, the other worker takes the next batch (leasing
    its own set) and finishes it; a batch alone gets every intra-op thread, one beside another its share."""
    release = threading.Event()
    inside = threading.Semaphore(0)
    threads: dict[str, int] = {}

    def handler(jobs, routing):
        threads[jobs[0].payload] = torch.get_num_threads()
        inside.release()
        if jobs[0].payload == "hold":
            assert release.wait(10)
        return [j.payload for j in jobs]

    a, b = refs(manager)
    batcher = Batcher(manager, {"s": handler}, metrics=ServiceMetrics(), max_batch_size=1, max_wait_ms=0,
                      max_queue=64, workers=2, threads=2)
    batcher.start()

    async def main():
        held = asyncio.ensure_future(batcher.submit("s", "hold", a, time.monotonic() + 20))
        await until(lambda: inside.acquire(blocking=False), "the first batch in compute")
        other = asyncio.ensure_future(batcher.submit("s", "next", b, time.monotonic() + 20))
        await until(other.done, "the second batch, on the other worker")
        assert not held.done()
        release.set()
        results = await held, await other
        await until(lambda: batcher.busy_workers == 0, "both workers idle")
        await batcher.submit("s", "later", None, time.monotonic() + 20)
        return results

    try:
        assert asyncio.run(main()) == ("hold", "next")
        assert threads == {"hold": 2, "next": 1, "later": 2}
    finally:
        release.set()
        batcher.stop()


def test_batches_too_small_to_split_run_on_one_thread(manager):
    """threads sized to the batch: one the `parallel` rule finds too small runs on one intra-op thread, the
    next large one on all of them again (the model thread's own setting, not the process's)."""
    seen: list[tuple[str, int]] = []

    def handler(jobs, routing):
        seen.append((jobs[0].payload, torch.get_num_threads()))
        return [j.payload for j in jobs]

    batcher = Batcher(manager, {"s": handler}, metrics=ServiceMetrics(), max_batch_size=1, max_wait_ms=0,
                      max_queue=64, threads=2, parallel=lambda stage, payloads: payloads[0] != "small")
    batcher.start()
    main_threads = torch.get_num_threads()

    async def main():
        for payload in ("big", "small", "big"):
            await batcher.submit("s", payload, None, time.monotonic() + 20)

    try:
        asyncio.run(main())
    finally:
        batcher.stop()
    assert seen == [("big", 2), ("small", 1), ("big", 2)]
    assert torch.get_num_threads() == main_threads


def test_under_load_batches_run_on_one_thread_and_a_lone_one_on_all(manager):
    """With more work queued behind a batch, it runs on one intra-op thread (the other cores serve other
    requests); the last one, with nothing behind it, gets every thread back."""
    seen: list[tuple[str, int]] = []
    release = threading.Event()

    def handler(jobs, routing):
        if jobs[0].payload == "hold":
            assert release.wait(10)
        seen.append((jobs[0].payload, torch.get_num_threads()))
        return [j.payload for j in jobs]

    batcher = Batcher(manager, {"s": handler}, metrics=ServiceMetrics(), max_batch_size=1, max_wait_ms=0,
                      max_queue=64, threads=2)
    batcher.start()

    async def main():
        held = asyncio.ensure_future(batcher.submit("s", "hold", None, time.monotonic() + 20))
        await until(lambda: batcher.busy_workers == 1, "the first batch in compute")
        rest = [asyncio.ensure_future(batcher.submit("s", p, None, time.monotonic() + 20)) for p in ("a", "b")]
        await until(lambda: batcher.queued() == 2, "two jobs queued behind it")
        release.set()
        await asyncio.gather(held, *rest)

    try:
        asyncio.run(main())
    finally:
        release.set()
        batcher.stop()
    assert seen == [("hold", 2), ("a", 1), ("b", 2)]


def test_a_lone_request_does_not_wait_for_company_but_waits_for_an_admitted_one(manager):
    """MAX_WAIT_MS is long here: a batch closes at once when every admitted request already has its job
    queued, and waits while another admitted request has yet to submit (it then joins the same batch)."""
    rec = Recorder()
    batcher = make(manager, rec, max_batch_size=8, max_wait_ms=30_000)

    async def lone():
        with batcher.admit(1):
            return await batcher.submit("s", 1, None, time.monotonic() + 20)

    async def pair():
        first = batcher.admit(1)
        second = batcher.admit(1)
        with first:
            a = asyncio.ensure_future(batcher.submit("s", 2, None, time.monotonic() + 20))
            await until(lambda: batcher.queued() == 1, "the first job queued")
            with second:  # admitted before the first job's batch closed: it waits for this one
                b = await batcher.submit("s", 3, None, time.monotonic() + 20)
            return await a, b

    try:
        assert asyncio.run(asyncio.wait_for(lone(), 10)) == 2  # not after 30 s
        assert asyncio.run(asyncio.wait_for(pair(), 10)) == (4, 6)
    finally:
        batcher.stop()
    assert [len(b) for b in rec.batches] == [1, 2]


def test_a_heavy_batch_is_shared_out_among_idle_workers(manager):
    """At one intra-op thread per worker, a batch of four heavy jobs closing while the other worker idles runs as
    two batches of two, side by side (each waits for the other at a barrier: run one after the other, they would
    time out); a batch whose share would be too light to be worth a core stays whole."""
    meet = threading.Barrier(2, timeout=10)
    seen: list[tuple[int, str]] = []

    def handler(jobs, routing):
        seen.append((len(jobs), threading.current_thread().name))
        if len(jobs) == 2 and jobs[0].payload != "light":
            meet.wait()
        return [j.payload for j in jobs]

    batcher = Batcher(manager, {"s": handler}, metrics=ServiceMetrics(), max_batch_size=8, max_wait_ms=0,
                      max_queue=64, workers=2, threads=1, parallel=lambda stage, payloads: len(payloads) >= 2)
    batcher.start()

    async def submit_all(payloads):
        with batcher.hold("s"):
            jobs = [asyncio.ensure_future(batcher.submit("s", p, None, time.monotonic() + 20)) for p in payloads]
            await until(lambda: batcher.queued("s") == len(payloads), "the jobs queued")
        return await asyncio.gather(*jobs)

    async def main():
        heavy = await submit_all([1, 2, 3, 4])
        light = await submit_all(["light", "light"])
        return heavy, light

    try:
        assert asyncio.run(main()) == ([1, 2, 3, 4], ["light", "light"])
    finally:
        batcher.stop()
    assert sorted(n for n, _ in seen[:2]) == [2, 2] and seen[0][1] != seen[1][1]
    assert [n for n, _ in seen[2:]] == [2]  # a share of one is too light: the batch stays whole
