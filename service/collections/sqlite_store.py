"""The collection store in SQLite (WAL), the embedded default: one file per collection on the data volume.

Tables:
  meta        one row: name, kind, adapter ref, index factory, dim, generation, reindex target, uid (the
              collection's identity), moments (JSON window/stride, video collections of moments), deleted (set
              by a drop, before its files go: every handle sees it)
  items       item_id, external_id (unique), source, media sha256, user metadata (JSON), created, moments
              (JSON [[start_s, end_s], ...], items of moment collections)
  embeddings  (item_id, generation) -> float32 vector (one per moment, concatenated, in moment collections)
  ops         seq, op ('add' | 'delete' | 'switch' | 'drop'), item_id: the ordered log replicas replay.
Writers take the database lock first (BEGIN IMMEDIATE), so ops are numbered in commit order. Every write is
one transaction; an item is acknowledged only after its transaction committed, so a kill -9 loses at most
unacknowledged items and never leaves a half-written one. Replicas on one host share the files.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from uniadapter_serve.errors import ConflictError, NotFoundError
from uniadapter_serve.service.collections.store import (
    CollectionGone,
    CollectionMeta,
    GenerationChanged,
    Item,
    MomentSpec,
    NewItem,
    Op,
    Store,
    moments_json,
    read_metadata,
    read_moments,
    stack,
    vector_bytes,
)

log = logging.getLogger(__name__)

STORE_FILE = "items.sqlite"
ITEM_COLUMNS = "item_id, external_id, source, sha256, metadata, created, moments"
TRASH_PREFIX = ".deleted-"
CREATING_PREFIX = ".creating-"

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    name TEXT NOT NULL, kind TEXT NOT NULL, adapter_ref TEXT NOT NULL, factory TEXT NOT NULL,
    dim INTEGER NOT NULL, generation INTEGER NOT NULL, reindex_target TEXT, created REAL NOT NULL,
    uid TEXT, deleted INTEGER NOT NULL DEFAULT 0, moments TEXT
);
CREATE TABLE IF NOT EXISTS items (
    item_id INTEGER PRIMARY KEY AUTOINCREMENT,
    external_id TEXT NOT NULL UNIQUE,
    source TEXT NOT NULL,
    sha256 TEXT,
    metadata TEXT NOT NULL,
    created REAL NOT NULL,
    moments TEXT
);
CREATE TABLE IF NOT EXISTS embeddings (
    item_id INTEGER NOT NULL, generation INTEGER NOT NULL, vector BLOB NOT NULL,
    PRIMARY KEY (item_id, generation)
);
CREATE TABLE IF NOT EXISTS ops (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, op TEXT NOT NULL, item_id INTEGER
);
"""
META_COLUMNS = "name, kind, adapter_ref, factory, dim, generation, reindex_target, created, uid, moments"
ADDED_COLUMNS = {"meta": {"uid": "TEXT", "deleted": "INTEGER NOT NULL DEFAULT 0", "moments": "TEXT"},
                 "items": {"moments": "TEXT"}}
"""columns stores made before collection identities (uid, deleted) or moments lack (added on first open)"""


def _item(r: Sequence[Any]) -> Item:
    return Item(r[0], r[1], r[2], r[3], read_metadata(r[4]), float(r[5]), read_moments(r[6]))


def _connect(path: Path, create: bool) -> sqlite3.Connection:
    """One connection to the file at `path` (never creating it unless `create`): a handle stays bound to the
    file it opened, so a collection deleted and made again under its name is never written through it."""
    mode = "rwc" if create else "rw"
    db = sqlite3.connect(f"file:{path}?mode={mode}", uri=True, timeout=30, isolation_level=None,
                         check_same_thread=False)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA busy_timeout=30000")
    except BaseException:
        db.close()
        raise
    return db


class SqliteStore(Store):
    """One collection's file. One connection for every thread, used under a lock (an operation is a few ms
    of SQLite; searches run on the in-memory index), so `close` releases every file handle at once."""

    def __init__(self, path: Path, *, create: bool = False) -> None:
        self.path = path
        self.name = path.parent.name
        self._lock = threading.RLock()
        try:
            self._conn: sqlite3.Connection | None = _connect(path, create)
        except sqlite3.OperationalError as e:  # the file is gone (deleted meanwhile) or unreadable
            raise NotFoundError(f"no collection named {self.name[:80]!r}") from e
        try:
            self._conn.executescript(SCHEMA)  # idempotent; executescript manages its own transaction
            self._upgrade()
        except BaseException:
            self.close()
            raise

    def _upgrade(self) -> None:
        """Stores from before identities or moments: add the columns they lack, and give the collection its uid
        (once, under the write lock, so replicas opening it together agree)."""
        with self.transaction() as db:
            for table, columns in ADDED_COLUMNS.items():
                have = {r[1] for r in db.execute(f"PRAGMA table_info({table})")}
                for column, decl in columns.items():
                    if column not in have:
                        db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")
            db.execute("UPDATE meta SET uid = ? WHERE uid IS NULL", (uuid.uuid4().hex,))

    @contextmanager
    def _use(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            if self._conn is None:
                raise CollectionGone(self.name)
            yield self._conn

    def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """One read, fetched whole under the lock (never in the middle of another thread's transaction)."""
        with self._use() as db:
            return db.execute(sql, params).fetchall()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT: one writer at a time across threads and processes."""
        with self._use() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """A transaction on a collection that is not deleted (checked under the write lock, so a write either
        commits before a drop or fails with CollectionGone after it: none is acknowledged and then lost)."""
        with self.transaction() as db:
            row = db.execute("SELECT deleted FROM meta").fetchone()
            if row is None or row[0]:
                raise CollectionGone(self.name)
            yield db

    def mark_deleted(self) -> None:
        """The drop's first step, in the file itself: every handle (other replicas' too) sees it."""
        with self.write() as db:
            db.execute("UPDATE meta SET deleted = 1")
            db.execute("INSERT INTO ops (op, item_id) VALUES ('drop', NULL)")

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    # -- meta ------------------------------------------------------------------------------------

    def init_meta(self, name: str, kind: str, adapter_ref: str, factory: str, dim: int,
                  moments: MomentSpec | None = None) -> None:
        with self.transaction() as db:
            db.execute("INSERT INTO meta (id, name, kind, adapter_ref, factory, dim, generation, reindex_target, "
                       "created, uid, moments) VALUES (1, ?, ?, ?, ?, ?, 0, NULL, ?, ?, ?)",
                       (name, kind, adapter_ref, factory, dim, time.time(), uuid.uuid4().hex,
                        moments.to_json() if moments else None))

    def meta(self) -> CollectionMeta:
        with self._use() as db:
            row = db.execute(f"SELECT {META_COLUMNS}, deleted FROM meta").fetchone()
        if row is None or row[-1]:
            raise CollectionGone(self.name)
        name, kind, adapter_ref, factory, dim, generation, target, created, uid, moments, _ = row
        return CollectionMeta(name, kind, adapter_ref, factory, dim, generation, target, created, uid,
                              MomentSpec.from_json(moments))

    def set_reindex_target(self, ref: str | None) -> None:
        with self.write() as db:
            db.execute("UPDATE meta SET reindex_target = ?", (ref,))

    # -- items -----------------------------------------------------------------------------------

    def add(self, items: Sequence[NewItem], generation: int) -> list[int]:
        """Insert items with their embeddings for `generation`, atomically; duplicate external ids
        (in the batch or the collection) reject the whole batch."""
        ids = [it.external_id for it in items]
        if len(set(ids)) != len(ids):
            dupes = sorted({i for i in ids if ids.count(i) > 1})
            raise ConflictError(f"duplicate ids in the request: {dupes[:5]}")
        with self.write() as db:
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
                    "INSERT INTO items (external_id, source, sha256, metadata, created, moments) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (it.external_id, it.source, it.sha256, json.dumps(it.metadata), now, moments_json(it.moments)))
                item_id = int(cur.lastrowid or 0)
                db.execute("INSERT INTO embeddings VALUES (?, ?, ?)",
                           (item_id, generation, vector_bytes(it.vector)))
                db.execute("INSERT INTO ops (op, item_id) VALUES ('add', ?)", (item_id,))
                out.append(item_id)
            return out

    def delete(self, external_id: str) -> int:
        with self.write() as db:
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
        rows = self._rows(f"SELECT {ITEM_COLUMNS} FROM items WHERE item_id IN ({placeholders})", list(item_ids))
        return {r[0]: _item(r) for r in rows}

    def get(self, external_id: str) -> Item:
        rows = self._rows(f"SELECT {ITEM_COLUMNS} FROM items WHERE external_id = ?", (external_id,))
        if not rows:
            raise NotFoundError(f"no item {external_id[:80]!r}")
        return _item(rows[0])

    def existing(self, external_ids: Sequence[str]) -> set[str]:
        found: set[str] = set()
        for start in range(0, len(external_ids), 500):
            chunk = list(external_ids[start:start + 500])
            placeholders = ",".join("?" * len(chunk))
            found |= {r[0] for r in self._rows(
                f"SELECT external_id FROM items WHERE external_id IN ({placeholders})", chunk)}
        return found

    def count(self) -> int:
        return int(self._rows("SELECT count(*) FROM items")[0][0])

    def last_seq(self) -> int:
        return int(self._rows("SELECT coalesce(max(seq), 0) FROM ops")[0][0])

    def ops_after(self, seq: int) -> list[Op]:
        return [(int(s), str(o), i) for s, o, i in
                self._rows("SELECT seq, op, item_id FROM ops WHERE seq > ? ORDER BY seq", (seq,))]

    def vectors(self, item_ids: Sequence[int], generation: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
        """-> (ids (n,), vectors (n, dim)) for the items that still exist."""
        found_ids: list[int] = []
        blobs: list[bytes] = []
        for start in range(0, len(item_ids), 500):
            chunk = list(item_ids[start:start + 500])
            placeholders = ",".join("?" * len(chunk))
            for item_id, blob in self._rows(
                    f"SELECT item_id, vector FROM embeddings WHERE generation = ? AND item_id IN ({placeholders})",
                    [generation, *chunk]):
                found_ids.append(int(item_id))
                blobs.append(blob)
        return stack(found_ids, blobs, dim)

    def all_vectors(self, generation: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
        rows = self._rows("SELECT item_id, vector FROM embeddings WHERE generation = ? ORDER BY item_id",
                          (generation,))
        return stack([int(r[0]) for r in rows], [r[1] for r in rows], dim)

    # -- re-indexing -----------------------------------------------------------------------------

    def state(self, generation: int, dim: int) -> tuple[int, list[Item], np.ndarray, np.ndarray]:
        with self._use() as db:
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
            for item_id, created in self._rows(f"SELECT item_id, created FROM items WHERE item_id IN ({marks})",
                                               chunk):
                out[int(item_id)] = (float(created), {})
            for item_id, generation, blob in self._rows(
                    f"SELECT item_id, generation, vector FROM embeddings WHERE item_id IN ({marks})", chunk):
                out[int(item_id)][1][int(generation)] = bytes(blob)
        return out

    def all_items(self) -> list[Item]:
        rows = self._rows(f"SELECT {ITEM_COLUMNS} FROM items ORDER BY item_id")
        return [_item(r) for r in rows]

    def missing(self, generation: int, limit: int) -> list[Item]:
        rows = self._rows(
            f"SELECT {ITEM_COLUMNS} FROM items WHERE item_id NOT IN "
            "(SELECT item_id FROM embeddings WHERE generation = ?) ORDER BY item_id LIMIT ?", (generation, limit))
        return [_item(r) for r in rows]

    def put_vectors(self, vectors: dict[int, np.ndarray], generation: int) -> None:
        if not vectors:
            return
        with self.write() as db:
            live = {r[0] for r in db.execute(
                f"SELECT item_id FROM items WHERE item_id IN ({','.join('?' * len(vectors))})", list(vectors))}
            db.executemany("INSERT OR REPLACE INTO embeddings VALUES (?, ?, ?)",
                           [(i, generation, vector_bytes(v))
                            for i, v in vectors.items() if i in live])

    def switch(self, generation: int, adapter_ref: str) -> bool:
        with self.write() as db:
            missing = db.execute("SELECT count(*) FROM items WHERE item_id NOT IN "
                                 "(SELECT item_id FROM embeddings WHERE generation = ?)", (generation,)).fetchone()[0]
            if missing:
                return False
            db.execute("UPDATE meta SET generation = ?, adapter_ref = ?, reindex_target = NULL",
                       (generation, adapter_ref))
            db.execute("DELETE FROM embeddings WHERE generation < ?", (generation,))
            db.execute("INSERT INTO ops (op, item_id) VALUES ('switch', NULL)")
            return True
