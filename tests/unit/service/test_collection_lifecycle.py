"""A collection's identity and lifecycle on both stores, with two "replicas" (two backends on one store): a
handle of a deleted collection never writes again, not even into one made later under its name; a snapshot
serves only the collection it was made from; a drop names the incarnation it deletes; files of a deleted
collection are released; what crashes leave is swept."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from uniadapter_serve.errors import ConflictError, NotFoundError
from uniadapter_serve.service.collections.cleanup import ORPHAN_GRACE_S, ServingLock, remove_orphan_media
from uniadapter_serve.service.collections.collection import SNAPSHOT_FILE, Collection
from uniadapter_serve.service.collections.sqlite_backend import SqliteBackend
from uniadapter_serve.service.collections.store import CollectionGone, NewItem, StoreBackend

DIM = 8


def unit(n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def items(prefix: str, vectors: np.ndarray) -> list[NewItem]:
    return [NewItem(f"{prefix}{i}", f"upload:{prefix}{i}.png", None, {}, v) for i, v in enumerate(vectors)]


def open_collection(backend: StoreBackend, name: str = "c") -> Collection:
    return Collection(backend.open(name), backend.local_dir(name), backend.media_dir(name))


@pytest.fixture(params=["sqlite", "postgresql"])
def replicas(request, tmp_path):
    """Two backends on one store, as two replicas have them (SQLite: one data root; PostgreSQL: one database,
    a local folder each, one shared media root)."""
    if request.param == "sqlite":
        pair = [SqliteBackend(tmp_path / "collections"), SqliteBackend(tmp_path / "collections")]
    else:
        from uniadapter_serve.service.collections.postgres_store import PostgresBackend

        url = request.getfixturevalue("pg_server").database()
        pair = [PostgresBackend(url, local_root=tmp_path / f"local-{i}", media_root=tmp_path / "media")
                for i in range(2)]
    yield pair
    for backend in pair:
        backend.close()


def test_a_deleted_collections_handles_never_write_again_even_into_its_successor(replicas):
    a, b = replicas
    a.create("c", "image", "none", "flat", DIM)
    on_b = open_collection(b)
    first = on_b.uid
    assert on_b.store.add(items("old", unit(3, 0)), 0)
    a.drop("c")
    with pytest.raises(CollectionGone):
        on_b.store.add(items("late", unit(2, 1)), 0)
    with pytest.raises(CollectionGone):
        on_b.store.meta()
    with pytest.raises(CollectionGone):
        on_b.sync()
    assert on_b.gone
    assert "c" not in b.identities()
    a.create("c", "image", "none", "flat", DIM)  # the name is free at once
    second = b.identities()["c"]
    assert second != first
    with pytest.raises(CollectionGone):  # the old handle does not reach the new collection
        on_b.store.add(items("late", unit(2, 1)), 0)
    fresh = open_collection(b)
    assert fresh.uid == second and fresh.store.count() == 0
    on_b.discard()
    fresh.store.close()


def test_a_drop_naming_an_old_incarnation_leaves_the_new_one(replicas):
    a, b = replicas
    a.create("c", "image", "none", "flat", DIM)
    old = b.identities()["c"]
    a.drop("c")
    a.create("c", "image", "none", "flat", DIM)
    with pytest.raises(NotFoundError):
        b.drop("c", old)
    assert "c" in a.identities() and a.identities()["c"] != old


def test_a_snapshot_serves_only_the_collection_it_was_made_from(replicas, tmp_path):
    a, _ = replicas
    a.create("c", "image", "none", "flat", DIM)
    before = open_collection(a)
    old_vectors = unit(6, 2)
    before.store.add(items("old", old_vectors), 0)
    before.sync()
    before.snapshot()
    snap = (before.folder / SNAPSHOT_FILE).read_bytes()
    before.store.close()
    a.drop("c")
    a.create("c", "image", "none", "flat", DIM)
    again = open_collection(a)
    new_vectors = unit(6, 3)
    again.store.add(items("new", new_vectors), 0)  # same item ids 1-6 on SQLite, the same seq
    again.store.close()
    folder = a.local_dir("c")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / SNAPSHOT_FILE).write_bytes(snap)  # the old collection's snapshot where the new one looks
    reopened = open_collection(a)
    for i, v in enumerate(new_vectors):
        hits = reopened.search(v, 1)
        assert hits[0].item.external_id == f"new{i}" and hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert all(h.item.external_id.startswith("new") for h in reopened.search(old_vectors[0], 6))
    reopened.store.close()


def test_create_is_not_blocked_by_a_stray_folder_and_still_refuses_a_live_name(tmp_path):
    backend = SqliteBackend(tmp_path / "collections")
    (tmp_path / "collections" / "c" / "thumbs").mkdir(parents=True)  # what a writer of a deleted one left
    backend.create("c", "image", "none", "flat", DIM).close()
    with pytest.raises(ConflictError):
        backend.create("c", "image", "none", "flat", DIM)
    assert backend.names() == ["c"]


def _open_files(under: Path) -> list[str]:
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(under)):
            found.append(target)
    return found


def test_closing_a_store_releases_every_threads_files(tmp_path):
    import threading

    backend = SqliteBackend(tmp_path / "collections")
    store = backend.create("c", "image", "none", "flat", DIM)
    threads = [threading.Thread(target=store.count) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    store.close()
    for cycle in range(5):
        coll = open_collection(backend)
        coll.store.add(items(f"x{cycle}-", unit(2, cycle)), 0)
        coll.search(unit(1, 9)[0], 2)
        backend.drop("c")
        coll.discard()
        backend.create("c", "image", "none", "flat", DIM).close()
    assert _open_files(tmp_path / "collections") == [], "files of deleted collections still open"


def test_sweep_removes_orphans_and_temp_files_and_keeps_what_items_name(tmp_path):
    media = tmp_path / "media"
    media.mkdir()
    for name in ("kept.png", "orphan.png", ".kept.png.abc123.tmp"):
        (media / name).write_bytes(b"x")
    swept = remove_orphan_media(media, ["upload:kept.png", "path:elsewhere.png"], 0.0)
    assert sorted(p.name for p in media.iterdir()) == ["kept.png"]
    assert (swept.media, swept.temp) == (1, 1)


def test_sweep_spares_young_orphans_while_another_process_serves(tmp_path):
    root = tmp_path / "collections"
    other = ServingLock(root)
    assert other.alone()  # the first one is alone
    mine = ServingLock(root)
    assert not mine.alone()  # a second one is not: the grace applies
    media = tmp_path / "media"
    media.mkdir()
    (media / "young.png").write_bytes(b"x")
    old = media / "old.png"
    old.write_bytes(b"x")
    past = old.stat().st_mtime - ORPHAN_GRACE_S - 1
    os.utime(old, (past, past))
    remove_orphan_media(media, [], ORPHAN_GRACE_S)
    assert [p.name for p in media.iterdir()] == ["young.png"]
    other.close()
    mine.close()
    last = ServingLock(root)
    assert last.alone()  # once the others are gone
    last.close()
