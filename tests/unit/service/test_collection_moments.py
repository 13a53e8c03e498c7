"""Moment collections without a model: the store (SQLite and PostgreSQL alike) keeps each video's moments and one
vector per moment, the FAISS index searches them, and hits map back to (item, moment) - against brute-force
numpy over the same vectors."""

from __future__ import annotations

import numpy as np
import pytest

from uniadapter_serve.service.collections.collection import SNAPSHOT_FILE, Collection
from uniadapter_serve.service.collections.migrate import migrate
from uniadapter_serve.service.collections.postgres_store import PostgresBackend
from uniadapter_serve.service.collections.sqlite_backend import SqliteBackend
from uniadapter_serve.service.collections.store import (
    MOMENT_SLOTS,
    MomentSpec,
    NewItem,
    moment_vector_ids,
    stack,
)

DIM = 16
SPEC = MomentSpec(8.0, 4.0)
COUNTS = [3, 1, 5, 2, 7, 4]
"""moments per video: a video no longer than a window is one moment"""


def unit(n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def spans(n: int) -> tuple[tuple[float, float], ...]:
    return tuple((4.0 * m, 4.0 * m + 8.0) for m in range(n))


def videos(seed: int = 1, counts: list[int] = COUNTS, prefix: str = "v") -> list[NewItem]:
    vectors = unit(sum(counts), seed)
    out, at = [], 0
    for i, n in enumerate(counts):
        out.append(NewItem(f"{prefix}{i}", "upload:x", None, {"i": i}, vectors[at:at + n], spans(n)))
        at += n
    return out


def open_collection(backend, name: str = "m") -> Collection:
    return Collection(backend.open(name), backend.local_dir(name), backend.media_dir(name))


@pytest.fixture
def coll(store_backend):
    store_backend.create("m", "video", "none", "flat", DIM, SPEC)
    return open_collection(store_backend)


def flat(items: list[NewItem]) -> tuple[np.ndarray, list[tuple[str, int]]]:
    """Every moment vector and its (external id, moment index), in order."""
    rows = [(it.external_id, m) for it in items for m in range(len(it.moments))]
    return np.concatenate([it.vector for it in items]), rows


def test_meta_and_items_keep_their_moments(coll, store_backend):
    items = videos()
    coll.store.add(items, 0)
    assert coll.meta.moments == SPEC
    again = open_collection(store_backend)  # another replica
    assert again.meta.moments == SPEC and again.moments
    for it in items:
        assert again.store.get(it.external_id).moments == it.moments
    assert again.stats()["moments"] == {"window_s": 8.0, "stride_s": 4.0, "indexed": sum(COUNTS)}
    assert again.stats()["indexed"] == len(COUNTS) and again.stats()["items"] == len(COUNTS)


def test_every_moment_search_equals_brute_force(coll):
    items = videos()
    coll.store.add(items, 0)
    vectors, rows = flat(items)
    for query in unit(4, 2):
        hits = coll.search(query, 10, group_by_item=False)
        order = np.argsort(-(vectors @ query), kind="stable")[:10]
        assert [(h.item.external_id, h.moment) for h in hits] == [rows[j] for j in order]
        assert np.allclose([h.score for h in hits], (vectors @ query)[order], atol=1e-5)
        for h in hits:
            assert h.span == spans(len(h.item.moments))[h.moment]


def test_grouped_search_returns_each_videos_best_moment(coll):
    items = videos()
    coll.store.add(items, 0)
    for query in unit(4, 3):
        best = sorted(((float((it.vector @ query).max()), it.external_id, int(np.argmax(it.vector @ query)))
                       for it in items), reverse=True)
        for k in (1, 3, len(items), len(items) + 5):
            hits = coll.search(query, k)
            assert [(h.item.external_id, h.moment) for h in hits] == [(e, m) for _, e, m in best[:k]]
            assert len({h.item.external_id for h in hits}) == len(hits)


def test_grouped_search_finds_k_videos_when_one_video_holds_the_best_moments(coll):
    """One long video whose 40 moments all beat every other video's: grouping must still return k videos."""
    query = unit(1, 4)[0]
    long = np.repeat(query[None], 40, axis=0) + 0.01 * unit(40, 5)
    long /= np.linalg.norm(long, axis=1, keepdims=True)
    items = [NewItem("long", "upload:x", None, {}, long.astype(np.float32), spans(40)), *videos(6, [2, 2, 2])]
    coll.store.add(items, 0)
    hits = coll.search(query, 4)
    assert hits[0].item.external_id == "long"
    assert sorted(h.item.external_id for h in hits) == ["long", "v0", "v1", "v2"]


def test_filter_applies_to_the_videos_moments(coll):
    items = videos()
    coll.store.add(items, 0)
    vectors, rows = flat(items)
    query = unit(1, 7)[0]
    hits = coll.search(query, 50, lambda it: it.metadata["i"] in (2, 4), group_by_item=False)
    allowed = [j for j, (e, _) in enumerate(rows) if e in ("v2", "v4")]
    order = sorted(allowed, key=lambda j: -float(vectors[j] @ query))
    assert [(h.item.external_id, h.moment) for h in hits] == [rows[j] for j in order]


def test_deleting_a_video_removes_all_its_moments_in_every_replica(coll, store_backend):
    items = videos()
    coll.store.add(items, 0)
    other = open_collection(store_backend)
    assert other.index.ntotal == sum(COUNTS)
    coll.store.delete("v4")
    coll.sync()
    other.sync()
    for c in (coll, other):
        assert c.index.ntotal == sum(COUNTS) - COUNTS[4]
        assert all(h.item.external_id != "v4" for h in c.search(items[4].vector[0], 100, group_by_item=False))


def test_reindex_puts_and_switches_every_moment(coll):
    items = videos()
    coll.store.add(items, 0)
    ids = {it.external_id: coll.store.get(it.external_id).item_id for it in items}
    fresh = videos(seed=9)
    assert {it.item_id for it in coll.store.missing(1, 100)} == set(ids.values())
    coll.store.put_vectors({ids[it.external_id]: it.vector for it in fresh}, 1)
    assert coll.store.switch(1, "none")
    coll.sync()
    vectors, rows = flat(fresh)
    query = unit(1, 10)[0]
    order = np.argsort(-(vectors @ query), kind="stable")[:5]
    assert [(h.item.external_id, h.moment) for h in coll.search(query, 5, group_by_item=False)] == \
        [rows[j] for j in order]


def test_a_snapshot_reopens_with_its_moments(coll, store_backend):
    items = videos()
    coll.store.add(items, 0)
    coll.sync()
    coll.snapshot()
    assert (coll.folder / SNAPSHOT_FILE).is_file()
    again = open_collection(store_backend)
    query = unit(1, 11)[0]
    assert [(h.item.external_id, h.moment) for h in again.search(query, 6, group_by_item=False)] == \
        [(h.item.external_id, h.moment) for h in coll.search(query, 6, group_by_item=False)]


def test_vector_ids_number_each_items_moments():
    ids, vectors = stack([5, 9], [np.zeros((3, 4), np.float32).tobytes(), np.zeros((1, 4), np.float32).tobytes()], 4)
    assert ids.tolist() == [5, 5, 5, 9] and vectors.shape == (4, 4)
    assert moment_vector_ids(ids).tolist() == [5 * MOMENT_SLOTS, 5 * MOMENT_SLOTS + 1, 5 * MOMENT_SLOTS + 2,
                                               9 * MOMENT_SLOTS]


def test_migration_to_postgresql_keeps_moments(pg_server, tmp_path):
    sqlite = SqliteBackend(tmp_path / "data" / "collections")
    sqlite.create("m", "video", "none", "flat", DIM, SPEC)
    source = open_collection(sqlite)
    items = videos()
    source.store.add(items, 0)
    query = unit(1, 12)[0]
    before = [(h.item.external_id, h.moment, h.span) for h in source.search(query, 8, group_by_item=False)]
    source.close()
    sqlite.close()
    url = pg_server.database()
    report = migrate(tmp_path / "data", url, media_root=tmp_path / "media", progress=False)
    assert report["m"]["checked"] == len(items)
    pg = PostgresBackend(url, local_root=tmp_path / "replica", media_root=tmp_path / "media")
    try:
        target = open_collection(pg)
        assert target.meta.moments == SPEC
        assert [(h.item.external_id, h.moment, h.span) for h in target.search(query, 8, group_by_item=False)] == \
            before
    finally:
        pg.close()
