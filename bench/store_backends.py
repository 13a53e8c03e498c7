"""The collection store, SQLite vs PostgreSQL, side by side in one run (no model: random unit vectors):

- ingest: items/s adding `--items` items (dim `--dim`) in batches of `--batch`, each batch one transaction,
  each batch added to both stores in turn (interleaved, the add alone timed; the spread over `--chunks` parts);
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
from uniadapter_serve.service.collections.store import NewItem, Store, StoreBackend


def unit(n: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def items(start: int, n: int, dim: int) -> list[NewItem]:
    x = unit(n, dim, start)
    return [NewItem(f"x{start + i}", "upload:x.png", None, {"i": start + i, "caption": "a thing"}, v)
            for i, v in enumerate(x)]


def ingest(stores: dict[str, Store], args: argparse.Namespace) -> dict[str, list[tuple[int, float]]]:
    """Add the same batches to every store, interleaved (each batch to one store then the other, the order
    alternating), timing the adds alone: load from elsewhere on the machine falls on every store alike.
    -> store -> (items, seconds) in each of `--chunks` consecutive parts of the run."""
    per_chunk = -(-args.items // args.chunks)
    parts = {name: [(0, 0.0)] * args.chunks for name in stores}
    order = list(stores)
    for start in range(0, args.items, args.batch):
        batch = items(start, min(args.batch, args.items - start), args.dim)
        for name in order:
            t = time.perf_counter()
            stores[name].add(batch, 0)
            n, spent = parts[name][start // per_chunk]
            parts[name][start // per_chunk] = (n + len(batch), spent + time.perf_counter() - t)
        order.reverse()
    return {name: [p for p in ps if p[0]] for name, ps in parts.items()}


def serve(backend: StoreBackend, store: Store, args: argparse.Namespace) -> dict[str, float]:
    """Search p50 / p95 on a replica, then its catch-up on `--ops` more adds."""
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
    return {"p50": statistics.median(times) * 1000, "p95": times[int(0.95 * len(times))] * 1000,
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
    parser.add_argument("--chunks", type=int, default=10, help="parts of the ingest run, for the spread of the ratio")
    args = parser.parse_args()
    pg = PostgresServer()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-store-") as tmp:
            root = Path(tmp)
            backends: dict[str, StoreBackend] = {"sqlite": SqliteBackend(root / "sqlite")}
            backends["postgresql"] = PostgresBackend(pg.database(), local_root=root / "pg", media_root=root / "media")
            try:
                stores = {name: b.create("bench", "image", "none", "flat", args.dim) for name, b in backends.items()}
                rates = ingest(stores, args)
                rows = {name: serve(backends[name], stores[name], args) for name in backends}
            finally:
                for b in backends.values():
                    b.close()
        print(f"\n{args.items} items of dim {args.dim}, batches of {args.batch} (adds interleaved, timed alone); "
              f"catch-up of {args.ops} ops")
        print(f"{'store':>12} {'ingest items/s':>15} {'query p50 ms':>13} {'p95 ms':>8} {'catch-up s':>11}")
        total = {name: sum(n for n, _ in ps) / sum(t for _, t in ps) for name, ps in rates.items()}
        for name, r in rows.items():
            print(f"{name:>12} {total[name]:15.0f} {r['p50']:13.2f} {r['p95']:8.2f} {r['catch_up']:11.2f}")
        s, p = rows["sqlite"], rows["postgresql"]
        parts = sorted(sq_t / pg_t for (_, sq_t), (_, pg_t) in zip(rates["sqlite"], rates["postgresql"], strict=True))
        print(f"PostgreSQL / SQLite: ingest {total['postgresql'] / total['sqlite']:.2f}x (over {len(parts)} parts of "
              f"the run: median {statistics.median(parts):.2f}x, {parts[0]:.2f}-{parts[-1]:.2f}x), "
              f"query p50 {p['p50'] / s['p50']:.2f}x, p95 {p['p95'] / s['p95']:.2f}x, "
              f"catch-up {p['catch_up'] / s['catch_up']:.2f}x")
        kinds = bytea_vs_real(pg.database(), args.ops, args.dim)
        (bw, br, bs), (rw, rr, rs) = kinds["bytea"], kinds["real[]"]
        print(f"\n{args.ops} vectors in PostgreSQL: bytea write {bw:.2f} s, read {br:.2f} s, {bs / 2**20:.1f} MB; "
              f"real[] write {rw:.2f} s, read {rr:.2f} s, {rs / 2**20:.1f} MB "
              f"(real[] / bytea: write {rw / bw:.2f}x, read {rr / br:.2f}x, size {rs / bs:.2f}x)")
    finally:
        pg.close()


if __name__ == "__main__":
    main()
