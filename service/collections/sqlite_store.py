"""The collection store in SQLite (WAL), the embedded default: one file per collection on the data volume.

Tables:
  meta        one row: name, kind, adapter ref, index factory, dim, generation, reindex target
  items       item_id, external_id (unique), source, media sha256, user metadata (JSON), created
  embeddings  (item_id, generation) -> float32 vector
  ops         seq, op ('add' | 'delete' | 'switch'), item_id: the ordered log replicas replay.
Writers take the database lock first (BEGIN IMMEDIATE), so ops are numbered in commit order. Every write is
one transaction; an item is acknowledged only after its transaction committed, so a kill -9 loses at most
unacknowledged items and never leaves a half-written one. Replicas on one host share the files.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from uniadapter_serve.errors import ConflictError, NotFoundError
from uniadapter_serve.service.collections.store import (
    CollectionMeta,
    GenerationChanged,
    Item,
    NewItem,
    Op,
    Store,
    StoreBackend,
    stack,
    vector_bytes,
)

log = logging.getLogger(__name__)

STORE_FILE = "items.sqlite"
ITEM_COLUMNS = "item_id, external_id, source, sha256, metadata, created"

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


def _item(r: Sequence[Any]) -> Item:
    return Item(r[0], r[1], r[2], r[3], json.loads(r[4]), float(r[5]))


class SqliteStore(Store):
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
                raise GenerationChanged()
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
                           (item_id, generation, vector_bytes(it.vector)))
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
            f"SELECT {ITEM_COLUMNS} FROM items WHERE item_id IN ({placeholders})",
            list(item_ids))
        return {r[0]: _item(r) for r in rows}

    def get(self, external_id: str) -> Item:
        r = self._db().execute(f"SELECT {ITEM_COLUMNS} FROM items WHERE external_id = ?",
                               (external_id,)).fetchone()
        if r is None:
            raise NotFoundError(f"no item {external_id!r}")
        return _item(r)

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

    def ops_after(self, seq: int) -> list[Op]:
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
        return stack(found_ids, blobs, dim)

    def all_vectors(self, generation: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
        rows = self._db().execute("SELECT item_id, vector FROM embeddings WHERE generation = ? ORDER BY item_id",
                                  (generation,)).fetchall()
        return stack([int(r[0]) for r in rows], [r[1] for r in rows], dim)

    # -- re-indexing -----------------------------------------------------------------------------

    def state(self, generation: int, dim: int) -> tuple[int, list[Item], np.ndarray, np.ndarray]:
        db = self._db()
        db.execute("BEGIN")  # a read transaction: one WAL snapshot for all three reads
        try:
            seq = int(db.execute("SELECT coalesce(max(seq), 0) FROM ops").fetchone()[0])
            items = [_item(r) for r in db.execute(
                f"SELECT {ITEM_COLUMNS} FROM items ORDER BY item_id")]
            rows = db.execute("SELECT item_id, vector FROM embeddings WHERE generation = ? ORDER BY item_id",
                              (generation,)).fetchall()
        finally:
            db.execute("COMMIT")
        ids, vectors = stack([int(r[0]) for r in rows], [r[1] for r in rows], dim)
        return seq, items, ids, vectors

    def export(self, item_ids: Sequence[int]) -> dict[int, tuple[float, dict[int, bytes]]]:
        """item id -> (created, generation -> float32 bytes): what a migration copies besides the rows."""
        out: dict[int, tuple[float, dict[int, bytes]]] = {}
        for start in range(0, len(item_ids), 500):
            chunk = list(item_ids[start:start + 500])
            marks = ",".join("?" * len(chunk))
            for item_id, created in self._db().execute(
                    f"SELECT item_id, created FROM items WHERE item_id IN ({marks})", chunk):
                out[int(item_id)] = (float(created), {})
            for item_id, generation, blob in self._db().execute(
                    f"SELECT item_id, generation, vector FROM embeddings WHERE item_id IN ({marks})", chunk):
                out[int(item_id)][1][int(generation)] = bytes(blob)
        return out

    def all_items(self) -> list[Item]:
        rows = self._db().execute(f"SELECT {ITEM_COLUMNS} FROM items ORDER BY item_id")
        return [_item(r) for r in rows]

    def missing(self, generation: int, limit: int) -> list[Item]:
        rows = self._db().execute(
            f"SELECT {ITEM_COLUMNS} FROM items WHERE item_id NOT IN "
            "(SELECT item_id FROM embeddings WHERE generation = ?) ORDER BY item_id LIMIT ?", (generation, limit))
        return [_item(r) for r in rows]

    def put_vectors(self, vectors: dict[int, np.ndarray], generation: int) -> None:
        with self.transaction() as db:
            live = {r[0] for r in db.execute(
                f"SELECT item_id FROM items WHERE item_id IN ({','.join('?' * len(vectors))})", list(vectors))}
            db.executemany("INSERT OR REPLACE INTO embeddings VALUES (?, ?, ?)",
                           [(i, generation, vector_bytes(v))
                            for i, v in vectors.items() if i in live])

    def switch(self, generation: int, adapter_ref: str) -> bool:
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


class SqliteBackend(StoreBackend):
    """Collections as folders under `root` (DATA_ROOT/collections): `NAME/items.sqlite`, `NAME/media/`."""

    kind = "sqlite"

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def names(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and (p / STORE_FILE).is_file()
                      and not p.name.startswith("."))

    def create(self, name: str, kind: str, adapter_ref: str, factory: str, dim: int) -> Store:
        folder = self.root / name
        try:
            folder.mkdir(parents=True, exist_ok=False)
        except FileExistsError:
            raise ConflictError(f"collection {name!r} already exists") from None
        try:
            store = SqliteStore(folder / STORE_FILE)
            store.init_meta(name, kind, adapter_ref, factory, dim)
            return store
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise

    def open(self, name: str) -> Store:
        path = self.root / name / STORE_FILE
        if not path.is_file():
            raise NotFoundError(f"no collection named {name!r}")
        return SqliteStore(path)

    def drop(self, name: str) -> None:
        folder = self.root / name
        trash = self.root / f".deleted-{name}-{os.getpid()}-{time.monotonic_ns()}"
        try:
            os.replace(folder, trash)
        except FileNotFoundError:
            raise NotFoundError(f"no collection named {name!r}") from None
        shutil.rmtree(trash, ignore_errors=True)

    def local_dir(self, name: str) -> Path:
        return self.root / name

    def media_dir(self, name: str) -> Path:
        return self.root / name / "media"
