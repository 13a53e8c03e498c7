"""The collection store on PostgreSQL (psycopg 3, a connection pool), for replicas on several hosts.

Tables (prefixed, so the database can be shared): `uniadapter_collections` (one row per collection:
definition, adapter binding, generation, and `last_seq`, the op counter), `uniadapter_items`,
`uniadapter_embeddings` (float32 bytes per item and generation: bytea, see bench/store_backends.py) and
`uniadapter_ops` (the ordered log). A write first bumps its collection's `last_seq` (`UPDATE ... RETURNING`),
which locks the collection's row until the transaction ends: writers to one collection queue, and their ops
become visible in seq order, so a replica replaying "ops after seq N" never skips one. The same transaction
sends `NOTIFY uniadapter_collections, '<name>'`, delivered to every replica's listener at commit.

An add is three statements whatever its size: one statement bumps `last_seq`, takes the item ids from the
sequence, logs the ops and notifies (`RESERVE_ADDS`), then a binary `COPY` of the items and one of the
embeddings (one INSERT per row through `executemany` ingested at 0.24x SQLite's rate; see
bench/store_backends.py). COPY has no ON CONFLICT: a taken external id fails the items' COPY (the unique
index sees it: no query looks first) and the whole transaction, and the taken ids are then named. A re-index's
vectors (`put_vectors`) go in the same way: one COPY into a temporary table, one upsert from it.

Schema migrations are numbered and applied at start-up under an advisory lock, so replicas starting together
apply each exactly once. When PostgreSQL cannot be reached, calls raise `StoreUnavailableError` (503 with
Retry-After for writes; reads keep answering from the in-memory index).
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import psycopg

from uniadapter_serve.errors import ConflictError, NotFoundError
from uniadapter_serve.service.collections.cleanup import remove_dead_media_dirs
from uniadapter_serve.service.collections.pg_link import UNAVAILABLE, PgLink
from uniadapter_serve.service.collections.store import (
    CollectionGone,
    CollectionMeta,
    GenerationChanged,
    Item,
    MomentSpec,
    NewItem,
    Op,
    Store,
    StoreBackend,
    StoreUnavailableError,
    Swept,
    moments_json,
    read_metadata,
    read_moments,
    stack,
    vector_bytes,
)

log = logging.getLogger(__name__)

CHANNEL = "uniadapter_collections"
MIGRATION_LOCK = 0x756E6961  # any fixed 64-bit key: the advisory lock every replica takes to migrate
MIGRATIONS: list[str] = [
    # 1: the store
    """
    CREATE TABLE uniadapter_collections (
        id BIGSERIAL PRIMARY KEY, name TEXT NOT NULL UNIQUE, kind TEXT NOT NULL, adapter_ref TEXT NOT NULL,
        factory TEXT NOT NULL, dim INTEGER NOT NULL, generation INTEGER NOT NULL DEFAULT 0, reindex_target TEXT,
        created DOUBLE PRECISION NOT NULL, last_seq BIGINT NOT NULL DEFAULT 0
    );
    CREATE TABLE uniadapter_items (
        item_id BIGSERIAL PRIMARY KEY,
        collection_id BIGINT NOT NULL REFERENCES uniadapter_collections (id) ON DELETE CASCADE,
        external_id TEXT NOT NULL, source TEXT NOT NULL, sha256 TEXT, metadata TEXT NOT NULL,
        created DOUBLE PRECISION NOT NULL,
        UNIQUE (collection_id, external_id)
    );
    CREATE TABLE uniadapter_embeddings (
        item_id BIGINT NOT NULL REFERENCES uniadapter_items (item_id) ON DELETE CASCADE,
        generation INTEGER NOT NULL, vector BYTEA NOT NULL,
        PRIMARY KEY (item_id, generation)
    );
    CREATE TABLE uniadapter_ops (
        collection_id BIGINT NOT NULL REFERENCES uniadapter_collections (id) ON DELETE CASCADE,
        seq BIGINT NOT NULL, op TEXT NOT NULL, item_id BIGINT,
        PRIMARY KEY (collection_id, seq)
    );
    """,
    # 2: collection identities (a name deleted and created again is another collection)
    """
    ALTER TABLE uniadapter_collections ADD COLUMN uid TEXT NOT NULL DEFAULT gen_random_uuid()::text;
    ALTER TABLE uniadapter_collections ADD COLUMN media_dir TEXT;
    """,
    # 3: items and ops reference their collection, checked once per statement instead of once per row (the
    # row-level foreign keys' triggers were half of an add's server time); deleting a collection still
    # deletes its rows (embeddings follow their items through the foreign key that stays)
    """
    CREATE FUNCTION uniadapter_check_collection() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        -- what a foreign key check does per row: lock the referenced rows against a delete, then look
        PERFORM 1 FROM uniadapter_collections WHERE id IN (SELECT DISTINCT collection_id FROM added)
            FOR KEY SHARE;
        IF EXISTS (SELECT 1 FROM added a WHERE NOT EXISTS (
                SELECT 1 FROM uniadapter_collections c WHERE c.id = a.collection_id)) THEN
            RAISE foreign_key_violation USING MESSAGE = format('rows of %I reference no collection', TG_TABLE_NAME);
        END IF;
        RETURN NULL;
    END $$;
    CREATE FUNCTION uniadapter_delete_collection_rows() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        DELETE FROM uniadapter_items WHERE collection_id = OLD.id;
        DELETE FROM uniadapter_ops WHERE collection_id = OLD.id;
        RETURN NULL;
    END $$;
    ALTER TABLE uniadapter_items DROP CONSTRAINT IF EXISTS uniadapter_items_collection_id_fkey;
    ALTER TABLE uniadapter_ops DROP CONSTRAINT IF EXISTS uniadapter_ops_collection_id_fkey;
    CREATE TRIGGER uniadapter_items_collection AFTER INSERT ON uniadapter_items REFERENCING NEW TABLE AS added
        FOR EACH STATEMENT EXECUTE FUNCTION uniadapter_check_collection();
    CREATE TRIGGER uniadapter_ops_collection AFTER INSERT ON uniadapter_ops REFERENCING NEW TABLE AS added
        FOR EACH STATEMENT EXECUTE FUNCTION uniadapter_check_collection();
    CREATE TRIGGER uniadapter_collection_rows AFTER DELETE ON uniadapter_collections
        FOR EACH ROW EXECUTE FUNCTION uniadapter_delete_collection_rows();
    """,
    # 4: moments of long videos: a collection's window / stride (JSON), an item's moments (JSON spans); their
    # embeddings stay one row per item and generation (one vector per moment, concatenated)
    """
    ALTER TABLE uniadapter_collections ADD COLUMN moments TEXT;
    ALTER TABLE uniadapter_items ADD COLUMN moments TEXT;
    """,
]
ITEM_COLUMNS = "item_id, external_id, source, sha256, metadata, created, moments"
TAKEN = ("SELECT i.external_id FROM unnest(%s::text[]) AS u (external_id) JOIN uniadapter_items i "
         "ON i.collection_id = %s::bigint AND i.external_id = u.external_id")
"""which of these external ids a collection has: one unique-index probe per id (`= ANY(array)` let the planner
scan every item of the collection: the cost of an add grew with the collection)"""
RESERVE_ADDS = """
WITH bumped AS (
    UPDATE uniadapter_collections SET last_seq = last_seq + %(n)s::bigint WHERE id = %(id)s::bigint
    RETURNING last_seq - %(n)s::bigint AS base, generation
), fresh AS (
    SELECT bumped.base + k AS seq, nextval('uniadapter_items_item_id_seq') AS item_id
    FROM bumped, generate_series(1, %(n)s::int) AS k
), logged AS (
    INSERT INTO uniadapter_ops (collection_id, seq, op, item_id) SELECT %(id)s::bigint, seq, 'add', item_id FROM fresh
    RETURNING seq, item_id
)
SELECT generation, ARRAY(SELECT item_id FROM logged ORDER BY seq), pg_notify(%(channel)s, %(name)s) FROM bumped
"""
"""an add's first statement: no row if the collection is gone; the ops log item ids that have no row yet (the
transaction writes them next, or rolls everything back); BIGSERIAL named the sequence"""
COPY_ITEMS = ("COPY uniadapter_items (item_id, collection_id, external_id, source, sha256, metadata, created, "
              "moments) FROM STDIN (FORMAT BINARY)")
COPY_EMBEDDINGS = "COPY uniadapter_embeddings (item_id, generation, vector) FROM STDIN (FORMAT BINARY)"
CREATE_PUT_TABLE = ("CREATE TEMPORARY TABLE IF NOT EXISTS uniadapter_put (item_id int8, vector bytea) "
                    "ON COMMIT DELETE ROWS")
"""a connection's own staging table for `put_vectors` (emptied at each commit)"""
COPY_PUT = "COPY uniadapter_put (item_id, vector) FROM STDIN (FORMAT BINARY)"
UPSERT_PUT = ("INSERT INTO uniadapter_embeddings (item_id, generation, vector) SELECT p.item_id, %s, p.vector "
              "FROM uniadapter_put p JOIN uniadapter_items i ON i.item_id = p.item_id AND i.collection_id = %s "
              "ON CONFLICT (item_id, generation) DO UPDATE SET vector = EXCLUDED.vector")
NUL_IN_TEXT = "PostgreSQL text fields cannot contain NUL (0x00) bytes"
ADD_ATTEMPTS = 3
"""an add whose COPY met a taken id that was deleted before the conflict could be named is tried again"""


def _item(row: Sequence[Any]) -> Item:
    return Item(int(row[0]), row[1], row[2], row[3], read_metadata(row[4]), float(row[5]), read_moments(row[6]))


def refuse_nul(rows: Sequence[Sequence[Any]]) -> None:
    """psycopg's text parameters refuse a NUL before PostgreSQL sees it; binary COPY sends text as it is, so
    the same refusal (the same error) is made here."""
    for row in rows:
        for value in row:
            if isinstance(value, str) and "\x00" in value:
                raise psycopg.DataError(NUL_IN_TEXT)


class PostgresBackend(StoreBackend):
    """Every collection in one PostgreSQL database; snapshots in this process's `local_root`, uploaded
    media under the shared media root (`MEDIA_ROOT/.collections/NAME/`)."""

    kind = "postgresql"

    def __init__(self, url: str, *, local_root: Path, media_root: Path, pool_size: int = 8,
                 timeout_s: float = 2.0) -> None:
        self.url = url
        self.local_root = local_root
        self.shared_media = self.shared_root = media_root / ".collections"
        try:
            self.link = PgLink(url, pool_size=pool_size, timeout_s=timeout_s)
        except UNAVAILABLE as e:
            raise StoreUnavailableError(f"PostgreSQL at {safe_url(url)} is not reachable: {e}") from e
        try:
            migrate_schema(url, timeout_s)
        except UNAVAILABLE as e:
            self.link.close()
            raise StoreUnavailableError(f"PostgreSQL at {safe_url(url)} is not reachable: {e}") from e
        self.listening = self.link.listening
        """set while the LISTEN connection is up (changes from other replicas reach this one)"""

    # -- connections ---------------------------------------------------------------------------------

    def connection(self) -> contextlib.AbstractContextManager[psycopg.Connection[Any]]:
        """A pooled connection; StoreUnavailableError at once while PostgreSQL is down (see pg_link)."""
        return self.link.connection()

    def read(self, fn: Callable[[psycopg.Connection[Any]], Any]) -> Any:
        """Run a read; once more if PostgreSQL just restarted (every pooled connection broken)."""
        return self.link.read(fn)

    # -- collections ---------------------------------------------------------------------------------

    def names(self) -> list[str]:
        rows = self.read(lambda c: c.execute("SELECT name FROM uniadapter_collections ORDER BY name").fetchall())
        return [r[0] for r in rows]

    def identities(self) -> dict[str, str]:
        rows = self.read(lambda c: c.execute("SELECT name, uid FROM uniadapter_collections").fetchall())
        return {r[0]: r[1] for r in rows}

    def create(self, name: str, kind: str, adapter_ref: str, factory: str, dim: int,
               moments: MomentSpec | None = None) -> Store:
        uid = uuid.uuid4().hex
        folder = f"{name}@{uid[:16]}"
        with self.connection() as conn, conn.transaction():
            row = conn.execute(
                "INSERT INTO uniadapter_collections (name, kind, adapter_ref, factory, dim, created, uid, media_dir, "
                "moments) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (name) DO NOTHING RETURNING id",
                (name, kind, adapter_ref, factory, dim, time.time(), uid, folder,
                 moments.to_json() if moments else None)).fetchone()
            if row is None:
                raise ConflictError(f"collection {name!r} already exists")
            conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, name))
        return PostgresStore(self, int(row[0]), name, folder)

    def open(self, name: str) -> Store:
        row = self.read(lambda c: c.execute("SELECT id, media_dir FROM uniadapter_collections WHERE name = %s",
                                            (name,)).fetchone())
        if row is None:
            raise NotFoundError(f"no collection named {name!r}")
        return PostgresStore(self, int(row[0]), name, row[1])

    def drop(self, name: str, uid: str | None = None) -> None:
        with self.connection() as conn, conn.transaction():
            row = conn.execute("DELETE FROM uniadapter_collections WHERE name = %s AND (%s::text IS NULL OR uid = %s) "
                               "RETURNING id, media_dir", (name, uid, uid)).fetchone()
            if row is None:
                if uid is not None:
                    raise CollectionGone(name)
                raise NotFoundError(f"no collection named {name!r}")
            conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, name))
        # its uploaded media (a folder of this incarnation alone: one made later under the name has its own)
        shutil.rmtree(self.shared_media / (row[1] or name), ignore_errors=True)

    def local_dir(self, name: str) -> Path:
        return self.local_root / name

    def media_dir(self, name: str) -> Path:
        """The media folder of collections made before each had its own (see `PostgresStore.media_folder`)."""
        return self.shared_media / name

    # -- change events -------------------------------------------------------------------------------

    def listen(self, on_change: Callable[[str], None]) -> None:
        """LISTEN on a connection of its own; `on_change("")` whenever changes may have been missed (LISTEN
        issued again, PostgreSQL back after an outage): check every collection against the op log."""
        self.link.listen(CHANNEL, on_change)

    def remove_leftovers(self, live: set[str], min_age_s: float) -> Swept:
        """Shared media folders of collections that were deleted (their files older than `min_age_s`)."""
        rows = self.read(lambda c: c.execute("SELECT coalesce(media_dir, name) FROM uniadapter_collections"
                                             ).fetchall())
        return remove_dead_media_dirs(self.shared_media, {r[0] for r in rows}, min_age_s)

    def status(self) -> dict[str, Any]:
        ok = self.link.ok()
        return {"backend": self.kind, "ok": ok, "error": None if ok else self.link.last_error,
                "url": safe_url(self.url)}

    def close(self) -> None:
        self.link.close()


def safe_url(url: str) -> str:
    """The URL without its password."""
    info = psycopg.conninfo.conninfo_to_dict(url)
    user, host, port, db = (info.get(k, "") for k in ("user", "host", "port", "dbname"))
    return f"postgresql://{user}@{host}:{port or 5432}/{db}"


def migrate_schema(url: str, timeout_s: float = 5.0) -> list[int]:
    """Apply the migrations this database lacks, under an advisory lock; -> the versions applied now."""
    applied_now: list[int] = []
    with psycopg.connect(url, autocommit=True, connect_timeout=max(1, int(timeout_s))) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK,))
        try:
            conn.execute("CREATE TABLE IF NOT EXISTS uniadapter_schema (version INTEGER PRIMARY KEY, "
                         "applied DOUBLE PRECISION NOT NULL)")
            done = {int(r[0]) for r in conn.execute("SELECT version FROM uniadapter_schema").fetchall()}
            for version, sql in enumerate(MIGRATIONS, start=1):
                if version in done:
                    continue
                with conn.transaction():
                    conn.execute(sql)
                    conn.execute("INSERT INTO uniadapter_schema VALUES (%s, %s)", (version, time.time()))
                applied_now.append(version)
                log.info("collection store schema migrated to version %d", version)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK,))
    return applied_now


class PostgresStore(Store):
    def __init__(self, backend: PostgresBackend, collection_id: int, name: str, media_subdir: str | None = None
                 ) -> None:
        self.backend = backend
        self.id = collection_id
        self.name = name
        self.media_subdir = media_subdir
        """its folder under the shared media root (None: made before each collection had its own, `name`)"""

    def media_folder(self) -> Path:
        return self.backend.shared_media / (self.media_subdir or self.name)

    def _write(self) -> contextlib.AbstractContextManager[psycopg.Connection[Any]]:
        return self.backend.connection()

    def _bump(self, conn: psycopg.Connection[Any], n: int) -> tuple[int, int]:
        """Reserve n op seqs (locking the collection's row until commit) -> (first seq, generation)."""
        row = conn.execute("UPDATE uniadapter_collections SET last_seq = last_seq + %s WHERE id = %s "
                           "RETURNING last_seq, generation", (n, self.id)).fetchone()
        if row is None:
            raise CollectionGone(self.name)
        return int(row[0]) - n + 1, int(row[1])

    def _notify(self, conn: psycopg.Connection[Any]) -> None:
        conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, self.name))

    # -- meta ------------------------------------------------------------------------------------------

    def meta(self) -> CollectionMeta:
        row = self.backend.read(lambda c: c.execute(
            "SELECT name, kind, adapter_ref, factory, dim, generation, reindex_target, created, uid, moments "
            "FROM uniadapter_collections WHERE id = %s", (self.id,)).fetchone())
        if row is None:
            raise CollectionGone(self.name)
        return CollectionMeta(row[0], row[1], row[2], row[3], int(row[4]), int(row[5]), row[6], float(row[7]),
                              row[8], MomentSpec.from_json(row[9]))

    def set_reindex_target(self, ref: str | None) -> None:
        with self._write() as conn, conn.transaction():
            row = conn.execute("UPDATE uniadapter_collections SET reindex_target = %s WHERE id = %s RETURNING id",
                               (ref, self.id)).fetchone()
            if row is None:
                raise CollectionGone(self.name)

    # -- items -------------------------------------------------------------------------------------------

    def add(self, items: Sequence[NewItem], generation: int) -> list[int]:
        ids = [it.external_id for it in items]
        if len(set(ids)) != len(ids):
            dupes = sorted({i for i in ids if ids.count(i) > 1})
            raise ConflictError(f"duplicate ids in the request: {dupes[:5]}")
        now = time.time()
        rows = [(it.external_id, it.source, it.sha256, json.dumps(it.metadata), now, moments_json(it.moments))
                for it in items]
        blobs = [{generation: vector_bytes(it.vector)} for it in items]
        for _ in range(ADD_ATTEMPTS):
            try:
                with self._write() as conn, conn.transaction():
                    current, item_ids = self._reserve_adds(conn, len(items))
                    if current != generation:
                        raise GenerationChanged()
                    refuse_nul(rows)
                    self._copy_items(conn, item_ids, rows)
                    self._copy_vectors(conn, item_ids, blobs)
                    return item_ids
            except psycopg.errors.UniqueViolation as e:
                conflict = e
            # rolled back; name the taken ids (a savepoint to name them under the lock cost 5 % of an add)
            taken = self.existing(ids)
            if taken:
                raise ConflictError(f"ids already in the collection: {sorted(taken)[:5]}") from None
            # what was in the way was deleted meanwhile: add again
        raise conflict

    def _reserve_adds(self, conn: psycopg.Connection[Any], n: int) -> tuple[int, list[int]]:
        """One statement for what an add of n items needs before its rows: n op seqs (locking the
        collection's row until commit), n item ids, the n 'add' ops and the notification -> (generation,
        item ids in op order)."""
        row = conn.execute(RESERVE_ADDS, {"n": n, "id": self.id, "channel": CHANNEL, "name": self.name}).fetchone()
        if row is None:
            raise CollectionGone(self.name)
        return int(row[0]), [int(i) for i in row[1]]

    def _copy_items(self, conn: psycopg.Connection[Any], item_ids: list[int],
                    rows: list[tuple[str, str, str | None, str, float, str | None]]) -> None:
        """rows: (external id, source, sha256, metadata JSON, created, moments JSON), one per item id."""
        with conn.cursor() as cur, cur.copy(COPY_ITEMS) as copy:
            copy.set_types(["int8", "int8", "text", "text", "text", "text", "float8", "text"])
            for item_id, row in zip(item_ids, rows, strict=True):
                copy.write_row((item_id, self.id, *row))

    def _copy_vectors(self, conn: psycopg.Connection[Any], item_ids: list[int], blobs: list[dict[int, bytes]]
                      ) -> None:
        """blobs: generation -> float32 bytes, one dict per item id."""
        with conn.cursor() as cur, cur.copy(COPY_EMBEDDINGS) as copy:
            copy.set_types(["int8", "int4", "bytea"])
            for item_id, vectors in zip(item_ids, blobs, strict=True):
                for gen, blob in vectors.items():
                    copy.write_row((item_id, gen, blob))

    def import_items(self, rows: Sequence[tuple[Item, float, dict[int, bytes]]]) -> None:
        """Migration: insert items as they are (with their created time and an embedding per generation),
        each logged as an add; external ids already here are skipped (so an interrupted copy resumes)."""
        with self._write() as conn, conn.transaction():
            taken = {r[0] for r in conn.execute(TAKEN, ([it.external_id for it, _, _ in rows], self.id)).fetchall()}
            todo = [r for r in rows if r[0].external_id not in taken]
            if not todo:
                return
            item_rows = [(it.external_id, it.source, it.sha256, json.dumps(it.metadata), created,
                          moments_json(it.moments)) for it, created, _ in todo]
            refuse_nul(item_rows)
            _, item_ids = self._reserve_adds(conn, len(todo))
            self._copy_items(conn, item_ids, item_rows)
            self._copy_vectors(conn, item_ids, [vectors for _, _, vectors in todo])

    def set_state(self, meta: CollectionMeta) -> None:
        """Migration: the source's generation, adapter binding and creation time."""
        with self._write() as conn, conn.transaction():
            conn.execute("UPDATE uniadapter_collections SET generation = %s, adapter_ref = %s, reindex_target = %s, "
                         "created = %s WHERE id = %s",
                         (meta.generation, meta.adapter_ref, meta.reindex_target, meta.created, self.id))

    def delete(self, external_id: str) -> int:
        with self._write() as conn, conn.transaction():
            first, _ = self._bump(conn, 1)
            row = conn.execute("DELETE FROM uniadapter_items WHERE collection_id = %s AND external_id = %s "
                               "RETURNING item_id", (self.id, external_id)).fetchone()
            if row is None:
                raise NotFoundError(f"no item {external_id!r}")  # rolls the seq back too
            conn.execute("INSERT INTO uniadapter_ops VALUES (%s, %s, 'delete', %s)", (self.id, first, row[0]))
            self._notify(conn)
            return int(row[0])

    def items(self, item_ids: Sequence[int]) -> dict[int, Item]:
        if not item_ids:
            return {}
        rows = self.backend.read(lambda c: c.execute(
            "SELECT i.item_id, i.external_id, i.source, i.sha256, i.metadata, i.created, i.moments "
            "FROM unnest(%s::bigint[]) AS u (item_id) "
            "JOIN uniadapter_items i USING (item_id) WHERE i.collection_id = %s::bigint",
            (list(item_ids), self.id)).fetchall())
        return {int(r[0]): _item(r) for r in rows}

    def get(self, external_id: str) -> Item:
        row = self.backend.read(lambda c: c.execute(
            f"SELECT {ITEM_COLUMNS} FROM uniadapter_items WHERE collection_id = %s AND external_id = %s",
            (self.id, external_id)).fetchone())
        if row is None:
            raise NotFoundError(f"no item {external_id!r}")
        return _item(row)

    def existing(self, external_ids: Sequence[str]) -> set[str]:
        rows = self.backend.read(lambda c: c.execute(TAKEN, (list(external_ids), self.id)).fetchall())
        return {r[0] for r in rows}

    def count(self) -> int:
        row = self.backend.read(lambda c: c.execute(
            "SELECT count(*) FROM uniadapter_items WHERE collection_id = %s", (self.id,)).fetchone())
        return int(row[0])

    def all_items(self) -> list[Item]:
        rows = self.backend.read(lambda c: c.execute(
            f"SELECT {ITEM_COLUMNS} FROM uniadapter_items WHERE collection_id = %s ORDER BY item_id",
            (self.id,)).fetchall())
        return [_item(r) for r in rows]

    # -- the op log and vectors --------------------------------------------------------------------------

    def last_seq(self) -> int:
        row = self.backend.read(lambda c: c.execute(
            "SELECT last_seq FROM uniadapter_collections WHERE id = %s", (self.id,)).fetchone())
        if row is None:
            raise CollectionGone(self.name)
        return int(row[0])

    def ops_after(self, seq: int) -> list[Op]:
        rows = self.backend.read(lambda c: c.execute(
            "SELECT seq, op, item_id FROM uniadapter_ops WHERE collection_id = %s AND seq > %s ORDER BY seq",
            (self.id, seq)).fetchall())
        return [(int(s), str(o), None if i is None else int(i)) for s, o, i in rows]

    def vectors(self, item_ids: Sequence[int], generation: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
        rows = self.backend.read(lambda c: c.execute(
            "SELECT e.item_id, e.vector FROM unnest(%s::bigint[]) AS u (item_id) "
            "JOIN uniadapter_embeddings e ON e.item_id = u.item_id AND e.generation = %s "
            "JOIN uniadapter_items i ON i.item_id = e.item_id WHERE i.collection_id = %s::bigint ORDER BY e.item_id",
            (list(item_ids), generation, self.id)).fetchall())
        return stack([int(r[0]) for r in rows], [bytes(r[1]) for r in rows], dim)

    def state(self, generation: int, dim: int) -> tuple[int, list[Item], np.ndarray, np.ndarray]:
        def read(conn: psycopg.Connection[Any]) -> tuple[int, list[Item], np.ndarray, np.ndarray]:
            with conn.transaction():
                conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")  # one snapshot for all three
                row = conn.execute("SELECT last_seq FROM uniadapter_collections WHERE id = %s", (self.id,)).fetchone()
                if row is None:
                    raise CollectionGone(self.name)
                items = [_item(r) for r in conn.execute(
                    f"SELECT {ITEM_COLUMNS} FROM uniadapter_items WHERE collection_id = %s ORDER BY item_id",
                    (self.id,)).fetchall()]
                vectors = conn.execute(
                    "SELECT e.item_id, e.vector FROM uniadapter_embeddings e JOIN uniadapter_items i USING (item_id) "
                    "WHERE i.collection_id = %s AND e.generation = %s ORDER BY e.item_id",
                    (self.id, generation)).fetchall()
            ids, stacked = stack([int(r[0]) for r in vectors], [bytes(r[1]) for r in vectors], dim)
            return int(row[0]), items, ids, stacked

        result: tuple[int, list[Item], np.ndarray, np.ndarray] = self.backend.read(read)
        return result

    def all_vectors(self, generation: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
        rows = self.backend.read(lambda c: c.execute(
            "SELECT e.item_id, e.vector FROM uniadapter_embeddings e JOIN uniadapter_items i USING (item_id) "
            "WHERE i.collection_id = %s AND e.generation = %s ORDER BY e.item_id", (self.id, generation)).fetchall())
        return stack([int(r[0]) for r in rows], [bytes(r[1]) for r in rows], dim)

    def embeddings_of(self, item_ids: Sequence[int]) -> dict[int, dict[int, bytes]]:
        """item id -> generation -> float32 bytes (every generation; for migration checks)."""
        rows = self.backend.read(lambda c: c.execute(
            "SELECT item_id, generation, vector FROM uniadapter_embeddings WHERE item_id = ANY(%s)",
            (list(item_ids),)).fetchall())
        out: dict[int, dict[int, bytes]] = {}
        for item_id, generation, blob in rows:
            out.setdefault(int(item_id), {})[int(generation)] = bytes(blob)
        return out

    # -- re-indexing ---------------------------------------------------------------------------------------

    def missing(self, generation: int, limit: int) -> list[Item]:
        rows = self.backend.read(lambda c: c.execute(
            f"SELECT {ITEM_COLUMNS} FROM uniadapter_items i WHERE collection_id = %s AND NOT EXISTS "
            "(SELECT 1 FROM uniadapter_embeddings e WHERE e.item_id = i.item_id AND e.generation = %s) "
            "ORDER BY item_id LIMIT %s", (self.id, generation, limit)).fetchall())
        return [_item(r) for r in rows]

    def put_vectors(self, vectors: dict[int, np.ndarray], generation: int) -> None:
        if not vectors:
            return
        with self._write() as conn, conn.transaction():
            # the vectors go in by one binary COPY into a temporary table, then one upsert of those whose item is
            # still in this collection (an item deleted meanwhile gets none); `executemany` sent a statement a row
            conn.execute(CREATE_PUT_TABLE)
            with conn.cursor() as cur, cur.copy(COPY_PUT) as copy:
                copy.set_types(["int8", "bytea"])
                for item_id, vector in vectors.items():
                    copy.write_row((item_id, vector_bytes(vector)))
            conn.execute(UPSERT_PUT, (generation, self.id))

    def switch(self, generation: int, adapter_ref: str) -> bool:
        with self._write() as conn, conn.transaction():
            first, _ = self._bump(conn, 1)  # locks the row: no add slips in between the check and the switch
            missing = conn.execute(
                "SELECT count(*) FROM uniadapter_items i WHERE collection_id = %s AND NOT EXISTS "
                "(SELECT 1 FROM uniadapter_embeddings e WHERE e.item_id = i.item_id AND e.generation = %s)",
                (self.id, generation)).fetchone()
            if missing is None or int(missing[0]):
                raise psycopg.Rollback()  # gives the reserved seq back; leaves the block
            conn.execute("UPDATE uniadapter_collections SET generation = %s, adapter_ref = %s, "
                         "reindex_target = NULL WHERE id = %s", (generation, adapter_ref, self.id))
            conn.execute("DELETE FROM uniadapter_embeddings e USING uniadapter_items i WHERE e.item_id = i.item_id "
                         "AND i.collection_id = %s AND e.generation < %s", (self.id, generation))
            conn.execute("INSERT INTO uniadapter_ops VALUES (%s, %s, 'switch', NULL)", (self.id, first))
            self._notify(conn)
            return True
        return False
