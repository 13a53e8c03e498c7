"""The dynamic batcher: bounded per-stage queues feeding one model thread.

A stage (vision, text, itm, answer) is a handler that runs a list of jobs as one forward pass.
A batch closes when it reaches `max_batch_size` jobs or its oldest job has waited
`max_wait_ms`; it may mix adapter sets (the handler gets a per-sample `Routing`). The batcher
alone owns queues, deadlines, 429/504, dropping jobs whose client went away, and fan-out of
errors: a batch that raises is re-run one job at a time so a failing sample fails only its
own request. Model work never runs on the event loop.

Live consistency check (`SelfCheck`): in a sampled share of mixed-set batches, one row is run again alone after the
batch has answered, and the two results are compared; a mismatch (a routing bug: one set's row computed with
another's weights) is logged with the sets involved and counted.

`Batcher.hold(*stages)` is a test hook (unused by the service): while held, no batch of those stages starts,
so a test can queue several requests' jobs and then release them as one batch, whatever the scheduling.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from uniadapter_serve.adapters.manager import AdapterManager, Lease
from uniadapter_serve.errors import AdapterCapacityError, DeadlineExceededError, OverloadedError, UniAdapterError
from uniadapter_serve.model.routing import Routing
from uniadapter_serve.model.uniadapter import AdapterSetModule
from uniadapter_serve.service.jobs import CURRENT_ADMISSION, Admission, Handler, Job
from uniadapter_serve.service.metrics import ServiceMetrics

log = logging.getLogger(__name__)

__all__ = ["Admission", "Batcher", "Handler", "Job", "SelfCheck"]


@dataclass
class SelfCheck:
    """Which mixed batches get a row recomputed alone, and how far apart the two results may be."""

    rate: float
    """share of mixed-set batches checked (0: none)"""
    difference: dict[str, Callable[[Any, Any], float]]
    """stage -> (result in the batch, result alone) -> difference (`Stage.difference`)"""
    tolerance: dict[str, float]
    """stage -> the largest difference that passes"""
    rng: random.Random = field(default_factory=random.Random)

    def sample(self) -> bool:
        return self.rate > 0 and self.rng.random() < self.rate


class Batcher:
    def __init__(self, manager: AdapterManager, handlers: dict[str, Handler], *, max_batch_size: int,
                 max_wait_ms: float, max_queue: int, metrics: ServiceMetrics,
                 stage_batch_sizes: dict[str, int] | None = None, workers: int = 1,
                 threads: int | None = None, parallel: Callable[[str, list[Any]], bool] | None = None,
                 self_check: SelfCheck | None = None, split: bool = True) -> None:
        self.manager = manager
        self.self_check = self_check
        self.workers = workers
        """model threads taking batches from the same queues (each runs one batch at a time)"""
        self.threads = threads
        """intra-op threads in all: with several workers, a batch that runs alone gets them all, one that runs
        beside others an equal share (torch's thread count is per calling thread)"""
        self.parallel = parallel
        """(stage, payloads) -> whether the batch has the work to split across threads (else it runs on one)"""
        self.split = split and parallel is not None and workers > 1
        """a batch that closes while other workers idle is shared out among them, when each share still has the
        work to be worth a core (`parallel`): at one intra-op thread per worker, the only way a lone batch uses
        more than one core"""
        self._released: set[str] = set()
        """stages whose queue holds the rest of a batch shared out: the next idle worker takes it at once"""
        self._busy = 0
        self.handlers = handlers
        self.max_batch_size = max_batch_size
        self.stage_batch_sizes = stage_batch_sizes or {}
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.metrics = metrics
        self._queues: dict[str, deque[Job]] = {name: deque() for name in handlers}
        self._reserved = 0
        """jobs admitted requests may still submit"""
        self._active: set[Admission] = set()
        """requests admitted and not finished"""
        self._cond = threading.Condition()
        self._held: dict[str, int] = {}
        """stage -> holds on it (test hook: no batch of a held stage starts)"""
        self._running = False
        self._threads: list[threading.Thread] = []
        self._batch_seconds = 0.05  # running estimate, for Retry-After
        metrics.queue_depth.collect_from(self._depths)

    def _depths(self) -> list[tuple[dict[str, str], float]]:
        return [({"stage": name}, float(len(q))) for name, q in self._queues.items()]

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self._running = True
        self._threads = [threading.Thread(target=self._loop, name=f"uniadapter-model-{i}", daemon=True)
                         for i in range(self.workers)]
        for thread in self._threads:
            thread.start()

    def stop(self, drain_timeout: float = 30.0) -> None:
        """Stop taking work; finish what is queued (up to `drain_timeout`), then end the thread."""
        deadline = time.monotonic() + drain_timeout
        with self._cond:
            self._running = False
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    @property
    def busy_workers(self) -> int:
        """Model threads computing a batch now."""
        with self._cond:
            return self._busy

    def queued(self, stage: str | None = None) -> int:
        """Jobs waiting, in one stage or in all."""
        with self._cond:
            if stage is not None:
                return len(self._queues[stage])
            return sum(len(q) for q in self._queues.values())

    def deadlines(self, stage: str) -> list[float]:
        """Test hook: the deadlines of the jobs queued for `stage`, oldest first (a request's jobs share one)."""
        with self._cond:
            return [job.deadline for job in self._queues[stage]]

    @contextlib.contextmanager
    def hold(self, *stages: str) -> Iterator[None]:
        """Test hook: inside the block no batch of `stages` starts; their jobs queue (deadlines still run).
        Wait for `queued(stage)` to reach the jobs the test sent, then leave the block: they run as one batch
        (up to the stage's batch size). Holds nest (`with hold("answer"): with hold("vision"): ...` lets
        vision go first). Ignored once the batcher is stopping."""
        unknown = sorted(set(stages) - set(self._queues))
        if unknown:
            raise ValueError(f"no such stage(s) {unknown}; the stages are {sorted(self._queues)}")
        with self._cond:
            for stage in stages:
                self._held[stage] = self._held.get(stage, 0) + 1
        try:
            yield
        finally:
            with self._cond:
                for stage in stages:
                    self._held[stage] -= 1
                    if not self._held[stage]:
                        del self._held[stage]
                self._cond.notify_all()

    # -- submitting (event loop) ----------------------------------------------------------------

    def admit(self, jobs: int) -> Admission:
        """Admit a request of up to `jobs` jobs as a unit (`with batcher.admit(n): ...`): 429 unless they
        fit in the queue, except that an empty queue takes any request whole, however large."""
        with self._cond:
            if not self._running:
                raise OverloadedError("the server is shutting down", retry_after=1.0)
            depth = self._depth()
            if depth > 0 and depth + jobs > self.max_queue:
                raise self._overloaded(depth)
            self._reserved += jobs
            admission = Admission(self, jobs, self._unreserve)
            self._active.add(admission)
        return admission

    def _unreserve(self, admission: Admission) -> None:
        with self._cond:
            self._reserved -= admission.reserved
            admission.reserved = 0
            self._active.discard(admission)
            self._cond.notify_all()  # a batch waiting for company may have none left to wait for

    def _depth(self) -> int:
        """Under the lock: queued jobs plus those admitted requests may still submit."""
        return sum(len(q) for q in self._queues.values()) + self._reserved

    def _overloaded(self, depth: int) -> OverloadedError:
        self.metrics.rejected.labels(reason="queue_full").inc()
        retry = max(1.0, round(self._batch_seconds * depth / max(1, self.max_batch_size), 1))
        return OverloadedError(f"queue full ({depth} jobs waiting, limit {self.max_queue}); retry later",
                               retry_after=retry)

    async def submit(self, stage: str, payload: Any, adapter: str | None, deadline: float) -> Any:
        loop = asyncio.get_running_loop()
        job = Job(stage, payload, adapter, deadline, loop.create_future(), loop)
        admission = CURRENT_ADMISSION.get()
        with self._cond:
            if not self._running:
                raise OverloadedError("the server is shutting down", retry_after=1.0)
            if admission is not None and admission.batcher is self:
                job.admission = admission
                if admission.reserved > 0:  # one of its reserved places becomes a queued job
                    admission.reserved -= 1
                    self._reserved -= 1
            else:
                depth = self._depth()
                if depth >= self.max_queue:
                    raise self._overloaded(depth)
            self._queues[stage].append(job)
            self._cond.notify()
        remaining = deadline - time.monotonic()
        try:
            return await asyncio.wait_for(asyncio.shield(job.future), timeout=max(0.0, remaining))
        except TimeoutError:
            job.future.cancel()
            self.metrics.rejected.labels(reason="deadline").inc()
            raise DeadlineExceededError(f"request deadline passed while waiting for the {stage} stage") from None
        except asyncio.CancelledError:
            job.future.cancel()  # the client went away: the model thread drops the job
            raise
        finally:
            self._record(job)

    @staticmethod
    def _record(job: Job) -> None:
        """The job's queue and compute spans into its request's timing (on the event loop, once it is settled
        or given up)."""
        if job.timing is None:
            return
        started, ended = job.started, job.ended  # written by the model thread before it settles the future
        now = time.monotonic()
        job.timing.add("queue", job.enqueued, started if started is not None else now)
        if started is not None:
            job.timing.add("compute", started, ended if ended is not None else now)

    # -- the model thread ------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            stage, jobs = batch
            started = time.monotonic()
            try:
                self._size_threads(stage, jobs)
                self._run(stage, jobs)
            except BaseException as e:  # never let the model thread die
                log.exception("batch of %d %s jobs failed", len(jobs), stage)
                for job in jobs:
                    job.finish(e if isinstance(e, Exception) else RuntimeError(str(e)))
            finally:
                elapsed = time.monotonic() - started
                self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * elapsed
                with self._cond:
                    self._busy -= 1

    def _size_threads(self, stage: str, jobs: list[Job]) -> None:
        """This worker's intra-op threads for its next batch. One when more work is already queued (under load
        the cores are busy with other requests' decoding and HTTP, and batching is the parallelism that pays)
        or when the batch is too small to split (thread overhead would outweigh the split); else all of them
        when it runs alone, its share when other workers are computing too (the latency of a lone request)."""
        if self.threads is None:
            return
        with self._cond:
            busy = self._busy
            waiting = sum(len(q) for q in self._queues.values())
        want = self.threads if busy <= 1 else max(1, self.threads // min(busy, self.workers))
        if want > 1 and (waiting > 0 or (self.parallel is not None
                                         and not self.parallel(stage, [j.payload for j in jobs]))):
            want = 1
        if torch.get_num_threads() != want:
            torch.set_num_threads(want)

    def _next_batch(self) -> tuple[str, list[Job]] | None:
        with self._cond:
            while True:
                ready = [(q[0].enqueued, name) for name, q in self._queues.items()
                         if q and not (self._running and name in self._held)]
                if not ready:
                    if not self._running:
                        return None
                    self._cond.wait()
                    continue
                _, stage = min(ready)  # oldest job first, across stages
                queue = self._queues[stage]
                limit = self.stage_batch_sizes.get(stage, self.max_batch_size)
                wait = queue[0].enqueued + self.max_wait - time.monotonic()
                if (len(queue) < limit and wait > 0 and self._running and stage not in self._released
                        and not self._alone(queue)):
                    self._cond.wait(wait)
                    continue
                self._busy += 1
                self._released.discard(stage)
                n = min(limit, len(queue))
                take = self._share(stage, queue, n)
                jobs = [queue.popleft() for _ in range(take)]
                if take < n:  # the rest of the batch: an idle worker's now
                    self._released.add(stage)
                    self._cond.notify_all()
                return stage, jobs

    def _share(self, stage: str, queue: deque[Job], n: int) -> int:
        """Under the lock: how many of the n jobs closing a batch this worker takes. All of them, unless other
        workers are idle and an equal share of the batch still has the work to be worth a core: then that share
        (two workers at one intra-op thread each compute a batch of four BLIP-base images on two cores, not one)."""
        idle = self.workers - self._busy
        if not self.split or idle <= 0 or n < 2:
            return n
        share = -(-n // min(idle + 1, n))
        assert self.parallel is not None
        if share >= n or not self.parallel(stage, [queue[i].payload for i in range(share)]):
            return n
        return share

    def _alone(self, queue: deque[Job]) -> bool:
        """Under the lock: no other request could join this batch by waiting. Every job in it belongs to an
        admitted request, and every admitted request has a job queued (here, or in another stage, which must
        run before that request has anything for this one): a lone request does not wait MAX_WAIT_MS at each
        stage for company."""
        if not self._active or any(j.admission is None for j in queue):
            return False
        queued = {j.admission for q in self._queues.values() for j in q}
        return self._active <= queued

    def _run(self, stage: str, jobs: list[Job]) -> None:
        now = time.monotonic()
        alive: list[Job] = []
        for job in jobs:
            if job.abandoned:
                self.metrics.rejected.labels(reason="cancelled").inc()
            elif job.deadline <= now:
                self.metrics.rejected.labels(reason="deadline").inc()
                job.finish(DeadlineExceededError(f"deadline passed before the {stage} stage ran"))
            else:
                alive.append(job)
        if not alive:
            return
        leases, alive = self._lease(alive)
        try:
            if alive:
                self._execute(stage, alive, leases)
        finally:
            for lease in leases.values():
                lease.release()

    def _lease(self, jobs: list[Job]) -> tuple[dict[str, Lease], list[Job]]:
        """Lease every set the batch needs. A set that finds no room while this batch holds
        others is deferred to the next batch; any other failure fails only its jobs."""
        leases: dict[str, Lease] = {}
        refs = sorted({j.adapter for j in jobs if j.adapter is not None},
                      key=lambda r: r not in self.manager.resident())  # resident sets first: no load
        deferred: list[Job] = []
        failed: set[str] = set()
        for ref in refs:
            try:
                leases[ref] = self.manager.acquire(ref)
            except AdapterCapacityError as e:
                if leases:
                    deferred += [j for j in jobs if j.adapter == ref]
                else:
                    self._fail([j for j in jobs if j.adapter == ref], e)
                failed.add(ref)
            except UniAdapterError as e:
                self._fail([j for j in jobs if j.adapter == ref], e)
                failed.add(ref)
        if deferred:
            with self._cond:
                self._queues[deferred[0].stage].extendleft(reversed(deferred))
                self._cond.notify()
        return leases, [j for j in jobs if j.adapter not in failed]

    @staticmethod
    def _fail(jobs: list[Job], error: Exception) -> None:
        for job in jobs:
            job.finish(error)

    def _execute(self, stage: str, jobs: list[Job], leases: dict[str, Lease]) -> None:
        handler = self.handlers[stage]
        modules = [leases[j.adapter].module if j.adapter is not None else None for j in jobs]
        distinct = len({j.adapter for j in jobs})
        self.metrics.batch_size.labels(stage=stage).observe(len(jobs))
        self.metrics.batch_adapters.labels(stage=stage).observe(distinct)
        if distinct > 1:
            self.metrics.mixed_batches.labels(stage=stage).inc()
        started = time.monotonic()
        queue_wait = self.metrics.stage_queue.labels(stage=stage)
        for job in jobs:
            job.started = started
            queue_wait.observe(started - job.enqueued)
        try:
            with torch.inference_mode():
                results = handler(jobs, Routing.per_sample(modules, self.manager.backbone.device))
        except Exception as e:
            if len(jobs) == 1:
                self._done(stage, jobs, started)
                jobs[0].finish(e)
                return
            log.warning("batch of %d %s jobs raised %r; re-running one by one", len(jobs), stage, e)
            for job, module in zip(jobs, modules, strict=True):
                try:
                    with torch.inference_mode():
                        result = handler([job], Routing.single(module, 1))[0]
                except Exception as single:
                    result = single
                job.ended = time.monotonic()
                job.finish(result)
            self.metrics.stage_compute.labels(stage=stage).observe(time.monotonic() - started)
            return
        self._done(stage, jobs, started)
        for job, result in zip(jobs, results, strict=True):
            job.finish(result)
        if distinct > 1 and self.self_check is not None and self.self_check.sample():
            self._check_a_row(stage, jobs, modules, results, self.self_check)

    def _check_a_row(self, stage: str, jobs: list[Job], modules: list[AdapterSetModule | None], results: Any,
                     check: SelfCheck) -> None:
        """After the batch has answered: one row run again alone and compared with its result in the batch."""
        row = check.rng.randrange(len(jobs))
        try:
            with torch.inference_mode():
                alone = self.handlers[stage]([jobs[row]], Routing.single(modules[row], 1))[0]
            difference = check.difference[stage](results[row], alone)
        except Exception:
            log.exception("self-check of a %s row could not run", stage)
            return
        tolerance = check.tolerance[stage]
        ok = difference <= tolerance
        self.metrics.self_checks.labels(stage=stage, result="pass" if ok else "mismatch").inc()
        if not ok:
            mine = jobs[row].adapter or "(the bare backbone)"
            others = sorted({j.adapter or "(the bare backbone)" for j in jobs} - {mine})
            log.error("self-check mismatch: a %s row of set %s, batched with %s (%d rows), differs from the same job "
                      "run alone by %.3g (tolerance %.3g): mixed-set routing is wrong on %s", stage, mine,
                      ", ".join(others), len(jobs), difference, tolerance, self.manager.backbone.device)

    def _done(self, stage: str, jobs: list[Job], started: float) -> None:
        ended = time.monotonic()
        self.metrics.stage_compute.labels(stage=stage).observe(ended - started)
        for job in jobs:
            job.ended = ended
