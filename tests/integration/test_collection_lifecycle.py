"""A collection deleted while clients write to it, on both stores (SQLite on one data root, a real PostgreSQL);
one replica in-process (support.asgi), two replicas or a paused one on real servers: adds and searches racing a
delete and a re-create on one replica and across two, a replica paused across them, create/delete cycles, and the
files all of that leaves open.

What must hold: no 500; every add acknowledged (201) names the collection it was committed to (`uid`), and
every item acknowledged to the re-created one is there at the end, and nothing else is; an add sent after the
delete was acknowledged never lands in the deleted collection; the name can always be created again; no file
of a deleted collection stays open."""

from __future__ import annotations

import base64
import os
import signal
import threading
import time
from dataclasses import dataclass

import httpx
import pytest
from support.asgi import AsgiService, running_app
from support.media import image_bytes
from support.server import Server, publish_test_sets, start_server
from support.waiting import until

DEADLINE_S = 120.0


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request) -> dict[str, str]:
    if request.param == "sqlite":
        return {}
    return {"database_url": request.getfixturevalue("pg_server").database()}


@dataclass
class Reply:
    sent: float
    ids: list[str]
    status: int
    body: dict


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def wait_for(condition, what: str, timeout: float = DEADLINE_S) -> None:
    until(condition, what, timeout)


Target = str | AsgiService
"""a real server's URL, or an in-process app"""


def connect(target: Target) -> httpx.Client:
    if isinstance(target, AsgiService):
        return target.client(timeout=60)
    return httpx.Client(base_url=target, timeout=60)


def create(target: Target, name: str) -> str:
    with connect(target) as c:
        r = c.post("/collections", json={"name": name, "kind": "image", "adapter": "ret-a"})
    assert r.status_code == 201, r.text
    return r.json()["uid"]


def listing(target: Target, name: str) -> list[str]:
    ids, cursor = [], 0
    with connect(target) as c:
        while cursor is not None:
            r = c.get(f"/collections/{name}/items", params={"limit": 500, "cursor": cursor})
            assert r.status_code == 200, r.text
            ids += [it["id"] for it in r.json()["items"]]
            cursor = r.json()["next_cursor"]
    return ids


def deleted_files_open(server: Server | AsgiService) -> list[str]:
    """Files under the data root the serving process (this one, for an in-process app) holds open although they
    were deleted or renamed away."""
    found = []
    root = str(server.data_root)
    pid = os.getpid() if isinstance(server, AsgiService) else server.process.pid
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith(root) and (target.endswith("(deleted)") or "/.deleted-" in target):
            found.append(target)
    return found


class Writers:
    """Four clients adding one item per request to `name` on `url`, and one searching it, until stopped."""

    def __init__(self, url: Target, name: str) -> None:
        self.url, self.name = url, name
        self.adds: list[Reply] = []
        self.searches: list[int] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._add, args=(k,)) for k in range(4)]
        self.threads.append(threading.Thread(target=self._search))
        for t in self.threads:
            t.start()

    def _add(self, k: int) -> None:
        with connect(self.url) as c:
            for n in range(2000):
                if self.stop.is_set():
                    return
                item_id = f"w{k}-{n}"
                sent = time.monotonic()
                r = c.post(f"/collections/{self.name}/items", json={"items": [
                    {"id": item_id, "image": b64(image_bytes((40 * k, n % 256, 90), size=(24, 24)))}]})
                self.adds.append(Reply(sent, [item_id], r.status_code, r.json() if r.content else {}))

    def _search(self) -> None:
        with connect(self.url) as c:
            for _ in range(2000):
                if self.stop.is_set():
                    return
                r = c.post("/retrieve", json={"query_text": "a red square", "collection": self.name, "top_k": 3})
                self.searches.append(r.status_code)

    def acked(self) -> int:
        return sum(1 for a in self.adds if a.status == 201)

    def sent_after(self, moment: float) -> int:
        return sum(1 for a in self.adds if a.sent > moment)

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(DEADLINE_S)


def check(writers: Writers, old: str, new: str, deleted_at: float, final: list[str]) -> None:
    statuses = {a.status for a in writers.adds}
    assert statuses <= {201, 404}, [(a.status, a.body) for a in writers.adds if a.status not in (201, 404)][:3]
    assert set(writers.searches) <= {200, 404}, sorted(set(writers.searches))
    for a in writers.adds:
        if a.status == 404:
            assert "collection" in a.body["detail"], a.body
    acked = [a for a in writers.adds if a.status == 201]
    assert {a.body["uid"] for a in acked} <= {old, new}
    late_into_old = [a.ids for a in acked if a.sent > deleted_at and a.body["uid"] == old]
    assert not late_into_old, f"adds sent after the delete was acknowledged landed in the deleted collection: " \
                              f"{late_into_old[:3]}"
    into_new = sorted(i for a in acked if a.body["uid"] == new for i in a.ids)
    assert into_new, "no add reached the re-created collection"
    assert sorted(final) == into_new  # every acknowledged item is there, and nothing that was refused


def test_a_delete_and_re_create_racing_writers_on_one_replica(tmp_path, store, caplog):
    root = tmp_path / "data"
    publish_test_sets(root)
    with running_app(root, backbone="blip-tiny", **store) as server, server.client(timeout=60) as c:
        old = create(server, "race")
        writers = Writers(server, "race")
        try:
            wait_for(lambda: writers.acked() >= 12, "adds before the delete")
            reindex = c.post("/collections/race/reindex", json={"adapter": "ret-b"})
            assert reindex.status_code == 202, reindex.text  # re-embedding in the background when the delete comes
            assert c.delete("/collections/race").status_code == 204
            deleted_at = time.monotonic()
            new = create(server, "race")  # never 409: nothing the writers did keeps the name
            created_at = time.monotonic()
            wait_for(lambda: writers.sent_after(created_at) >= 12, "adds after the re-create")
        finally:
            writers.finish()
        check(writers, old, new, deleted_at, listing(server, "race"))
        assert c.get("/collections").status_code == 200
        stats = c.get("/collections/race").json()
        assert (stats["uid"], stats["generation"], stats["reindex_target"]) == (new, 0, None)  # not the old re-index's
        wait_for(lambda: not deleted_files_open(server), "the deleted collection's files to be closed", 30)
    # the re-index met the delete quietly, and nothing else failed
    assert not [r for r in caplog.records if r.exc_info], "a traceback in the app's log"


def test_a_replica_writing_to_a_collection_another_deletes_and_re_creates(tmp_path, store):
    root = tmp_path / "data"
    publish_test_sets(root)
    a, b = start_server(root, tmp_path, **store), start_server(root, tmp_path, **store)
    try:
        old = create(a.url, "shared")
        wait_for(lambda: httpx.get(f"{b.url}/collections/shared", timeout=60).status_code == 200, "b to see it")
        writers = Writers(b.url, "shared")
        try:
            wait_for(lambda: writers.acked() >= 12, "b's adds before the delete")
            assert httpx.delete(f"{a.url}/collections/shared", timeout=60).status_code == 204
            deleted_at = time.monotonic()
            new = create(a.url, "shared")
            created_at = time.monotonic()
            wait_for(lambda: writers.sent_after(created_at) >= 12, "b's adds after the re-create")
        finally:
            writers.finish()
        check(writers, old, new, deleted_at, listing(a.url, "shared"))
        stats = httpx.get(f"{b.url}/collections/shared", timeout=60).json()
        assert stats["uid"] == new
        assert [c["uid"] for c in httpx.get(f"{b.url}/collections", timeout=60).json()] == [new]
        for server in (a, b):
            wait_for(lambda s=server: not deleted_files_open(s), "the deleted collection's files to be closed", 30)
    finally:
        a.stop()
        b.stop()


def test_a_replica_paused_across_delete_and_re_create_serves_the_new_collection(tmp_path, store):
    root = tmp_path / "data"
    publish_test_sets(root)
    a, b = start_server(root, tmp_path, **store), start_server(root, tmp_path, **store)
    try:
        old = create(a.url, "c1")
        image = {"items": [{"id": "old", "image": b64(image_bytes((200, 10, 10), size=(24, 24)))}]}
        assert httpx.post(f"{a.url}/collections/c1/items", json=image, timeout=60).status_code == 201
        assert httpx.get(f"{b.url}/collections/c1", timeout=60).json()["items"] == 1
        b.process.send_signal(signal.SIGSTOP)
        try:
            assert httpx.delete(f"{a.url}/collections/c1", timeout=60).status_code == 204
            new = create(a.url, "c1")
            fresh = {"items": [{"id": f"new{i}", "image": b64(image_bytes((10, 30 * i, 200), size=(24, 24)))}
                               for i in range(3)]}
            assert httpx.post(f"{a.url}/collections/c1/items", json=fresh, timeout=60).status_code == 201
        finally:
            b.process.send_signal(signal.SIGCONT)
        stats = httpx.get(f"{b.url}/collections/c1", timeout=60)  # the first request after the pause
        assert stats.status_code == 200, stats.text
        assert (stats.json()["uid"], stats.json()["items"], stats.json()["indexed"]) == (new, 3, 3)
        assert old != new
        assert sorted(listing(b.url, "c1")) == ["new0", "new1", "new2"]
        hits = httpx.post(f"{b.url}/retrieve", timeout=60,
                          json={"query_text": "a blue square", "collection": "c1", "top_k": 5}).json()["results"]
        assert sorted(h["id"] for h in hits) == ["new0", "new1", "new2"]
        assert httpx.get(f"{b.url}/collections", timeout=60).status_code == 200
        assert httpx.post(f"{b.url}/collections", timeout=60, json={"name": "c1", "kind": "image"}
                          ).status_code == 409  # it exists: the new one
    finally:
        a.stop()
        b.stop()


def test_create_add_search_delete_cycles_leave_no_open_files_and_no_folders(tmp_path, store):
    root = tmp_path / "data"
    publish_test_sets(root)
    with running_app(root, backbone="blip-tiny", **store) as server, server.client(timeout=60) as c:
        for cycle in range(10):
            create(server, "cycle")
            items = {"items": [{"id": f"i{j}", "image": b64(image_bytes((25 * cycle, 80 * j, 5), size=(24, 24)))}
                               for j in range(3)]}
            assert c.post("/collections/cycle/items", json=items).status_code == 201
            r = c.post("/retrieve", json={"query_text": "a red circle", "collection": "cycle", "top_k": 3})
            assert r.status_code == 200 and len(r.json()["results"]) == 3
            assert c.get("/collections/cycle/items/i0/thumbnail").status_code == 200
            assert c.delete("/collections/cycle").status_code == 204
        assert deleted_files_open(server) == []
        assert sorted(p.name for p in (root / "collections").iterdir()) == [".lock", ".serving"] or \
            sorted(p.name for p in (root / "collections").iterdir()) == []  # PostgreSQL: no snapshots left


def _images(n: int, seed: int) -> dict[str, bytes]:
    return {f"s{seed}-{i}": image_bytes(((37 * i + seed) % 256, (91 * i) % 256, (53 * i + 7 * seed) % 256),
                                        size=(24 + i % 5, 24)) for i in range(n)}


def _self_search(url: Target, collection: str, images: dict[str, bytes]) -> dict[str, list[tuple[str, float]]]:
    """Each image searched with itself: its hits (ids and scores)."""
    out = {}
    with connect(url) as c:
        for item_id, data in images.items():
            r = c.post("/retrieve", json={"query_image": b64(data), "collection": collection, "top_k": 3})
            assert r.status_code == 200, r.text
            out[item_id] = [(h["id"], round(h["score"], 5)) for h in r.json()["results"]]
    return out


def test_the_documented_migration_on_the_same_data_root_answers_as_sqlite_did(tmp_path, pg_server):
    """SQLite app, stopped (its snapshots written), `collections migrate`, then a PostgreSQL app on the same
    DATA_ROOT (both in-process): every search answers exactly as before (the SQLite snapshots are not this
    collection's)."""
    import subprocess
    import sys

    root = tmp_path / "data"
    publish_test_sets(root)
    sets = {"first": _images(15, 1), "second": _images(15, 2)}
    with running_app(root, backbone="blip-tiny") as sqlite, sqlite.client(timeout=120) as c:
        for name, images in sets.items():
            create(sqlite, name)
            r = c.post(f"/collections/{name}/items",
                       json={"items": [{"id": k, "image": b64(v)} for k, v in images.items()]})
            assert r.status_code == 201, r.text
        before = {name: _self_search(sqlite, name, images) for name, images in sets.items()}
    assert all((root / "collections" / name / "index.snap").is_file() for name in sets)
    for name, images in sets.items():  # sanity: each image finds itself first
        assert all(before[name][k][0][0] == k for k in images)
    url = pg_server.database()
    done = subprocess.run([sys.executable, "-m", "uniadapter_serve.service.cli", "collections", "migrate",
                           "--from", str(root), "--to", url, "--quiet"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    with running_app(root, backbone="blip-tiny", database_url=url) as pg:
        for name, images in sets.items():
            assert _self_search(pg, name, images) == before[name], name


def test_a_replica_restarted_across_delete_and_re_create_serves_the_new_collection(tmp_path, store):
    """B stops (writing its snapshot), A deletes the collection, creates it again and adds other items, B
    starts: B answers for the new items only."""
    shared = tmp_path / "shared"
    publish_test_sets(shared)
    if store:  # PostgreSQL: each replica its own data root (snapshots), one media root
        (shared / "media").mkdir(exist_ok=True)
        roots = [tmp_path / "a", tmp_path / "b"]
        for r in roots:
            publish_test_sets(r)
        extra = {"media_root": shared / "media", **store}
    else:  # SQLite: one data root
        roots, extra = [shared, shared], {}
    a, b = start_server(roots[0], tmp_path, **extra), start_server(roots[1], tmp_path, **extra)
    try:
        old_images, new_images = _images(9, 3), _images(9, 4)
        create(a.url, "c1")
        assert httpx.post(f"{a.url}/collections/c1/items", timeout=120, json={
            "items": [{"id": f"x{i}", "image": b64(v)} for i, v in enumerate(old_images.values())]}).status_code == 201
        wait_for(lambda: httpx.get(f"{b.url}/collections/c1", timeout=60).json().get("indexed") == 9, "b indexed")
        b.stop()
        assert httpx.delete(f"{a.url}/collections/c1", timeout=60).status_code == 204
        new = create(a.url, "c1")
        assert httpx.post(f"{a.url}/collections/c1/items", timeout=120, json={  # the same ids, other images
            "items": [{"id": f"x{i}", "image": b64(v)} for i, v in enumerate(new_images.values())]}).status_code == 201
        b = start_server(roots[1], tmp_path, **extra)
        stats = httpx.get(f"{b.url}/collections/c1", timeout=60).json()
        assert (stats["uid"], stats["items"], stats["indexed"]) == (new, 9, 9)
        found = _self_search(b.url, "c1", {f"x{i}": v for i, v in enumerate(new_images.values())})
        assert found == _self_search(a.url, "c1", {f"x{i}": v for i, v in enumerate(new_images.values())})
        assert all(hits[0][0] == k and hits[0][1] == pytest.approx(1.0, abs=1e-4) for k, hits in found.items())
    finally:
        a.stop()
        b.stop()


def _collection_files(roots: list, media_root) -> list[str]:
    """Every file kept for collections: stores, snapshots, thumbnails, uploaded media (lock files aside)."""
    found = set()
    for folder in [*(r / "collections" for r in roots), media_root / ".collections"]:
        if not folder.is_dir():
            continue
        try:
            found |= {str(p) for p in folder.rglob("*") if p.is_file() and p.name not in (".lock", ".serving")}
        except FileNotFoundError:  # a sub-folder a replica removed during the walk: not settled yet, look again
            found.add(f"{folder} (being removed)")
    return sorted(found)


def test_a_delete_removes_the_collections_media_snapshots_and_thumbnails_on_every_replica(tmp_path, store):
    shared = tmp_path / "shared"
    publish_test_sets(shared)
    (shared / "media").mkdir(exist_ok=True)
    if store:  # PostgreSQL: each replica its own data root, one media root
        roots = [tmp_path / "a", tmp_path / "b"]
        for r in roots:
            publish_test_sets(r)
    else:
        roots = [shared, shared]
    extra = {"media_root": shared / "media", **store}
    a, b = start_server(roots[0], tmp_path, **extra), start_server(roots[1], tmp_path, **extra)
    try:
        create(a.url, "doomed")
        images = _images(6, 5)
        assert httpx.post(f"{a.url}/collections/doomed/items", timeout=120, json={
            "items": [{"id": k, "image": b64(v)} for k, v in images.items()]}).status_code == 201
        for server in (a, b):
            wait_for(lambda s=server: httpx.get(f"{s.url}/collections/doomed", timeout=60).json().get("indexed") == 6,
                     "the replica to index the items")
            for k in images:
                assert httpx.get(f"{server.url}/collections/doomed/items/{k}/thumbnail", timeout=60
                                 ).status_code == 200
        b.stop()  # writes its snapshot
        b = start_server(roots[1], tmp_path, **extra)
        assert httpx.get(f"{b.url}/collections/doomed", timeout=60).json()["indexed"] == 6
        before = _collection_files(list(dict.fromkeys(roots)), shared / "media")
        assert sum("index.snap" in f for f in before) >= 1 and sum("/thumbs/" in f for f in before) >= 6
        assert sum(f.endswith(".png") and "/thumbs/" not in f for f in before) == 6  # the uploads
        assert httpx.delete(f"{a.url}/collections/doomed", timeout=60).status_code == 204
        wait_for(lambda: _collection_files(list(dict.fromkeys(roots)), shared / "media") == [],
                 "every file of the deleted collection to go, on both replicas", 30)
        create(a.url, "doomed")  # the name again: a collection of its own, with its own files
        assert httpx.post(f"{a.url}/collections/doomed/items", timeout=120, json={
            "items": [{"id": "one", "image": b64(image_bytes((1, 2, 3), size=(24, 24)))}]}).status_code == 201
        after = _collection_files(list(dict.fromkeys(roots)), shared / "media")
        assert sum(f.endswith(".png") for f in after) == 1
    finally:
        a.stop()
        b.stop()
