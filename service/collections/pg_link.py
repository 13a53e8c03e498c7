"""The collection store's link to PostgreSQL: a connection pool, knowing when PostgreSQL is down, getting
back the moment it is up again, and the LISTEN connection that hears other replicas' changes.

While PostgreSQL is down every call fails at once (`StoreUnavailableError`: writes answer 503, reads answer
from memory) and nothing on a request path waits on a connect. One background thread probes instead, every
`PROBE_EVERY_S`; when a probe connects it opens a fresh pool and swaps it in. The pool's own reconnection is
not relied on: it retries after 1, 2, 4, 8... s (not configurable), so after a 20 s outage it would try
again up to 16 s after PostgreSQL was back.

No change event is assumed delivered: whenever the link comes back (a new pool, or LISTEN issued again after
its connection dropped) `on_change("")` asks the listener to check every collection against the op log.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool, PoolClosed, PoolTimeout

from uniadapter_serve.service.collections.store import StoreUnavailableError

log = logging.getLogger(__name__)

UNAVAILABLE = (psycopg.OperationalError, psycopg.InterfaceError, PoolTimeout)
PROBE_EVERY_S = 0.1
"""while down: how often to try a connect (a refused one costs about a millisecond)"""
KEEPALIVE = {"keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2, "keepalives_count": 3,
             "tcp_user_timeout": 15_000}
"""a host gone from the network (no reset comes back) breaks a connection in about 11 s idle, or 15 s with
data unacknowledged, instead of the kernel's ~2 hours / ~15 minutes: a LISTEN or a call never hangs on it"""
RETRY_WAIT_S = 0.5
"""a read that failed on a live link waits for the probe's first answer, at most this long: a fresh pool
(PostgreSQL restarted: every pooled connection was broken) is tried once more, a refused connect is final"""


def describe(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class PgLink:
    """A pool to `url` that fails fast while PostgreSQL is down and is replaced as soon as it is back."""

    def __init__(self, url: str, *, pool_size: int = 8, timeout_s: float = 2.0) -> None:
        self.url = url
        self.pool_size = pool_size
        self.timeout_s = timeout_s
        self.params: dict[str, Any] = {"connect_timeout": max(1, int(timeout_s)), **KEEPALIVE}
        self.last_error: str | None = None
        self.recoveries = 0
        """pools replaced after an outage (for tests and benches)"""
        self.probes = 0
        """connects tried while down (each answered: refused, timed out or connected)"""
        self.available = threading.Event()
        """set while calls may use the pool; clear from the first failure until a probe connects again"""
        self.listening = threading.Event()
        """set while the LISTEN connection is up (changes from other replicas reach this one)"""
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._probed = threading.Condition(self._lock)
        """notified after each probe"""
        self._prober: threading.Thread | None = None
        self._listener: threading.Thread | None = None
        self._on_change: Callable[[str], None] | None = None
        self.pool = self._open_pool()
        self.available.set()

    def _open_pool(self) -> ConnectionPool:
        pool = ConnectionPool(self.url, min_size=1, max_size=self.pool_size, timeout=self.timeout_s, open=False,
                              kwargs=self.params, name="uniadapter")
        try:
            pool.open(wait=True, timeout=self.timeout_s)
        except BaseException:
            pool.close(timeout=0)
            raise
        return pool

    def _unavailable(self) -> StoreUnavailableError:
        return StoreUnavailableError(f"the collection store (PostgreSQL) is unavailable: {self.last_error}")

    # -- calls ----------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        """A pooled connection; StoreUnavailableError at once while PostgreSQL is known to be down."""
        if not self.available.is_set():
            raise self._unavailable()
        pool = self.pool
        yielded = lost = False
        try:
            with contextlib.ExitStack() as stack:
                try:
                    conn = stack.enter_context(pool.connection(timeout=self.timeout_s))
                except PoolClosed:
                    if self.pool is pool:
                        raise
                    pool = self.pool  # replaced meanwhile (PostgreSQL came back): take the new one
                    conn = stack.enter_context(pool.connection(timeout=self.timeout_s))
                yielded = True
                try:
                    yield conn
                except UNAVAILABLE:
                    lost = conn.broken or conn.closed
                    raise
        except UNAVAILABLE as e:
            if yielded and not lost:  # the server answered with an error (a deadlock, a cancel): it is up
                raise StoreUnavailableError(f"the collection store (PostgreSQL) failed: {describe(e)}") from e
            self.went_down(pool, e)
            raise self._unavailable() from e

    def read(self, fn: Callable[[psycopg.Connection[Any]], Any]) -> Any:
        """Run a read; once more if the link was up and came back within `RETRY_WAIT_S` (a restart)."""
        was_up, probes = self.available.is_set(), self.probes
        try:
            with self.connection() as conn:
                return fn(conn)
        except StoreUnavailableError:
            if not was_up:
                raise
            with self._probed:
                self._probed.wait_for(lambda: self.available.is_set() or self.probes > probes, RETRY_WAIT_S)
            if not self.available.is_set():
                raise
        with self.connection() as conn:
            return fn(conn)

    # -- going down and coming back ---------------------------------------------------------------------

    def went_down(self, pool: ConnectionPool, error: BaseException) -> None:
        """A call on `pool` failed: fail fast and probe until PostgreSQL is back."""
        with self._lock:
            if pool is not self.pool:
                return  # a connection of a pool already replaced
            self.last_error = describe(error)
            was_up = self.available.is_set()
            if was_up:
                log.warning("PostgreSQL unreachable (%s): writes answer 503 and reads answer from memory until it "
                            "is back", self.last_error)
            self.available.clear()
            dead = self.pool
            if self._prober is None and not self._stop.is_set():
                self._prober = threading.Thread(target=self._probe, name="uniadapter-pg-probe", daemon=True)
                self._prober.start()
        # Closing wakes every call already waiting on it for a connection (PoolClosed: unavailable at once)
        # instead of letting each wait out the pool timeout; calls in flight finish first.
        if was_up:
            threading.Thread(target=dead.close, kwargs={"timeout": 1.0}, name="uniadapter-pg-close",
                             daemon=True).start()

    def _probe(self) -> None:
        while True:
            fresh = None
            try:
                with psycopg.connect(self.url, **self.params):
                    pass  # refused at once while PostgreSQL is down: a cheap probe
                fresh = self._open_pool()
            except UNAVAILABLE as e:
                self.last_error = describe(e)
            with self._probed:
                self.probes += 1
                self._probed.notify_all()
                if self._stop.is_set():
                    self._prober = None
                    if fresh is not None:
                        fresh.close(timeout=0)
                    return
                if fresh is not None:
                    old, self.pool = self.pool, fresh
                    self.last_error = None
                    self.recoveries += 1
                    self._prober = None
                    self.available.set()
                    break
            self._stop.wait(PROBE_EVERY_S)
        log.info("PostgreSQL is reachable again")
        self._changed("")  # events sent while the pool was down were not applied: catch up from the op log
        old.close(timeout=1.0)  # its connections are broken; its reconnect tasks stop with it

    # -- change events -----------------------------------------------------------------------------------

    def listen(self, channel: str, on_change: Callable[[str], None]) -> None:
        """LISTEN on `channel` on a connection of its own; `on_change(payload)` per notification, and
        `on_change("")` whenever events may have been missed (LISTEN re-issued, the pool replaced)."""
        self._on_change = on_change
        self._listener = threading.Thread(target=self._listen, args=(channel,), name="uniadapter-pg-listen",
                                          daemon=True)
        self._listener.start()

    def _listen(self, channel: str) -> None:
        first = True
        while not self._stop.is_set():
            try:
                with psycopg.connect(self.url, autocommit=True, **self.params) as conn:
                    conn.execute(f"LISTEN {channel}")
                    self.listening.set()
                    if not first:
                        log.info("collection change events from PostgreSQL are back")
                        self._changed("")  # what was sent while not listening is in the op log
                    first = False
                    while not self._stop.is_set():
                        for notify in conn.notifies(timeout=0.5, stop_after=64):
                            self._changed(notify.payload)
            except UNAVAILABLE as e:
                self.listening.clear()
                first = False
                if self._stop.is_set():
                    break
                log.warning("collection change events from PostgreSQL lost (%s); reconnecting", describe(e))
                self.went_down(self.pool, e)  # a restart breaks every pooled connection too: replace them now
                self._stop.wait(PROBE_EVERY_S)
                while not self._stop.is_set() and not self.available.wait(PROBE_EVERY_S):
                    pass  # reconnect once the probe found PostgreSQL back
        self.listening.clear()

    def _changed(self, name: str) -> None:
        if self._on_change is None:
            return
        try:
            self._on_change(name)
        except Exception:
            log.exception("handling a change of collection %s failed", name or "(any)")

    # -- status and shutdown -----------------------------------------------------------------------------

    def ok(self) -> bool:
        with contextlib.suppress(StoreUnavailableError):
            self.read(lambda c: c.execute("SELECT 1").fetchone())
        return self.available.is_set()

    def close(self) -> None:
        with self._lock:
            self._stop.set()
            prober = self._prober
        for thread in (self._listener, prober):
            if thread is not None:
                thread.join(5)
        self.pool.close()
