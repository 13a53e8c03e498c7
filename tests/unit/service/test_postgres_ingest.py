"""The PostgreSQL store's bulk add (binary COPY) on the edges COPY has and the INSERTs it replaced did not:
text it would pass to PostgreSQL unchecked, and a taken id found only when the COPY fails."""

from __future__ import annotations

import threading

import numpy as np
import psycopg
import pytest

from uniadapter_serve.errors import ConflictError
from uniadapter_serve.service.collections.postgres_store import PostgresBackend
from uniadapter_serve.service.collections.store import NewItem

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
