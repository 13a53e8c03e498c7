"""What only the PostgreSQL store has to get right, against a real server: migrations under concurrent
start-up, op seqs visible in order under concurrent writers on several "replicas", LISTEN/NOTIFY, and
PostgreSQL going away and coming back."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import psycopg
import pytest
from support.postgres import PostgresServer

from uniadapter_serve.service.collections.collection import Collection
from uniadapter_serve.service.collections.postgres_store import MIGRATIONS, PostgresBackend, migrate_schema
from uniadapter_serve.service.collections.store import NewItem, StoreUnavailableError

DIM = 8


def unit(n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def backend(url: str, tmp_path, name: str) -> PostgresBackend:
    return PostgresBackend(url, local_root=tmp_path / name, media_root=tmp_path / "media")


def wait_for(condition, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_replicas_starting_together_migrate_once(pg_server):
    url = pg_server.database()
    with ThreadPoolExecutor(6) as pool:
        applied = list(pool.map(lambda _: migrate_schema(url), range(6)))
    assert sorted(v for a in applied for v in a) == list(range(1, len(MIGRATIONS) + 1))
    with psycopg.connect(url) as conn:
        versions = [r[0] for r in conn.execute("SELECT version FROM uniadapter_schema ORDER BY version")]
    assert versions == list(range(1, len(MIGRATIONS) + 1))
    assert migrate_schema(url) == []


def test_concurrent_writers_on_several_replicas_never_hide_an_op(pg_server, tmp_path):
    url = pg_server.database()
    writers = [backend(url, tmp_path, f"w{i}") for i in range(3)]
    reader_backend = backend(url, tmp_path, "r")
    writers[0].create("c", "image", "none", "flat", DIM)
    reader = Collection(reader_backend.open("c"), reader_backend.local_dir("c"), reader_backend.media_dir("c"))
    x = unit(300, 1)
    stop = threading.Event()

    def write(w: int) -> None:
        store = writers[w].open("c")
        for i in range(w, 300, 3):
            store.add([NewItem(f"x{i}", "upload:x", None, {"i": i}, x[i])], 0)
            if i % 10 == 0:
                store.delete(f"x{i}")

    def read() -> None:
        while not stop.is_set():
            reader.sync()  # replays whatever is committed, concurrently with the writers

    follower = threading.Thread(target=read)
    follower.start()
    with ThreadPoolExecutor(3) as pool:
        list(pool.map(write, range(3)))
    stop.set()
    follower.join(30)
    reader.sync()
    store = reader_backend.open("c")
    assert [s for s, _, _ in store.ops_after(0)] == list(range(1, store.last_seq() + 1))  # no gaps, in order
    assert reader.index.ntotal == store.count() == 270  # no op skipped, none applied twice
    hit = reader.search(x[7], 1)[0]
    assert hit.item.external_id == "x7" and hit.score == pytest.approx(1.0, abs=1e-5)
    for b in (*writers, reader_backend):
        b.close()


def test_changes_are_announced_to_every_replica(pg_server, tmp_path):
    url = pg_server.database()
    a, b = backend(url, tmp_path, "a"), backend(url, tmp_path, "b")
    heard: list[str] = []
    b.listen(heard.append)
    assert b.listening.wait(10), "the listener never issued LISTEN"
    store = a.create("c", "image", "none", "flat", DIM)
    store.add([NewItem("x", "upload:x", None, {}, unit(1, 2)[0])], 0)
    wait_for(lambda: heard.count("c") >= 2, "the create and the add to reach the other replica")
    a.close()
    b.close()


def test_postgres_going_away_and_coming_back(tmp_path):
    server = PostgresServer()
    try:
        url = server.database()
        store_backend = backend(url, tmp_path, "x")
        store = store_backend.create("c", "image", "none", "flat", DIM)
        coll = Collection(store, store_backend.local_dir("c"), store_backend.media_dir("c"))
        x = unit(5, 3)
        store.add([NewItem(f"x{i}", "upload:x", None, {}, v) for i, v in enumerate(x)], 0)
        assert len(coll.search(x[0], 5)) == 5
        server.stop("immediate")
        started = time.monotonic()
        with pytest.raises(StoreUnavailableError) as down:
            store.add([NewItem("y", "upload:x", None, {}, x[0])], 0)
        assert down.value.retry_after >= 1
        hits = coll.search(x[1], 5)  # answered from memory
        assert hits[0].item.external_id == "x1" and len(hits) == 5
        assert coll.stats()["store_available"] is False
        assert time.monotonic() - started < 15
        assert store_backend.status()["ok"] is False
        server.start()
        wait_for(store_backend.link.available.is_set, "the link noticing PostgreSQL is back", timeout=30)
        assert store_backend.link.recoveries == 1
        store.add([NewItem("y", "upload:x", None, {}, x[0])], 0)  # the first attempt: no backoff to wait out
        assert len(coll.search(x[0], 10)) == 6 and coll.stats()["store_available"] is True
        assert store.count() == 6  # nothing half-written, nothing lost
        store_backend.close()
    finally:
        server.close()


def test_searches_during_an_outage_never_wait_on_a_connection(tmp_path):
    """The 3 s stall every ~5 s: once the fail-fast window ran out a search waited on the pool (2 s) and once
    more on a retry (1 s). Now nothing on a request path asks the pool while PostgreSQL is known down."""
    server = PostgresServer()
    try:
        store_backend = backend(server.database(), tmp_path, "x")
        store = store_backend.create("c", "image", "none", "flat", DIM)
        coll = Collection(store, store_backend.local_dir("c"), store_backend.media_dir("c"))
        x = unit(4, 5)
        store.add([NewItem(f"x{i}", "upload:x", None, {}, v) for i, v in enumerate(x)], 0)
        assert len(coll.search(x[2], 4)) == 4
        server.stop("immediate")
        with pytest.raises(StoreUnavailableError):
            store.count()
        link = store_backend.link
        wait_for(lambda: link.pool.closed, "the dead pool closed (calls waiting on it for a connection woken)")
        asked = link.pool.get_stats().get("requests_num", 0)
        probes = link.probes
        while link.probes < probes + 25:  # the prober keeps failing meanwhile: longer than the old 2 s window
            hits = coll.search(x[2], 4)
            assert hits[0].item.external_id == "x2" and len(hits) == 4
            assert coll.stats()["store_available"] is False
        assert link.pool.get_stats().get("requests_num", 0) == asked  # not one request reached the pool
        assert not link.available.is_set() and store_backend.status()["ok"] is False
        store_backend.close()
    finally:
        server.close()


def test_a_replica_catches_up_from_the_op_log_when_its_listen_drops(pg_server, tmp_path):
    """Events sent while a replica was not listening are not assumed delivered: when LISTEN is issued again
    it is told to check every collection ("") and replays the op log."""
    url = pg_server.database()
    a, b = backend(url, tmp_path, "a"), backend(url, tmp_path, "b")
    store = a.create("c", "image", "none", "flat", DIM)
    follower = Collection(b.open("c"), b.local_dir("c"), b.media_dir("c"))
    heard: list[str] = []

    def on_change(name: str) -> None:  # acts only on "": as if every named event had been lost
        heard.append(name)
        if name == "":
            follower.fresh()

    b.listen(on_change)
    assert b.listening.wait(10)
    x = unit(3, 6)
    store.add([NewItem(f"x{i}", "upload:x", None, {}, v) for i, v in enumerate(x)], 0)
    wait_for(lambda: "c" in heard, "the add's event")
    assert follower.index.ntotal == 0  # the event was not acted on
    with psycopg.connect(url, autocommit=True) as conn:
        killed = conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                              "WHERE datname = current_database() AND query LIKE 'LISTEN%%'").fetchall()
    assert killed == [(True,)]
    wait_for(lambda: follower.index.ntotal == 3, "the follower replaying the op log")
    wait_for(b.listening.is_set, "LISTEN issued again")
    assert "" in heard
    store.add([NewItem("y", "upload:x", None, {}, x[0])], 0)  # and events flow again
    wait_for(lambda: heard.count("c") >= 2, "an event after LISTEN came back")
    a.close()
    b.close()


def test_after_an_outage_the_other_replica_catches_up_without_a_request(tmp_path):
    """Both replicas' pools break; writes resume on one; the other is told to catch up when its link is back
    (notifications sent while its pool or LISTEN was down are not relied on)."""
    server = PostgresServer()
    try:
        url = server.database()
        a, b = backend(url, tmp_path, "a"), backend(url, tmp_path, "b")
        store = a.create("c", "image", "none", "flat", DIM)
        follower = Collection(b.open("c"), b.local_dir("c"), b.media_dir("c"))
        b.listen(lambda name: follower.fresh())
        assert b.listening.wait(10)
        server.stop("immediate")
        wait_for(lambda: not b.listening.is_set() and not b.link.available.is_set(), "B noticing the outage")
        server.start()
        wait_for(a.link.ok, "A's link back", timeout=30)
        x = unit(2, 7)
        store.add([NewItem(f"x{i}", "upload:x", None, {}, v) for i, v in enumerate(x)], 0)
        wait_for(lambda: follower.index.ntotal == 2, "B applying A's write", timeout=30)
        assert b.link.recoveries == 1 and b.listening.is_set()
        a.close()
        b.close()
    finally:
        server.close()


def test_a_server_error_is_not_an_outage(pg_server, tmp_path):
    """An error PostgreSQL answers with (here a statement cancelled by its timeout) fails that call only."""
    store_backend = backend(pg_server.database(), tmp_path, "x")
    with pytest.raises(StoreUnavailableError, match="failed"), store_backend.connection() as conn:
        conn.execute("SET statement_timeout = 10")
        conn.execute("SELECT pg_sleep(1)")
    assert store_backend.link.available.is_set() and store_backend.link.recoveries == 0
    assert store_backend.status()["ok"] is True
    store_backend.close()
