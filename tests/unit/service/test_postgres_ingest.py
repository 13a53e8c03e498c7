"""The PostgreSQL store's bulk add (binary COPY) on the edges COPY has and the INSERTs it replaced did not:
text it would pass to PostgreSQL unchecked, a taken id found only when the COPY fails; and the checks per
statement that replaced the row-level foreign keys to collections (migration 3)."""

from __future__ import annotations

import threading

import numpy as np
import psycopg
import pytest

from uniadapter_serve.errors import ConflictError
from uniadapter_serve.service.collections.postgres_store import PostgresBackend
from uniadapter_serve.service.collections.store import CollectionGone, NewItem

DIM = 8


def vectors(n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture
def pg(pg_server, tmp_path):
    backend = PostgresBackend(pg_server.database(), local_root=tmp_path / "local", media_root=tmp_path / "media")
    yield backend
    backend.close()


@pytest.mark.parametrize("field", ["external_id", "source", "sha256"])
def test_nul_in_text_is_refused_as_before_and_nothing_is_written(pg, field):
    store = pg.create("c", "image", "none", "flat", DIM)
    x = vectors(300, 1)
    fields = {"external_id": "ok", "source": "upload:x", "sha256": None, field: "a\x00b"}
    bad = NewItem(fields["external_id"], fields["source"], fields["sha256"], {}, x[0])
    batch = [NewItem(f"x{i}", "upload:x", None, {}, v) for i, v in enumerate(x[1:])]
    with pytest.raises(psycopg.DataError, match=r"cannot contain NUL \(0x00\) bytes"):
        store.add([*batch, bad], 0)
    assert store.count() == 0 and store.last_seq() == 0
    with pytest.raises(UnicodeEncodeError):  # a lone surrogate cannot be sent either
        store.add([*batch, NewItem("\ud800", "upload:x", None, {}, x[0])], 0)
    assert store.count() == 0 and store.last_seq() == 0
    assert len(store.add(batch, 0)) == 299  # the connections are left usable


def test_replicas_adding_the_same_id_at_once_one_wins_the_other_conflicts(pg):
    """Two handles (replicas) add 500-item batches that share one id, started together: the second to take
    the collection's lock fails its COPY on the unique index and answers the conflict, naming the id."""
    pg.create("c", "image", "none", "flat", DIM)
    stores = [pg.open("c"), pg.open("c")]
    x = vectors(1000, 2)
    batches = [[NewItem(f"r{r}-{i}", "upload:x", None, {}, x[r * 500 + i]) for i in range(499)]
               + [NewItem("shared", "upload:x", None, {"r": r}, x[r * 500 + 499])] for r in range(2)]
    start = threading.Barrier(2)
    outcomes: list[object] = [None, None]

    def add(r: int) -> None:
        start.wait()
        try:
            outcomes[r] = stores[r].add(batches[r], 0)
        except ConflictError as e:
            outcomes[r] = e

    threads = [threading.Thread(target=add, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    errors = [o for o in outcomes if isinstance(o, ConflictError)]
    assert len(errors) == 1 and "ids already in the collection: ['shared']" in str(errors[0])
    winner = next(r for r, o in enumerate(outcomes) if isinstance(o, list))
    assert stores[0].count() == 500 and stores[0].get("shared").metadata == {"r": winner}
    assert [op for _, op, _ in stores[0].ops_after(0)] == ["add"] * 500 and stores[0].last_seq() == 500


def rows_of(backend: PostgresBackend, collection_id: int) -> tuple[int, int, int]:
    """(items, embeddings, ops) stored for a collection id."""
    with backend.connection() as conn:
        row = conn.execute(
            "SELECT (SELECT count(*) FROM uniadapter_items WHERE collection_id = %(c)s), "
            "(SELECT count(*) FROM uniadapter_embeddings e JOIN uniadapter_items i USING (item_id) "
            " WHERE i.collection_id = %(c)s), "
            "(SELECT count(*) FROM uniadapter_ops WHERE collection_id = %(c)s)", {"c": collection_id}).fetchone()
    assert row is not None
    return int(row[0]), int(row[1]), int(row[2])


def test_deleting_a_collection_deletes_its_rows_and_only_its(pg):
    a, b = pg.create("a", "image", "none", "flat", DIM), pg.create("b", "image", "none", "flat", DIM)
    x = vectors(40, 3)
    for store in (a, b):
        ids = store.add([NewItem(f"x{i}", "upload:x", None, {}, v) for i, v in enumerate(x)], 0)
        store.put_vectors(dict(zip(ids, x, strict=True)), 1)
        store.delete("x0")
    assert rows_of(pg, a.id) == rows_of(pg, b.id) == (39, 78, 41)
    pg.drop("a")
    assert rows_of(pg, a.id) == (0, 0, 0) and rows_of(pg, b.id) == (39, 78, 41)
    with pg.connection() as conn:  # a delete made by hand (or by a replica on the old schema) too
        conn.execute("DELETE FROM uniadapter_collections WHERE id = %s", (b.id,))
        conn.commit()
    assert rows_of(pg, b.id) == (0, 0, 0)
    with pytest.raises(CollectionGone):
        b.add([NewItem("late", "upload:x", None, {}, x[0])], 0)


def test_rows_for_no_collection_are_refused(pg):
    store = pg.create("c", "image", "none", "flat", DIM)
    with pg.connection() as conn:
        copy_items = "COPY uniadapter_items (collection_id, external_id, source, metadata, created) FROM STDIN"
        with (pytest.raises(psycopg.errors.ForeignKeyViolation, match="uniadapter_items reference no collection"),
              conn.cursor() as cur, cur.copy(copy_items) as copy):
            copy.write_row((store.id, "fine", "upload:x", "{}", 0.0))
            copy.write_row((store.id + 1, "orphan", "upload:x", "{}", 0.0))
        conn.rollback()
        with pytest.raises(psycopg.errors.ForeignKeyViolation, match="uniadapter_ops reference no collection"):
            conn.execute("INSERT INTO uniadapter_ops VALUES (%s, 1, 'add', 1)", (store.id + 1,))
        conn.rollback()
    assert store.count() == 0 and store.ops_after(0) == []


def test_an_id_freed_before_the_conflict_is_named_is_added_again(pg, monkeypatch):
    """The COPY fails on a taken id and rolls back; if another replica deletes that item before the conflict
    is named (no id is taken any more), the add is made again and succeeds."""
    store = pg.create("c", "image", "none", "flat", DIM)
    other = pg.open("c")
    x = vectors(301, 4)
    store.add([NewItem("x3", "upload:old", None, {}, x[300])], 0)
    looked = []
    real = store.existing

    def existing(ids):
        if not looked:
            other.delete("x3")  # lands between the failed attempt and the look
        looked.append(len(ids))
        return real(ids)

    monkeypatch.setattr(store, "existing", existing)
    ids = store.add([NewItem(f"x{i}", "upload:new", None, {}, v) for i, v in enumerate(x[:300])], 0)
    assert looked == [300] and len(ids) == 300 and store.count() == 300
    assert store.get("x3").source == "upload:new"
    assert [op for _, op, _ in store.ops_after(0)] == ["add", "delete"] + ["add"] * 300
