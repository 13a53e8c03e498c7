"""Collections on PostgreSQL across machines, through real servers and a real PostgreSQL: replicas that
share nothing but the database and the media root, PostgreSQL going away and coming back, and the
migration from SQLite."""

from __future__ import annotations

import base64
import subprocess
import sys
import time

import httpx
import pytest
from support.media import image_bytes
from support.postgres import PostgresServer
from support.redis_server import RedisServer
from support.server import publish_test_sets, start_server

from uniadapter_serve.service.collections.migrate import migrate

IMAGES = {f"img{i}": image_bytes((30 * i % 256, 255 - 25 * i, (90 * i) % 256), size=(40 + i, 36)) for i in range(8)}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def hits(url: str, collection: str, query: str = "a red square", **kw) -> list[tuple[str, float]]:
    r = httpx.post(f"{url}/retrieve", json={"query_text": query, "collection": collection, "top_k": 8} | kw,
                   timeout=60)
    assert r.status_code == 200, r.text
    return [(h["id"], round(h["score"], 5)) for h in r.json()["results"]]


def until(condition, what: str, timeout: float) -> float:
    """Poll the servers' answers until `condition()`; -> seconds it took."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, f"{what} took more than {timeout} s"
        time.sleep(0.02)
    return time.monotonic() - started


@pytest.mark.parametrize("with_redis", [False, True], ids=["no-redis", "redis"])
def test_replicas_sharing_only_postgres_and_media_see_each_others_writes(pg_server, tmp_path, with_redis):
    url = pg_server.database()
    media = tmp_path / "media"
    media.mkdir()
    redis = RedisServer() if with_redis else None
    roots = [tmp_path / "a", tmp_path / "b"]
    for root in roots:
        publish_test_sets(root)  # each replica its own data root (adapter sets are the same files)
    extra = {"redis_url": redis.url} if redis else {}
    a, b = (start_server(root, tmp_path, database_url=url, media_root=media, **extra) for root in roots)
    try:
        r = httpx.post(f"{a.url}/collections", json={"name": "photos", "kind": "image", "adapter": "ret-a"})
        assert r.status_code == 201, r.text
        r = httpx.post(f"{a.url}/collections/photos/items", timeout=60,
                       json={"items": [{"id": k, "image": b64(v)} for k, v in IMAGES.items()]})
        assert r.status_code == 201, r.text
        seen = until(lambda: len(hits(b.url, "photos")) == 8, "B seeing A's adds", timeout=1.0)
        assert hits(b.url, "photos") == hits(a.url, "photos")
        # B re-ranks with ITM: it reads the media A uploaded, from the shared media root
        reranked = httpx.post(f"{b.url}/retrieve", timeout=60, json={
            "query_text": "a red square", "collection": "photos", "top_k": 3, "rerank_k": 3}).json()["results"]
        assert all(h["itm_score"] is not None for h in reranked)
        assert httpx.delete(f"{b.url}/collections/photos/items/img2").status_code == 204
        until(lambda: "img2" not in {i for i, _ in hits(a.url, "photos")}, "A seeing B's delete", timeout=1.0)
        assert seen < 1.0
    finally:
        a.stop()
        b.stop()
        if redis:
            redis.stop()


def test_postgres_going_away_reads_keep_answering_and_writes_get_503(tmp_path):
    """Two replicas; PostgreSQL crashes: reads answer from memory, writes 503 with Retry-After. Once it is back
    the first write succeeds (no reconnect backoff to wait out) and the other replica serves it."""
    pg = PostgresServer()
    media = tmp_path / "media"
    media.mkdir()
    roots = [tmp_path / "a", tmp_path / "b"]
    for root in roots:
        publish_test_sets(root)
    url = pg.database()
    server = start_server(roots[0], tmp_path, database_url=url, media_root=media)
    other = start_server(roots[1], tmp_path, database_url=url, media_root=media)
    try:
        assert httpx.post(f"{server.url}/collections", json={"name": "c", "kind": "image", "adapter": "ret-a"}
                          ).status_code == 201
        items = [{"id": k, "image": b64(v)} for k, v in IMAGES.items()]
        assert httpx.post(f"{server.url}/collections/c/items", json={"items": items[:6]}, timeout=60).status_code == 201
        before = hits(server.url, "c")
        until(lambda: hits(other.url, "c") == before, "the other replica seeing the adds", timeout=10)
        pg.stop("immediate")
        for replica in (server, other):
            for _ in range(5):
                assert hits(replica.url, "c") == before  # from the in-memory index
        r = httpx.post(f"{server.url}/collections/c/items", json={"items": items[6:]}, timeout=60)
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1, r.text
        assert "unavailable" in r.json()["detail"] and "postgresql://" not in r.json()["detail"]
        ready = httpx.get(f"{server.url}/readyz").json()
        assert ready["status"] == "ready" and ready["checks"]["store"] == "degraded"
        assert any("collection store unreachable" in w for w in ready["warnings"])
        pg.start()
        until(lambda: httpx.get(f"{server.url}/readyz").json()["checks"]["store"] == "ok", "the store back", 30)
        r = httpx.post(f"{server.url}/collections/c/items", json={"items": items[6:]}, timeout=60)
        assert r.status_code == 201, r.text  # the first attempt once the replica says the store is back
        assert len(hits(server.url, "c")) == 8  # nothing half-written before, everything after
        until(lambda: len(hits(other.url, "c")) == 8, "the other replica serving the write", timeout=30)
        assert hits(other.url, "c") == hits(server.url, "c")
    finally:
        server.stop()
        other.stop()
        pg.close()
    assert "Traceback" not in server.log.read_text() and "Traceback" not in other.log.read_text()


def test_migration_from_sqlite_round_trips(pg_server, tmp_path):
    root = tmp_path / "data"
    publish_test_sets(root)
    (root / "media").mkdir()
    (root / "media" / "on-disk.png").write_bytes(IMAGES["img7"])
    sqlite = start_server(root, tmp_path)
    queries = ["a red square", "blue", "something green"]
    try:
        for name, adapter in (("photos", "ret-a"), ("moved", "ret-a")):
            assert httpx.post(f"{sqlite.url}/collections", json={"name": name, "kind": "image", "adapter": adapter}
                              ).status_code == 201
            items = [{"id": k, "image": b64(v), "metadata": {"k": k, "n": [1, 2.5]}} for k, v in IMAGES.items()]
            items.append({"id": "by-path", "path": "on-disk.png"})
            assert httpx.post(f"{sqlite.url}/collections/{name}/items", json={"items": items}, timeout=60
                              ).status_code == 201
        assert httpx.post(f"{sqlite.url}/collections/moved/reindex", json={"adapter": "ret-b"}).status_code == 202
        until(lambda: httpx.get(f"{sqlite.url}/collections/moved").json()["generation"] == 1, "the re-index", 30)
        texts = httpx.post(f"{sqlite.url}/collections", json={"name": "texts", "kind": "text", "adapter": "ret-a"})
        assert texts.status_code == 201
        assert httpx.post(f"{sqlite.url}/collections/texts/items", timeout=60, json={"items": [
            {"id": f"t{i}", "text": t} for i, t in enumerate(["a red square", "a blue circle", "green"])]}
        ).status_code == 201
        before = {(c, q): hits(sqlite.url, c, q, rerank_k=2) for c in ("photos", "moved") for q in queries}
        image_query = httpx.post(f"{sqlite.url}/retrieve", timeout=60, json={
            "query_image": b64(IMAGES["img1"]), "collection": "texts", "top_k": 3}).json()["results"]
    finally:
        sqlite.stop()
    url = pg_server.database()
    partial = migrate(root, url, media_root=root / "media", batch_size=3, progress=False, max_batches=2)
    assert partial == {}  # interrupted inside the first collection
    done = subprocess.run([sys.executable, "-m", "uniadapter_serve.service.cli", "collections", "migrate",
                           "--from", str(root), "--to", url, "--quiet"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert '"photos"' in done.stdout and '"checked": 9' in done.stdout
    fresh = tmp_path / "replica"  # a replica that never saw the SQLite files
    publish_test_sets(fresh)
    pg = start_server(fresh, tmp_path, database_url=url, media_root=root / "media")
    try:
        for (c, q), expected in before.items():
            assert hits(pg.url, c, q, rerank_k=2) == expected, (c, q)
        stats = httpx.get(f"{pg.url}/collections/moved").json()
        assert stats["generation"] == 1 and stats["items"] == 9
        again = httpx.post(f"{pg.url}/retrieve", timeout=60, json={
            "query_image": b64(IMAGES["img1"]), "collection": "texts", "top_k": 3}).json()["results"]
        assert [(h["id"], round(h["score"], 5)) for h in again] == [(h["id"], round(h["score"], 5))
                                                                      for h in image_query]
        meta = httpx.post(f"{pg.url}/retrieve", timeout=60, json={"query_text": "red", "collection": "photos",
                                                                  "top_k": 9}).json()["results"]
        assert {"k": "img0", "n": [1, 2.5]} in [h["metadata"] for h in meta]
    finally:
        pg.stop()
