"""The collection store, SQLite vs PostgreSQL, side by side in one run (no model: random unit vectors):

- ingest: items/s adding `--items` items (dim `--dim`) in batches of `--batch`, each batch one transaction;
- query: p50 / p95 of a collection search (the replica's catch-up check against the store + FAISS flat top-10);
- catch-up: seconds for a second replica, already open, to apply `--ops` new adds (one sync);
- vectors as bytea vs real[] in PostgreSQL: write and read `--ops` vectors each way.

Ratios are PostgreSQL / SQLite. PostgreSQL is a real server started here (Debian's packages, as the tests do).

    .venv/bin/python bench/store_backends.py                        # 100k items
    .venv/bin/python bench/store_backends.py --items 20000 --ops 5000
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from support.postgres import PostgresServer

from uniadapter_serve.service.collections.collection import Collection
from uniadapter_serve.service.collections.postgres_store import PostgresBackend
from uniadapter_serve.service.collections.sqlite_backend import SqliteBackend
from uniadapter_serve.service.collections.store import NewItem, StoreBackend


def unit(n: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def items(start: int, n: int, dim: int) -> list[NewItem]:
    x = unit(n, dim, start)
    return [NewItem(f"x{start + i}", "upload:x.png", None, {"i": start + i, "caption": "a thing"}, v)
            for i, v in enumerate(x)]


def run(backend: StoreBackend, args: argparse.Namespace) -> dict[str, float]:
    store = backend.create("bench", "image", "none", "flat", args.dim)
    started = time.perf_counter()
    for start in range(0, args.items, args.batch):
        store.add(items(start, min(args.batch, args.items - start), args.dim), 0)
    ingest = args.items / (time.perf_counter() - started)
    replica = Collection(backend.open("bench"), backend.local_dir("bench"), backend.media_dir("bench"))
    queries = unit(args.queries, args.dim, 99)
    times = []
    for q in queries:
        t = time.perf_counter()
        replica.search(q, 10)
        times.append(time.perf_counter() - t)
    times.sort()
    for start in range(args.items, args.items + args.ops, args.batch):
        store.add(items(start, min(args.batch, args.items + args.ops - start), args.dim), 0)
    t = time.perf_counter()
    replica.sync()
    catch_up = time.perf_counter() - t
    assert replica.index.ntotal == args.items + args.ops
    return {"ingest": ingest, "p50": statistics.median(times) * 1000, "p95": times[int(0.95 * len(times))] * 1000,
            "catch_up": catch_up}


def bytea_vs_real(url: str, n: int, dim: int) -> dict[str, float]:
    x = unit(n, dim, 7)
    out = {}
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE vb (id int PRIMARY KEY, v bytea)")
        conn.execute("CREATE TABLE vr (id int PRIMARY KEY, v real[])")
        for name, table, value in (("bytea", "vb", lambda v: v.tobytes()), ("real[]", "vr", lambda v: v.tolist())):
            t = time.perf_counter()
            with conn.transaction(), conn.cursor() as cur:
                cur.executemany(f"INSERT INTO {table} VALUES (%s, %s)", [(i, value(v)) for i, v in enumerate(x)])
            write = time.perf_counter() - t
            t = time.perf_counter()
            rows = conn.execute(f"SELECT id, v FROM {table} ORDER BY id").fetchall()
            if name == "bytea":
                back = np.frombuffer(b"".join(bytes(r[1]) for r in rows), np.float32).reshape(n, dim)
            else:
                back = np.asarray([r[1] for r in rows], np.float32)
            read = time.perf_counter() - t
            assert np.array_equal(back, x)
            size = conn.execute(f"SELECT pg_total_relation_size('{table}')").fetchone()[0]
            out[name] = (write, read, size)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--ops", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--queries", type=int, default=300)
    args = parser.parse_args()
    pg = PostgresServer()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-store-") as tmp:
            root = Path(tmp)
            rows = {"sqlite": run(SqliteBackend(root / "sqlite"), args)}
            backend = PostgresBackend(pg.database(), local_root=root / "pg", media_root=root / "media")
            try:
                rows["postgresql"] = run(backend, args)
            finally:
                backend.close()
        print(f"\n{args.items} items of dim {args.dim}, batches of {args.batch}; catch-up of {args.ops} ops")
        print(f"{'store':>12} {'ingest items/s':>15} {'query p50 ms':>13} {'p95 ms':>8} {'catch-up s':>11}")
        for name, r in rows.items():
            print(f"{name:>12} {r['ingest']:15.0f} {r['p50']:13.2f} {r['p95']:8.2f} {r['catch_up']:11.2f}")
        s, p = rows["sqlite"], rows["postgresql"]
        print(f"PostgreSQL / SQLite: ingest {p['ingest'] / s['ingest']:.2f}x, query p50 {p['p50'] / s['p50']:.2f}x, "
              f"p95 {p['p95'] / s['p95']:.2f}x, catch-up {p['catch_up'] / s['catch_up']:.2f}x")
        kinds = bytea_vs_real(pg.database(), args.ops, args.dim)
        (bw, br, bs), (rw, rr, rs) = kinds["bytea"], kinds["real[]"]
        print(f"\n{args.ops} vectors in PostgreSQL: bytea write {bw:.2f} s, read {br:.2f} s, {bs / 2**20:.1f} MB; "
              f"real[] write {rw:.2f} s, read {rr:.2f} s, {rs / 2**20:.1f} MB "
              f"(real[] / bytea: write {rw / bw:.2f}x, read {rr / br:.2f}x, size {rs / bs:.2f}x)")
    finally:
        pg.close()


if __name__ == "__main__":
    main()
