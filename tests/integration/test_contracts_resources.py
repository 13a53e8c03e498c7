"""The resource routes' contracts in-process (support.asgi, the shipped demo model): /adapters (listing, residency,
publish), /collections and their items (add both ways, pages, one item, media with ETag and ranges, thumbnails,
delete, re-index), /healthz /readyz /metrics; every JSON answer checked against the app's own OpenAPI."""

from __future__ import annotations

import base64
import hashlib
import io

import pytest
from PIL import Image
from support.asgi import openapi_validator
from support.media import video_bytes
from support.waiting import until

from uniadapter_serve.adapters.format import BackboneInfo, read_adapter_meta, save_adapter_set
from uniadapter_serve.model.demo.world import Scene, Shape, World
from uniadapter_serve.model.loading import load_backbone
from uniadapter_serve.model.testing import random_adapter
from uniadapter_serve.model.uniadapter import UniAdapterConfig
from uniadapter_serve.service import demo

REF = {task: read_adapter_meta(demo.SETS_DIR / name / "v1").ref for task, name in demo.DEMO_SETS.items()}
SPECS = [("square", "red"), ("circle", "blue"), ("triangle", "green"), ("star", "yellow")]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def scene_png(shape: str, color: str) -> bytes:
    buf = io.BytesIO()
    World(seed=0).render(Scene([Shape(shape, color, "large", 0.3, 0.5)], "white")).save(buf, "PNG")
    return buf.getvalue()


SCENES = {f"{color}-{shape}": scene_png(shape, color) for shape, color in SPECS}


@pytest.fixture(scope="module")
def client(demo_app):
    with demo_app.client() as c:
        yield c


@pytest.fixture(scope="module")
def spec(client):
    return client.get("/openapi.json").json()


def valid(spec, method: str, path: str, response, status: int = 200):
    assert response.status_code == status, response.text
    body = response.json()
    openapi_validator(spec, path, method, str(status)).validate(body)
    return body


def test_adapter_listing_names_the_shipped_versions(client, spec):
    listing = valid(spec, "get", "/adapters", client.get("/adapters"))
    by_name = {a["name"]: a for a in listing["adapters"]}
    for task, ref in REF.items():
        row = by_name[demo.DEMO_SETS[task]]
        assert row["ref"] == ref and row["task"] == task and row["newest"] is True
        assert 0 < row["percent_of_backbone"] < 10 and row["bytes"] > row["tunable_parameters"]
        assert row["answer_list_size"] == (None if task == "retrieval" else 21)
        one = valid(spec, "get", "/adapters/{ref}", client.get(f"/adapters/{demo.DEMO_SETS[task]}"))
        assert valid(spec, "get", "/adapters/{ref}", client.get(f"/adapters/{ref}"))["ref"] == one["ref"] == ref
    assert listing["errors"] == {} and 0 < listing["device_bytes"] <= listing["device_budget_bytes"]
    missing = valid(spec, "get", "/adapters/{ref}", client.get("/adapters/nope"), 404)
    assert missing == {"error": "AdapterNotFoundError", "detail": "no adapter set named 'nope'"}
    version = valid(spec, "get", "/adapters/{ref}", client.get("/adapters/demo-vqa@000000000000"), 404)
    assert version["error"] == "AdapterVersionNotFoundError" and "'000000000000'" in version["detail"]


def test_pin_load_unload_cycle(client, spec):
    name, path = demo.DEMO_SETS["videoqa"], "/adapters/{ref}/"
    try:
        pinned = valid(spec, "post", path + "pin", client.post(f"/adapters/{name}/pin"))
        assert pinned["pinned"] is True and pinned["resident"] is True and "device" in pinned["tier"]
        refused = valid(spec, "post", path + "unload", client.post(f"/adapters/{name}/unload"), 409)
        assert refused == {"error": "AdapterInUseError", "detail": f"{REF['videoqa']} is pinned; unpin it first"}
        assert valid(spec, "post", path + "unpin", client.post(f"/adapters/{name}/unpin"))["pinned"] is False
        unloaded = valid(spec, "post", path + "unload", client.post(f"/adapters/{name}/unload"))
        assert unloaded["resident"] is False and unloaded["tier"] == []
        listed = {a["name"]: a for a in client.get("/adapters").json()["adapters"]}
        assert listed[name]["resident"] is False
        loaded = valid(spec, "post", path + "load", client.post(f"/adapters/{name}/load"))
        assert loaded["resident"] is True and loaded["ref"] == REF["videoqa"]
    finally:
        client.post(f"/adapters/{name}/unpin")


def retrieval_set_files(folder, name: str, seed: int) -> dict[str, tuple[str, bytes]]:
    """The two files of a new random retrieval set `name` for the demo backbone, as publish takes them."""
    backbone = load_backbone("demo")
    module = random_adapter(backbone, UniAdapterConfig.for_task("retrieval", bottleneck=8, kv_rank=4), seed=seed)
    save_adapter_set(module, folder, name=name, backbone=BackboneInfo.of(backbone))
    return {"config": ("adapter_config.json", (folder / "adapter_config.json").read_bytes()),
            "weights": ("adapter_model.safetensors", (folder / "adapter_model.safetensors").read_bytes())}


def test_publish_refuses_bad_uploads_and_accepts_a_set(client, spec, tmp_path):
    path = "/adapters/{name}/publish"
    assert valid(spec, "post", path, client.post("/adapters/x/publish", json={}), 415)["error"] == \
        "UnsupportedMediaTypeError"
    missing = valid(spec, "post", path, client.post("/adapters/x/publish", files={"config": ("c.json", b"{}")}), 422)
    assert "missing file field(s) ['weights']" in missing["detail"]
    files = retrieval_set_files(tmp_path, "contract-retrieval", seed=7)
    renamed = valid(spec, "post", path, client.post("/adapters/other-name/publish", files=files), 409)
    assert "named 'contract-retrieval' in its config, not 'other-name'" in renamed["detail"]
    published = valid(spec, "post", path, client.post("/adapters/contract-retrieval/publish", files=files), 201)
    version = hashlib.sha256((tmp_path / "adapter_model.safetensors").read_bytes()).hexdigest()[:12]
    assert published["ref"] == f"contract-retrieval@{version}" and published["task"] == "retrieval"
    assert client.get("/adapters/contract-retrieval").json()["ref"] == published["ref"]


def add_scenes(client, name: str) -> list[str]:
    items = [{"id": f"shapes/{key}", "image": b64(png), "metadata": {"caption": key}}
             for key, png in SCENES.items()]
    return client.post(f"/collections/{name}/items", json={"items": items}).json()["ids"]


def test_collection_life_from_create_to_delete(client, spec):
    name = "contract-images"
    created = valid(spec, "post", "/collections", client.post("/collections", json={"name": name, "kind": "image"}),
                    201)
    assert created | {"uid": None} == {
        "name": name, "uid": None, "kind": "image", "adapter": REF["retrieval"], "index": "flat", "dim": 64,
        "items": 0, "indexed": 0, "generation": 0, "reindex_target": None, "exact_fallback": False,
        "store_available": True, "moments": None}
    try:
        again = valid(spec, "post", "/collections", client.post("/collections", json={"name": name}), 409)
        assert again == {"error": "ConflictError", "detail": f"collection '{name}' already exists"}
        added = valid(spec, "post", "/collections/{name}/items", client.post(f"/collections/{name}/items", json={
            "items": [{"id": f"shapes/{k}", "image": b64(v), "metadata": {"caption": k}} for k, v in SCENES.items()]}),
            201)
        assert added == {"collection": name, "uid": created["uid"], "ids": [f"shapes/{k}" for k in SCENES],
                         "items": len(SCENES)}
        upload = video_bytes([(0, 0, 0)] * 2, codec="mjpeg", fmt="avi")  # a video in an image collection
        wrong = client.post(f"/collections/{name}/items", files={"files": ("clip.avi", upload, "video/x-msvideo")})
        assert wrong.status_code == 415, wrong.text
        form = valid(spec, "post", "/collections/{name}/items", client.post(
            f"/collections/{name}/items", files={"files": ("orange.png", scene_png("circle", "orange"), "image/png")},
            data={"ids": "orange-circle"}), 201)
        assert form["ids"] == ["orange-circle"]
        stats = valid(spec, "get", "/collections/{name}", client.get(f"/collections/{name}"))
        assert stats["items"] == stats["indexed"] == len(SCENES) + 1 and stats["uid"] == created["uid"]
        assert name in [c["name"] for c in valid(spec, "get", "/collections", client.get("/collections"))]

        hits = valid(spec, "post", "/retrieve", client.post("/retrieve", json={
            "query_text": "a large green triangle on the left", "collection": name, "top_k": 3}))["results"]
        assert hits[0]["id"] == "shapes/green-triangle" and hits[0]["metadata"] == {"caption": "green-triangle"}

        client.delete(f"/collections/{name}/items/shapes/green-triangle").raise_for_status()
        gone = valid(spec, "get", "/collections/{name}/items/{item_id}",
                     client.get(f"/collections/{name}/items/shapes/green-triangle"), 404)
        assert gone == {"error": "NotFoundError", "detail": "no item 'shapes/green-triangle'"}
        after = client.post("/retrieve", json={"query_text": "a large green triangle on the left",
                                               "collection": name, "top_k": 10}).json()["results"]
        assert "shapes/green-triangle" not in [h["id"] for h in after] and len(after) == len(SCENES)
    finally:
        assert client.delete(f"/collections/{name}").status_code == 204
    assert valid(spec, "get", "/collections/{name}", client.get(f"/collections/{name}"), 404)["detail"] == \
        f"no collection named '{name}' (GET /collections lists them)"


def test_items_pages_one_item_media_and_thumbnails(client, spec):
    name = "contract-items"
    client.post("/collections", json={"name": name, "kind": "image"}).raise_for_status()
    try:
        ids = add_scenes(client, name)
        pages, cursor = [], 0
        while cursor is not None:
            page = valid(spec, "get", "/collections/{name}/items",
                         client.get(f"/collections/{name}/items", params={"limit": 3, "cursor": cursor}))
            assert page["collection"] == name and len(page["items"]) <= 3
            pages.append(page["items"])
            cursor = page["next_cursor"]
        assert [len(p) for p in pages] == [3, 1] and [i["id"] for p in pages for i in p] == ids  # order added

        png = SCENES["blue-circle"]
        item = valid(spec, "get", "/collections/{name}/items/{item_id}",
                     client.get(f"/collections/{name}/items/shapes/blue-circle"))
        assert item["sha256"] == hashlib.sha256(png).hexdigest() and item["size"] == len(png)
        assert item["kind"] == "image" and item["content_type"] == "image/png" and item["adapter"] == REF["retrieval"]
        media = client.get(item["media_url"])
        assert media.status_code == 200 and media.content == png
        assert media.headers["etag"] and media.headers["accept-ranges"] == "bytes"
        assert client.get(item["media_url"], headers={"If-None-Match": media.headers["etag"]}).status_code == 304
        part = client.get(item["media_url"], headers={"Range": "bytes=0-9"})
        assert part.status_code == 206 and part.content == png[:10]
        assert part.headers["content-range"] == f"bytes 0-9/{len(png)}"
        past = client.get(item["media_url"], headers={"Range": f"bytes={len(png) + 5}-"})
        assert past.status_code == 416 and past.headers["content-range"] == f"bytes */{len(png)}"
        thumb = client.get(item["thumbnail_url"], params={"size": 64})
        assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
        assert max(Image.open(io.BytesIO(thumb.content)).size) <= 64
        assert client.get(item["thumbnail_url"], params={"size": 65}).status_code == 422
    finally:
        client.delete(f"/collections/{name}")


def test_text_collection_answers_image_queries(client, spec):
    name = "contract-texts"
    client.post("/collections", json={"name": name, "kind": "text"}).raise_for_status()
    try:
        texts = [f"a large {color} {shape} on the left" for shape, color in SPECS]
        added = client.post(f"/collections/{name}/items", json={"items": [{"text": t} for t in texts]}).json()
        assert added["items"] == len(texts) and len(set(added["ids"])) == len(texts)
        for (shape, color), text, item_id in zip(SPECS, texts, added["ids"], strict=True):
            hits = valid(spec, "post", "/retrieve", client.post("/retrieve", json={
                "query_image": b64(SCENES[f"{color}-{shape}"]), "collection": name, "top_k": 2}))["results"]
            assert hits[0]["id"] == item_id and hits[0]["metadata"]["text"] == text
    finally:
        client.delete(f"/collections/{name}")


def test_reindex_switches_to_the_new_version_when_done(client, spec, tmp_path):
    name = "contract-reindex"
    client.post("/collections", json={"name": name, "kind": "image"}).raise_for_status()
    try:
        add_scenes(client, name)
        same = valid(spec, "post", "/collections/{name}/reindex",
                     client.post(f"/collections/{name}/reindex", json={"adapter": "demo-retrieval"}), 409)
        assert same["detail"] == f"collection '{name}' is already indexed with {REF['retrieval']}"
        task = valid(spec, "post", "/collections/{name}/reindex",
                     client.post(f"/collections/{name}/reindex", json={"adapter": "demo-vqa"}), 409)
        assert "is a vqa set" in task["detail"]
        published = client.post("/adapters/contract-reindex/publish",
                                files=retrieval_set_files(tmp_path, "contract-reindex", seed=8))
        assert published.status_code == 201, published.text
        target = published.json()["ref"]
        started = valid(spec, "post", "/collections/{name}/reindex",
                        client.post(f"/collections/{name}/reindex", json={"adapter": target}), 202)
        assert started["reindex_target"] == target and started["adapter"] == REF["retrieval"]
        done = until(lambda: (s := client.get(f"/collections/{name}").json())["adapter"] == target and s,
                     "the re-index to finish", 60)
        assert done["generation"] == 1 and done["reindex_target"] is None and done["items"] == len(SCENES)
        hits = client.post("/retrieve", json={"query_text": "a red square", "collection": name}).json()
        assert hits["adapter"] == target and len(hits["results"]) == len(SCENES)
    finally:
        client.delete(f"/collections/{name}")


def test_health_readiness_and_metrics(client):
    health = client.get("/healthz")
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready", "checks": {
        "store": "ok", "backbone": "ok", "engine": "ok", "adapters": "ok", "redis": "off", "faiss": "cpu",
        "golden": "ok"}, "warnings": []}
    verbose = client.get("/readyz", params={"verbose": "true"}).json()  # no keys configured: open to all
    assert verbose["details"]["golden"]["backbone"]["result"] == "pass"  # the shipped record, verified at start
    assert verbose["details"]["backbone"]["source"] == "demo" and verbose["details"]["backbone"]["image_size"] == 96
    assert verbose["details"]["collections"] >= 2

    def count(text: str, route: str, status: str) -> float:
        for line in text.splitlines():
            if line.startswith("uniadapter_requests_total{") and f'route="{route}"' in line and \
                    f'status="{status}"' in line:
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    before = client.get("/metrics").text
    client.get("/adapters/nope")
    client.get("/healthz")
    metrics = client.get("/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    assert count(metrics.text, "/adapters/{ref}", "404") == count(before, "/adapters/{ref}", "404") + 1
    assert "# TYPE uniadapter_batch_size histogram" in metrics.text and "uniadapter_queue_depth" in metrics.text
