"""Collections without a model: the store (SQLite and PostgreSQL alike) + FAISS index against brute-force numpy."""

from __future__ import annotations

import numpy as np
import pytest

from uniadapter_serve.errors import ConfigError, ConflictError, NotFoundError
from uniadapter_serve.service.collections.collection import SNAPSHOT_FILE, Collection
from uniadapter_serve.service.collections.index import VectorIndex
from uniadapter_serve.service.collections.store import GenerationChanged, NewItem

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


def test_a_rejected_batch_writes_nothing(coll):
    """A conflict anywhere in a large batch (inside it, or against a stored item) rejects all of it: no item,
    no vector, no op, the seq unchanged (PostgreSQL finds the stored one when its bulk COPY fails)."""
    new(coll, unit(10, 20))
    seq, before = coll.store.last_seq(), coll.store.all_items()
    batch = [NewItem(f"b{i}", "upload:x", None, {}, v) for i, v in enumerate(unit(600, 21))]
    with pytest.raises(ConflictError, match=r"duplicate ids in the request: \['b7'\]"):
        coll.store.add([*batch, NewItem("b7", "s", None, {}, batch[0].vector)], 0)
    with pytest.raises(ConflictError, match=r"ids already in the collection: \['x3', 'x9'\]"):
        coll.store.add([*batch[:300], NewItem("x9", "s", None, {}, batch[0].vector), *batch[300:],
                        NewItem("x3", "s", None, {}, batch[1].vector)], 0)
    with pytest.raises(GenerationChanged):
        coll.store.add(batch, 1)
    assert coll.store.last_seq() == seq and coll.store.ops_after(seq) == []
    assert coll.store.all_items() == before and len(coll.store.all_vectors(0, DIM)[0]) == 10
    assert coll.store.add(batch, 0)  # and the same batch goes in once nothing conflicts
    assert coll.store.count() == 610


def test_a_large_batch_round_trips_exactly(coll):
    """5,000 items in one add: ids in order, fields and metadata as given, vectors bit for bit (-0.0,
    subnormals, NaN payloads, extremes), one 'add' op per item in order."""
    n = 5000
    x = unit(n, 22)
    x[0, :4] = [-0.0, np.float32(1e-45), np.finfo(np.float32).max, np.finfo(np.float32).min]
    x[1, 0] = np.frombuffer(b"\x01\x00\xc0\x7f", np.float32)[0]  # a NaN with a payload
    items = [NewItem(f"id-{i}-ü\u4e2d{'é' * (i % 7)}", f"upload:{i:05x}.png", None if i % 3 else f"{i:064x}",
                     {"i": i, "caption": "a 'quoted' \"thing\"\t\\n", "nested": {"list": [i, None, True, 1.5]},
                      "nul\x00key": "nul\x00value", "emoji": "\U0001f600"} if i % 2 else {}, v)
             for i, v in enumerate(x)]
    seq = coll.store.last_seq()
    ids = coll.store.add(items, 0)
    assert len(ids) == n and ids == sorted(ids) and len(set(ids)) == n
    got = {it.item_id: it for it in coll.store.all_items()}
    for item_id, it in zip(ids, items, strict=True):
        stored = got[item_id]
        assert (stored.external_id, stored.source, stored.sha256, stored.metadata) == (
            it.external_id, it.source, it.sha256, it.metadata)
    assert len({it.created for it in got.values()}) == 1
    stored_ids, vectors = coll.store.all_vectors(0, DIM)
    assert list(stored_ids) == ids and vectors.tobytes() == x.tobytes()
    assert coll.store.ops_after(seq) == [(seq + 1 + k, "add", i) for k, i in enumerate(ids)]
    coll.sync()
    assert coll.index.ntotal == n and coll.search(x[4000], 1)[0].item.external_id == items[4000].external_id
