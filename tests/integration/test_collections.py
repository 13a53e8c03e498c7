"""Collections through real servers, real FAISS and a real redis-server, on both store backends (SQLite on the
data volume, a real PostgreSQL): two replicas, restarts, a published version reaching the other replica,
SIGKILL during ingest, Redis going away."""

from __future__ import annotations

import base64
import json
import random
import re
import signal
import threading
import time

import httpx
import pytest
from support.media import image_bytes
from support.redis_server import RedisServer
from support.server import publish_test_sets, start_server

from uniadapter_serve.adapters.format import BackboneInfo, save_adapter_set
from uniadapter_serve.model.loading import load_backbone
from uniadapter_serve.model.testing import random_adapter
from uniadapter_serve.model.uniadapter import UniAdapterConfig

IMAGES = {f"img{i}": image_bytes((30 * i % 256, 255 - 25 * i, (90 * i) % 256), size=(40 + i, 36)) for i in range(8)}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def redis_server():
    server = RedisServer()
    yield server
    server.stop()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def store(request) -> dict[str, str]:
    """Server settings that choose the store backend: none (SQLite), or a new PostgreSQL database."""
    if request.param == "sqlite":
        return {}
    return {"database_url": request.getfixturevalue("pg_server").database()}


@pytest.fixture(scope="module")
def shared(tmp_path_factory, redis_server, store):
    root = tmp_path_factory.mktemp("shared")
    refs = publish_test_sets(root)
    (root / "media").mkdir()
    (root / "media" / "inside.png").write_bytes(IMAGES["img0"])
    logs = tmp_path_factory.mktemp("logs")
    state = {"root": root, "refs": refs, "logs": logs, "redis": redis_server, "store": store,
             "a": start_server(root, logs, redis_url=redis_server.url, **store),
             "b": start_server(root, logs, redis_url=redis_server.url, **store)}
    yield state
    state["a"].stop()  # a test restarts "a": stop whichever process holds the name now
    state["b"].stop()


def search(url: str, query: str, collection: str = "shapes", **kw) -> list[tuple[str, float]]:
    r = httpx.post(f"{url}/retrieve", json={"query_text": query, "collection": collection, "top_k": 8} | kw,
                   timeout=60)
    assert r.status_code == 200, r.text
    return [(h["id"], h["score"]) for h in r.json()["results"]]


def same(x: list[tuple[str, float]], y: list[tuple[str, float]]) -> bool:
    ids_match = [i for i, _ in x] == [i for i, _ in y]
    return ids_match and all(abs(s - t) <= 1e-5 for (_, s), (_, t) in zip(x, y, strict=True))


def test_ingest_query_delete_restart_across_replicas(shared):
    a, b = shared["a"], shared["b"]
    r = httpx.post(f"{a.url}/collections", json={"name": "shapes", "kind": "image", "adapter": "ret-a"})
    assert r.status_code == 201, r.text
    assert r.json()["adapter"] == shared["refs"]["ret-a"]
    r = httpx.post(f"{a.url}/collections/shapes/items", timeout=60,
                   json={"items": [{"id": k, "image": b64(v), "metadata": {"k": k}} for k, v in IMAGES.items()]})
    assert r.status_code == 201 and r.json()["items"] == 8, r.text

    via_a = search(a.url, "a red square")
    # the index returns what an exact search over the same embeddings returns
    inline = httpx.post(f"{a.url}/retrieve", timeout=60, json={
        "query_text": "a red square", "candidate_images": [b64(v) for v in IMAGES.values()], "top_k": 8,
        "adapter": "ret-a"}).json()["results"]
    names = list(IMAGES)
    assert same(via_a, [(names[int(h["id"])], h["score"]) for h in inline])
    assert same(search(b.url, "a red square"), via_a)  # replica B sees A's items

    assert httpx.delete(f"{a.url}/collections/shapes/items/img3").status_code == 204
    after_delete = search(b.url, "a red square")
    assert "img3" not in [i for i, _ in after_delete] and len(after_delete) == 7

    a.stop()
    restarted = start_server(shared["root"], shared["logs"], redis_url=shared["redis"].url, **shared["store"])
    shared["a"] = restarted
    assert same(search(restarted.url, "a red square"), after_delete)


def test_version_published_through_a_is_used_by_b(shared, tmp_path):
    a, b = shared["a"], shared["b"]
    png = b64(image_bytes())
    first = httpx.post(f"{b.url}/vqa", json={"image": png, "question": "what colour?", "adapter": "vqa-a"},
                       timeout=60).json()
    assert first["adapter"] == shared["refs"]["vqa-a"]
    backbone = load_backbone("blip-tiny")
    module = random_adapter(backbone, UniAdapterConfig.for_task("vqa", bottleneck=8, kv_rank=4), seed=999)
    version = save_adapter_set(module, tmp_path / "new", name="vqa-a", backbone=BackboneInfo.of(backbone))
    files = {"config": ("adapter_config.json", (tmp_path / "new" / "adapter_config.json").read_bytes()),
             "weights": ("adapter_model.safetensors", (tmp_path / "new" / "adapter_model.safetensors").read_bytes())}
    r = httpx.post(f"{a.url}/adapters/vqa-a/publish", files=files, timeout=60)
    assert r.status_code == 201, r.text
    assert r.json()["ref"] == f"vqa-a@{version}"
    deadline = time.monotonic() + 10
    while True:
        now = httpx.post(f"{b.url}/vqa", json={"image": png, "question": "what colour?", "adapter": "vqa-a"},
                         timeout=60).json()
        if now["adapter"] == f"vqa-a@{version}" or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert now["adapter"] == f"vqa-a@{version}"


def cache_hits(url: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    m = re.search(r'^uniadapter_embedding_cache_total{result="hit"} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def test_embedding_cache_is_shared_through_redis(shared):
    a, b = shared["a"], shared["b"]
    items = {"items": [{"id": k, "image": b64(v)} for k, v in IMAGES.items()]}
    for server, name in ((a, "cache-a"), (b, "cache-b")):
        created = httpx.post(f"{server.url}/collections", json={"name": name, "kind": "image", "adapter": "ret-a"})
        assert created.status_code == 201, created.text
        before = cache_hits(server.url)
        assert httpx.post(f"{server.url}/collections/{name}/items", json=items, timeout=60).status_code == 201
    assert cache_hits(b.url) >= before + 8  # A embedded these with the same version: B reads them from Redis


@pytest.fixture(scope="module")
def errs(shared):
    """A collection of its own for the error table, indexed with ret-a, holding img0."""
    a = shared["a"]
    r = httpx.post(f"{a.url}/collections", json={"name": "errs", "kind": "image", "adapter": "ret-a"})
    assert r.status_code == 201, r.text
    r = httpx.post(f"{a.url}/collections/errs/items", json={"items": [{"id": "img0", "image": b64(IMAGES["img0"])}]},
                   timeout=60)
    assert r.status_code == 201, r.text
    return "errs"


@pytest.mark.parametrize(
    ("request_", "status", "message"),
    [
        (("POST", "/retrieve", {"query_text": "red", "collection": "errs", "adapter": "ret-b"}), 409,
         "is indexed with"),
        (("POST", "/retrieve", {"query_text": "red", "collection": "nope"}), 404, "no collection named 'nope'"),
        (("POST", "/collections/errs/items", {"items": [{"path": "../../etc/passwd"}]}), 422,
         "outside the media root"),
        (("POST", "/collections/errs/items", {"items": [{"id": "img0", "path": "inside.png"}]}), 409,
         "already in collection"),
        (("POST", "/collections/errs/items", {"items": [{"path": "missing.png"}]}), 404, "no file"),
        (("POST", "/collections/errs/items", {"items": [{"path": "a\x00b.png"}]}), 422, "NUL byte"),
        (("POST", "/collections/errs/items", {"items": [{"path": "x" * 5000}]}), 422, "1024 characters"),
        (("POST", "/collections/errs/items", {"items": [{"path": "/".join(["d" * 255] * 3)}]}), 404, "no file"),
        (("POST", "/collections/errs/items", {"items": [{"path": "inside.png/x"}]}), 404, "no file"),
        (("POST", "/collections/errs/items", {"items": [{"path": "y" * 300}]}), 422, "name too long"),
        (("POST", "/collections", {"name": "errs", "kind": "image"}), 409, "already exists"),
        (("POST", "/collections", {"name": "bad", "kind": "image", "index": "NotAnIndex"}), 422,
         "invalid FAISS index factory"),
        (("POST", "/collections", {"name": "../x", "kind": "image"}), 422, "invalid collection name"),
        (("POST", "/collections", {"name": "naïve", "kind": "image"}), 422, "invalid collection name"),
        (("POST", "/collections/errs/reindex", {"adapter": "vqa-a"}), 409, "is a vqa set"),
    ],
    ids=["version-mismatch", "unknown-collection", "outside-root", "duplicate-id", "missing-path", "nul-byte",
         "long-path", "long-components", "under-a-file", "long-name", "exists", "bad-factory", "bad-name",
         "unicode-name", "wrong-task"],
)
def test_collection_errors(shared, errs, request_, status, message):
    method, path, body = request_
    with httpx.Client(base_url=shared["a"].url, timeout=60) as c:  # one keep-alive connection
        r = c.request(method, path, json=body)
        assert r.status_code == status, r.text
        assert message in r.json()["detail"]
        assert str(shared["root"]) not in r.text  # no server paths in messages
        assert c.get("/collections/errs").json()["items"] == 1  # nothing changed; the connection still works


def test_path_items_and_reindex_switch(shared):
    a = shared["a"]
    r = httpx.post(f"{a.url}/collections", json={"name": "reidx", "kind": "image", "adapter": "ret-a"})
    assert r.status_code == 201, r.text
    items = [{"id": k, "image": b64(v)} for k, v in list(IMAGES.items())[:7]] + [{"id": "from-path",
                                                                                  "path": "inside.png"}]
    r = httpx.post(f"{a.url}/collections/reidx/items", json={"items": items}, timeout=60)
    assert r.status_code == 201, r.text
    r = httpx.post(f"{a.url}/collections/reidx/reindex", json={"adapter": "ret-b"}, timeout=60)
    assert r.status_code == 202 and r.json()["reindex_target"] == shared["refs"]["ret-b"]
    search(a.url, "a red square", collection="reidx")  # queries keep working meanwhile
    deadline = time.monotonic() + 30
    while httpx.get(f"{a.url}/collections/reidx").json()["adapter"] != shared["refs"]["ret-b"]:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    stats = httpx.get(f"{shared['b'].url}/collections/reidx").json()
    assert stats["generation"] == 1 and stats["items"] == stats["indexed"] == 8
    r = httpx.post(f"{a.url}/retrieve", json={"query_text": "red", "collection": "reidx", "top_k": 2}).json()
    assert r["adapter"] == shared["refs"]["ret-b"]


def test_sigkill_during_ingest_loses_no_acknowledged_item(tmp_path, store):
    """Three rounds of: ingest in batches of 4, kill -9 at a random moment, restart, check; each round's
    restarted server ingests the next round."""
    root = tmp_path / "data"
    publish_test_sets(root)
    rng = random.Random(1130)
    server = start_server(root, tmp_path, **store)
    assert httpx.post(f"{server.url}/collections", json={"name": "big", "kind": "image", "adapter": "ret-a"}
                      ).status_code == 201
    attempted: list[str] = []
    acked: list[str] = []
    try:
        for round_ in range(3):
            stop = threading.Event()

            def ingest(url: str, r: int = round_, stop: threading.Event = stop) -> None:
                with httpx.Client(base_url=url, timeout=30) as c:
                    for batch in range(200):
                        ids = [f"r{r}-b{batch:03d}-{j}" for j in range(4)]
                        attempted.extend(ids)
                        items = [{"id": i, "image": b64(image_bytes((batch % 256, j * 60, 7 + r), size=(32, 32)))}
                                 for j, i in enumerate(ids)]
                        try:
                            reply = c.post("/collections/big/items", json={"items": items})
                        except httpx.HTTPError:
                            return
                        if reply.status_code != 201 or stop.is_set():
                            return
                        acked.extend(ids)

            target = len(acked) + 4 * rng.randint(2, 15)  # a random moment
            worker = threading.Thread(target=ingest, args=(server.url,))
            worker.start()
            deadline = time.monotonic() + 60
            while len(acked) < target and time.monotonic() < deadline:
                time.sleep(0.005)
            server.stop(signal.SIGKILL)
            stop.set()
            worker.join(30)
            assert len(acked) >= target
            media = next((root / "media/.collections").glob("big@*")) if store else root / "collections/big/media"
            (media / ("0" * 64 + ".png")).write_bytes(b"an orphan")  # what a kill between store and commit leaves
            (media / ".x.png.abc123.tmp").write_bytes(b"half")
            server = start_server(root, tmp_path, **store)
            named = {it["sha256"] for it in httpx.get(f"{server.url}/collections/big/items",
                                                      params={"limit": 500}).json()["items"]}
            on_disk = {p.name.split(".")[0] for p in media.iterdir()}
            assert on_disk == named  # start-up removed every orphan and temp file, and nothing an item names
            assert not [p for p in root.rglob("*.tmp")]
            stats = httpx.get(f"{server.url}/collections/big").json()
            assert stats["items"] == stats["indexed"]
            n = stats["items"]
            assert len(acked) <= n <= len(attempted)  # every acknowledged item survived
            present = {h["id"] for h in httpx.post(f"{server.url}/retrieve", timeout=60, json={
                "query_text": "x", "collection": "big", "top_k": 20}).json()["results"]}
            assert present <= set(attempted[:n])  # what is there is a prefix of what was sent
            del attempted[n:]  # the unacknowledged tail that did not land is not there
        ok = httpx.post(f"{server.url}/collections/big/items", timeout=60,
                        json={"items": [{"id": "after", "image": b64(image_bytes())}]})
        assert ok.status_code == 201 and ok.json()["items"] == len(attempted) + 1
    finally:
        server.stop()


def test_redis_going_away_degrades_without_failing(tmp_path, store):
    redis_server = RedisServer()
    root = tmp_path / "data"
    publish_test_sets(root)
    server = start_server(root, tmp_path, redis_url=redis_server.url, **store)
    try:
        assert httpx.post(f"{server.url}/collections", json={"name": "r", "kind": "image"}).status_code == 201
        redis_server.stop()
        r = httpx.post(f"{server.url}/collections/r/items", timeout=60,
                       json={"items": [{"id": k, "image": b64(v)} for k, v in list(IMAGES.items())[:3]]})
        assert r.status_code == 201, r.text
        assert len(search(server.url, "red", collection="r")) == 3
        ready = httpx.get(f"{server.url}/readyz").json()
        assert ready["status"] == "ready" and ready["checks"]["redis"] == "degraded"
        assert any("redis unreachable" in w for w in ready["warnings"])
        assert str(redis_server.port) not in json.dumps(ready)  # no host:port without the admin key
        verbose = httpx.get(f"{server.url}/readyz", params={"verbose": "true"}).json()  # no admin key configured
        assert verbose["details"]["redis"]["ok"] is False
    finally:
        server.stop()
        redis_server.stop()
