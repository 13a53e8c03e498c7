"""Collections without a model: the store (SQLite and PostgreSQL alike) + FAISS index against brute-force numpy."""

from __future__ import annotations

import numpy as np
import pytest

from uniadapter_serve.errors import ConfigError, ConflictError, NotFoundError
from uniadapter_serve.service.collections.collection import SNAPSHOT_FILE, Collection
from uniadapter_serve.service.collections.index import VectorIndex
from uniadapter_serve.service.collections.store import NewItem

DIM = 16


def unit(n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def new(collection: Collection, vectors: np.ndarray, prefix: str = "x", start: int = 0) -> list[int]:
    items = [NewItem(f"{prefix}{start + i}", "upload:x", None, {"i": start + i}, v) for i, v in enumerate(vectors)]
    return collection.store.add(items, collection.meta.generation)


def open_collection(backend, name: str = "c") -> Collection:
    return Collection(backend.open(name), backend.local_dir(name), backend.media_dir(name))


@pytest.fixture
def coll(store_backend):
    store_backend.create("c", "image", "none", "flat", DIM)
    return open_collection(store_backend)


def brute(vectors: np.ndarray, query: np.ndarray, k: int) -> list[int]:
    return list(np.argsort(-(vectors @ query), kind="stable")[:k])


def test_search_equals_brute_force(coll):
    x = unit(200, 1)
    new(coll, x)
    q = unit(5, 2)
    for query in q:
        hits = coll.search(query, 10)
        assert [int(h.item.metadata["i"]) for h in hits] == brute(x, query, 10)
        assert np.allclose([h.score for h in hits], np.sort(x @ query)[::-1][:10], atol=1e-5)


def test_delete_and_duplicates(coll):
    x = unit(20, 3)
    new(coll, x)
    coll.store.delete("x0")
    coll.sync()
    assert all(h.item.external_id != "x0" for h in coll.search(x[0], 20))
    with pytest.raises(NotFoundError):
        coll.store.delete("x0")
    with pytest.raises(ConflictError, match="already in the collection"):
        new(coll, unit(2, 4), start=5)
    with pytest.raises(ConflictError, match="duplicate ids in the request"):
        coll.store.add([NewItem("d", "s", None, {}, x[0]), NewItem("d", "s", None, {}, x[1])], 0)
    assert coll.store.count() == 19  # the rejected batches added nothing


def test_two_handles_on_one_store_see_each_others_writes(coll, store_backend):
    other = open_collection(store_backend)  # another process sharing the store
    x = unit(30, 5)
    new(coll, x[:10])
    assert len(other.search(x[0], 50)) == 10
    new(other, x[10:], start=10)
    other.store.delete("x3")
    hits = coll.search(x[12], 50)
    assert len(hits) == 29 and hits[0].item.external_id == "x12"


def test_snapshot_reopen_and_replay(coll, store_backend):
    x = unit(50, 6)
    new(coll, x[:30])
    coll.snapshot()
    new(coll, x[30:], start=30)  # after the snapshot: replayed from the op log on open
    coll.store.delete("x1")
    before = [(h.item.external_id, h.score) for h in coll.search(x[40], 10)]
    coll.close()
    reopened = open_collection(store_backend)
    assert reopened.index.seq == reopened.store.last_seq()
    assert [(h.item.external_id, h.score) for h in reopened.search(x[40], 10)] == before
    (store_backend.local_dir("c") / SNAPSHOT_FILE).write_bytes(b"garbage")
    rebuilt = open_collection(store_backend)
    assert [h.item.external_id for h in rebuilt.search(x[40], 10)] == [i for i, _ in before]


def test_generation_switch_rebuilds(coll):
    x, y = unit(10, 7), unit(10, 8)
    ids = new(coll, x)
    assert coll.store.switch(1, "other@1") is False  # nothing embedded for generation 1 yet
    coll.store.put_vectors(dict(zip(ids, y, strict=True)), 1)
    assert coll.store.switch(1, "other@1") is True
    hits = coll.search(y[3], 1)
    assert hits[0].item.external_id == "x3" and hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert coll.meta.adapter_ref == "other@1" and coll.meta.generation == 1


def test_ivf_serves_exactly_until_trained_then_recalls(tmp_path):
    index = VectorIndex(DIM, "IVF4,Flat")
    x = unit(400, 9)
    index.add(np.arange(100), x[:100])
    assert index.exact_fallback  # 100 < 39 * 4 vectors
    index.add(np.arange(100, 400), x[100:])
    assert not index.exact_fallback
    index.set_search_params(nprobe=4)  # all lists: exact
    _, ids = index.search(x[:20], 5)
    assert [row[0] for row in ids] == list(range(20))
    index.remove(np.array([0]))
    assert index.search(x[:1], 3)[1][0][0] != 0


def test_approximate_indexes_get_recall_preserving_search_params(tmp_path):
    import faiss

    ivf = VectorIndex(DIM, "IVF4096,Flat")
    assert ivf.exact_fallback
    ivf.rebuild(np.arange(4096 * 39), np.tile(unit(4096, 11), (39, 1)))
    assert faiss.extract_index_ivf(ivf._index).nprobe == 64  # nlist / 64, not FAISS's default of 1
    hnsw = VectorIndex(DIM, "HNSW8,Flat")
    assert faiss.downcast_index(hnsw._index.index).hnsw.efSearch == 128
    hnsw.add(np.arange(10), unit(10, 12))
    hnsw.save(tmp_path / "h.snap")
    loaded = VectorIndex.load(tmp_path / "h.snap", DIM, "HNSW8,Flat")
    assert faiss.downcast_index(loaded._index.index).hnsw.efSearch == 128


def test_hnsw_deletes_by_tombstone():
    index = VectorIndex(DIM, "HNSW8,Flat")
    x = unit(100, 10)
    index.add(np.arange(100), x)
    index.remove(np.array([5]))
    _, ids = index.search(x[5:6], 5)
    assert 5 not in ids[0] and len(ids[0]) == 5
    assert index.ntotal == 99


def test_bad_factory():
    with pytest.raises(ConfigError, match="invalid FAISS index factory"):
        VectorIndex(DIM, "NotAnIndex")
    with pytest.raises(ConfigError, match="leave out IDMap"):
        VectorIndex(DIM, "IDMap2,Flat")
