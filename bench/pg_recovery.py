"""PostgreSQL going away and coming back, seen by three replicas of the collection store (no model: random
unit vectors), against a real PostgreSQL started here (Debian's packages, as the tests do):

- A writes one item every `--every-ms` (a client retrying at once on 503);
- B only listens (change events, and the catch-up it is told to do when its link is back): no requests;
- C searches every `--every-ms` (each search checks the store first, as a request does).

Per outage: PostgreSQL back (the first raw connect that succeeds) -> A's first acknowledged write, -> B and C
holding every item A acknowledged by then, and the slowest search on C during the whole round.

    .venv/bin/python bench/pg_recovery.py                      # outages of 20 s and 5 s
    .venv/bin/python bench/pg_recovery.py --outages 22 --every-ms 5
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from support.postgres import PostgresServer

from uniadapter_serve.service.collections.collection import Collection
from uniadapter_serve.service.collections.postgres_store import PostgresBackend
from uniadapter_serve.service.collections.store import NewItem, StoreUnavailableError

DIM = 64


def unit(seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=DIM).astype(np.float32)
    return x / np.linalg.norm(x)


class Round:
    """One outage: the threads and what they saw (times are time.monotonic())."""

    def __init__(self, store, idle: Collection, searcher: Collection, url: str, every_s: float) -> None:
        self.store, self.idle, self.searcher, self.url, self.every_s = store, idle, searcher, url, every_s
        self.stop = threading.Event()
        self.acked: list[tuple[float, int]] = []  # (when, items acknowledged so far)
        self.refused = 0
        self.slowest_search = 0.0
        self.searches = 0
        self.current: dict[str, float] = {}
        self.back: float | None = None
        self.down_at = 0.0

    def write(self) -> None:
        n = len(self.store.all_items())
        while not self.stop.is_set():
            try:
                self.store.add([NewItem(f"w{n}", "upload:x", None, {}, unit(n))], 0)
                n += 1
                self.acked.append((time.monotonic(), n))
            except StoreUnavailableError:
                self.refused += 1
            self.stop.wait(self.every_s)

    def search(self) -> None:
        q = unit(0)
        while not self.stop.is_set():
            t = time.monotonic()
            self.searcher.search(q, 10)
            self.slowest_search = max(self.slowest_search, time.monotonic() - t)
            self.searches += 1
            self.stop.wait(self.every_s)

    def watch_back(self) -> None:
        """The moment PostgreSQL accepts a connection again."""
        while self.back is None and not self.stop.is_set():
            try:
                with psycopg.connect(self.url, connect_timeout=1):
                    self.back = time.monotonic()
            except psycopg.OperationalError:
                time.sleep(0.002)

    def first_write_after_back(self) -> tuple[float, int] | None:
        assert self.back is not None
        return next(((t, n) for t, n in self.acked if t >= self.back), None)

    def watch_current(self) -> None:
        """When B and C first hold every item A had acknowledged at its first write after the outage (read
        from their in-memory indexes: watching does not sync them)."""
        while not self.stop.is_set() and len(self.current) < 2:
            first = self.first_write_after_back() if self.back is not None else None
            if first is not None:
                for name, coll in (("idle", self.idle), ("searching", self.searcher)):
                    if name not in self.current and coll.index.ntotal >= first[1]:
                        self.current[name] = time.monotonic()
            time.sleep(0.002)


def one_round(server: PostgresServer, url: str, store, idle: Collection, searcher: Collection,
              outage_s: float, every_s: float) -> dict[str, float]:
    r = Round(store, idle, searcher, url, every_s)
    threads = [threading.Thread(target=f, daemon=True) for f in (r.write, r.search)]
    for t in threads:
        t.start()
    time.sleep(1.0)  # steady state first
    server.stop("immediate")
    r.down_at = time.monotonic()
    refused_before = r.refused
    time.sleep(outage_s)
    watchers = [threading.Thread(target=f, daemon=True) for f in (r.watch_back, r.watch_current)]
    for t in watchers:
        t.start()
    server.start()
    deadline = time.monotonic() + 60
    while (r.back is None or r.first_write_after_back() is None or len(r.current) < 2) and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.5)
    r.stop.set()
    for t in threads + watchers:
        t.join(10)
    assert r.back is not None
    first = r.first_write_after_back()
    nan = float("nan")
    return {"outage": outage_s, "first_201": (first[0] - r.back) if first else nan,
            "idle": r.current.get("idle", nan) - r.back, "searching": r.current.get("searching", nan) - r.back,
            "slowest": r.slowest_search * 1000, "searches": r.searches, "refused": r.refused - refused_before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--outages", default="20,5", help="outage lengths in seconds, comma-separated")
    parser.add_argument("--every-ms", type=float, default=10.0)
    args = parser.parse_args()
    server = PostgresServer()
    try:
        url = server.database()
        with tempfile.TemporaryDirectory(prefix="bench-pg-recovery-") as tmp:
            root = Path(tmp)
            a, b, c = (PostgresBackend(url, local_root=root / n, media_root=root / "media") for n in "abc")
            store = a.create("c", "image", "none", "flat", DIM)
            idle = Collection(b.open("c"), b.local_dir("c"), b.media_dir("c"))
            searcher = Collection(c.open("c"), c.local_dir("c"), c.media_dir("c"))
            b.listen(lambda name: idle.fresh())
            c.listen(lambda name: searcher.fresh())
            rows = [one_round(server, url, store, idle, searcher, float(s), args.every_ms / 1000)
                    for s in args.outages.split(",")]
            for backend in (a, b, c):
                backend.close()
        print(f"\nPostgreSQL stopped (immediate) and started again; a write and a search every {args.every_ms:g} ms")
        print(f"{'outage s':>9} {'back -> first 201 s':>20} {'-> B current s':>15} {'-> C current s':>15} "
              f"{'slowest search ms':>18} {'searches':>9} {'503s':>6}")
        for r in rows:
            print(f"{r['outage']:9.1f} {r['first_201']:20.3f} {r['idle']:15.3f} {r['searching']:15.3f} "
                  f"{r['slowest']:18.1f} {r['searches']:9d} {r['refused']:6d}")
        print("B: no requests (listener + catch-up when its link is back); C: searching; 'back': the first raw "
              "connect that succeeded")
    finally:
        server.close()


if __name__ == "__main__":
    main()
