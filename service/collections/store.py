"""A collection's metadata and embeddings in SQLite (WAL): the source of truth.

Tables:
  meta        one row: name, kind, adapter ref, index factory, dim, generation, reindex target
  items       item_id, external_id (unique), source, media sha256, user metadata (JSON), created
  embeddings  (item_id, generation) -> float32 vector
  ops         seq, op ('add' | 'delete' | 'switch'), item_id: an ordered log, so any process can bring
              its in-memory FAISS index up to date by replaying ops after the seq it has applied.
Every write is one transaction; an item is acknowledged only after its transaction committed, so a
kill -9 loses at most unacknowledged items and never leaves a half-written one.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from uniadapter_serve.errors import ConflictError, NotFoundError

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    name TEXT NOT NULL, kind TEXT NOT NULL, adapter_ref TEXT NOT NULL, factory TEXT NOT NULL,
    dim INTEGER NOT NULL, generation INTEGER NOT NULL, reindex_target TEXT, created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS items (
    item_id INTEGER PRIMARY KEY AUTOINCREMENT,
    external_id TEXT NOT NULL UNIQUE,
    source TEXT NOT NULL,
    sha256 TEXT,
    metadata TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS embeddings (
    item_id INTEGER NOT NULL, generation INTEGER NOT NULL, vector BLOB NOT NULL,
    PRIMARY KEY (item_id, generation)
);
CREATE TABLE IF NOT EXISTS ops (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, op TEXT NOT NULL, item_id INTEGER
);
"""


@dataclass(frozen=True)
class CollectionMeta:
    name: str
    kind: str
    adapter_ref: str
    factory: str
    dim: int
    generation: int
    reindex_target: str | None
    created: float


@dataclass(frozen=True)
class Item:
    item_id: int
    external_id: str
    source: str
    sha256: str | None
    metadata: dict[str, Any]


@dataclass(frozen=True)
class NewItem:
    external_id: str
    source: str
    sha256: str | None
    metadata: dict[str, Any]
    vector: np.ndarray


class Store:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._local = threading.local()
        self._db().executescript(SCHEMA)  # idempotent; executescript manages its own transaction

    def _db(self) -> sqlite3.Connection:
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA busy_timeout=30000")
            self._local.db = db
        return db

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT: one writer at a time across threads and processes."""
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None

    # -- meta ------------------------------------------------------------------------------------

    def init_meta(self, name: str, kind: str, adapter_ref: str, factory: str, dim: int) -> None:
        with self.transaction() as db:
            db.execute("INSERT INTO meta VALUES (1, ?, ?, ?, ?, ?, 0, NULL, ?)",
                       (name, kind, adapter_ref, factory, dim, time.time()))

    def meta(self) -> CollectionMeta:
        row = self._db().execute(
            "SELECT name, kind, adapter_ref, factory, dim, generation, reindex_target, created FROM meta").fetchone()
        if row is None:
            raise NotFoundError(f"collection store {self.path} has no metadata")
        return CollectionMeta(*row)

    def set_reindex_target(self, ref: str | None) -> None:
        with self.transaction() as db:
            db.execute("UPDATE meta SET reindex_target = ?", (ref,))

    # -- items -----------------------------------------------------------------------------------

    def add(self, items: Sequence[NewItem], generation: int) -> list[int]:
        """Insert items with their embeddings for `generation`, atomically; duplicate external ids
        (in the batch or the collection) reject the whole batch."""
        ids = [it.external_id for it in items]
        if len(set(ids)) != len(ids):
            dupes = sorted({i for i in ids if ids.count(i) > 1})
            raise ConflictError(f"duplicate ids in the request: {dupes[:5]}")
        with self.transaction() as db:
            current = db.execute("SELECT generation FROM meta").fetchone()[0]
            if current != generation:
                raise _GenerationChanged()
            placeholders = ",".join("?" * len(ids))
            taken = [r[0] for r in db.execute(f"SELECT external_id FROM items WHERE external_id IN ({placeholders})",
                                              ids)]
            if taken:
                raise ConflictError(f"ids already in the collection: {sorted(taken)[:5]}")
            now = time.time()
            out = []
            for it in items:
                cur = db.execute(
                    "INSERT INTO items (external_id, source, sha256, metadata, created) VALUES (?, ?, ?, ?, ?)",
                    (it.external_id, it.source, it.sha256, json.dumps(it.metadata), now))
                item_id = int(cur.lastrowid or 0)
                db.execute("INSERT INTO embeddings VALUES (?, ?, ?)",
                           (item_id, generation, np.ascontiguousarray(it.vector, np.float32).tobytes()))
                db.execute("INSERT INTO ops (op, item_id) VALUES ('add', ?)", (item_id,))
                out.append(item_id)
            return out

    def delete(self, external_id: str) -> int:
        with self.transaction() as db:
            row = db.execute("SELECT item_id FROM items WHERE external_id = ?", (external_id,)).fetchone()
            if row is None:
                raise NotFoundError(f"no item {external_id!r}")
            item_id = int(row[0])
            db.execute("DELETE FROM items WHERE item_id = ?", (item_id,))
            db.execute("DELETE FROM embeddings WHERE item_id = ?", (item_id,))
            db.execute("INSERT INTO ops (op, item_id) VALUES ('delete', ?)", (item_id,))
            return item_id

    def items(self, item_ids: Sequence[int]) -> dict[int, Item]:
        if not item_ids:
            return {}
        placeholders = ",".join("?" * len(item_ids))
        rows = self._db().execute(
            f"SELECT item_id, external_id, source, sha256, metadata FROM items WHERE item_id IN ({placeholders})",
            list(item_ids))
        return {r[0]: Item(r[0], r[1], r[2], r[3], json.loads(r[4])) for r in rows}

    def get(self, external_id: str) -> Item:
        r = self._db().execute("SELECT item_id, external_id, source, sha256, metadata FROM items WHERE external_id = ?",
                               (external_id,)).fetchone()
        if r is None:
            raise NotFoundError(f"no item {external_id!r}")
        return Item(r[0], r[1], r[2], r[3], json.loads(r[4]))

    def existing(self, external_ids: Sequence[str]) -> set[str]:
        found: set[str] = set()
        for start in range(0, len(external_ids), 500):
            chunk = list(external_ids[start:start + 500])
            placeholders = ",".join("?" * len(chunk))
            found |= {r[0] for r in self._db().execute(
                f"SELECT external_id FROM items WHERE external_id IN ({placeholders})", chunk)}
        return found

    def count(self) -> int:
        return int(self._db().execute("SELECT count(*) FROM items").fetchone()[0])

    def last_seq(self) -> int:
        return int(self._db().execute("SELECT coalesce(max(seq), 0) FROM ops").fetchone()[0])

    def ops_after(self, seq: int) -> list[tuple[int, str, int | None]]:
        return [(int(s), str(o), i) for s, o, i in
                self._db().execute("SELECT seq, op, item_id FROM ops WHERE seq > ? ORDER BY seq", (seq,))]

    def vectors(self, item_ids: Sequence[int], generation: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
        """-> (ids (n,), vectors (n, dim)) for the items that still exist."""
        found_ids: list[int] = []
        blobs: list[bytes] = []
        for start in range(0, len(item_ids), 500):
            chunk = list(item_ids[start:start + 500])
            placeholders = ",".join("?" * len(chunk))
            for item_id, blob in self._db().execute(
                    f"SELECT item_id, vector FROM embeddings WHERE generation = ? AND item_id IN ({placeholders})",
                    [generation, *chunk]):
                found_ids.append(int(item_id))
                blobs.append(blob)
        return _stack(found_ids, blobs, dim)

    def all_vectors(self, generation: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
        rows = self._db().execute("SELECT item_id, vector FROM embeddings WHERE generation = ? ORDER BY item_id",
                                  (generation,)).fetchall()
        return _stack([int(r[0]) for r in rows], [r[1] for r in rows], dim)

    # -- re-indexing -----------------------------------------------------------------------------

    def missing(self, generation: int, limit: int) -> list[Item]:
        """Items without an embedding for `generation` (what a re-index still has to embed)."""
        rows = self._db().execute(
            "SELECT item_id, external_id, source, sha256, metadata FROM items WHERE item_id NOT IN "
            "(SELECT item_id FROM embeddings WHERE generation = ?) ORDER BY item_id LIMIT ?", (generation, limit))
        return [Item(r[0], r[1], r[2], r[3], json.loads(r[4])) for r in rows]

    def put_vectors(self, vectors: dict[int, np.ndarray], generation: int) -> None:
        with self.transaction() as db:
            live = {r[0] for r in db.execute(
                f"SELECT item_id FROM items WHERE item_id IN ({','.join('?' * len(vectors))})", list(vectors))}
            db.executemany("INSERT OR REPLACE INTO embeddings VALUES (?, ?, ?)",
                           [(i, generation, np.ascontiguousarray(v, np.float32).tobytes())
                            for i, v in vectors.items() if i in live])

    def switch(self, generation: int, adapter_ref: str) -> bool:
        """Make `generation` active if every item has an embedding for it; False if some are missing."""
        with self.transaction() as db:
            missing = db.execute("SELECT count(*) FROM items WHERE item_id NOT IN "
                                 "(SELECT item_id FROM embeddings WHERE generation = ?)", (generation,)).fetchone()[0]
            if missing:
                return False
            db.execute("UPDATE meta SET generation = ?, adapter_ref = ?, reindex_target = NULL",
                       (generation, adapter_ref))
            db.execute("DELETE FROM embeddings WHERE generation < ?", (generation,))
            db.execute("INSERT INTO ops (op, item_id) VALUES ('switch', NULL)")
            return True


class _GenerationChanged(Exception):
    """The collection switched adapter versions while an add was embedding; embed again."""


def _stack(ids: list[int], blobs: list[bytes], dim: int) -> tuple[np.ndarray, np.ndarray]:
    if not ids:
        return np.zeros(0, np.int64), np.zeros((0, dim), np.float32)
    vectors = np.frombuffer(b"".join(blobs), dtype=np.float32).reshape(len(ids), dim)
    return np.asarray(ids, np.int64), vectors
