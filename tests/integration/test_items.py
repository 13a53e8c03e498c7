"""Items and media of a collection in-process (support.asgi: the session's blip-tiny app, real FAISS, read key): cursor
pages,
one item, its bytes with ETag / Cache-Control / ranges, thumbnails of every image type and of a video's first
sampled frame, media URLs on /retrieve hits, image->image and video->video search, and metadata filters applied
inside the search."""

from __future__ import annotations

import base64
import io
import time

import httpx
import numpy as np
import pytest
from PIL import Image
from support.keys import ADMIN_KEY
from support.media import image_bytes, video_bytes

FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP", "gif": "GIF", "bmp": "BMP"}
COLOURS = {"png": (220, 30, 30), "jpeg": (30, 200, 40), "webp": (30, 40, 220), "gif": (230, 220, 30),
           "bmp": (200, 40, 200)}
IMAGES = {k: image_bytes(COLOURS[k], size=(60, 40), fmt=fmt) for k, fmt in FORMATS.items()}
GREEN = (20, 220, 20)
# 8 frames at 10 fps; with the set's 4 frames the first sample is at 0.1 s: frame 1, the only green one
CLIP = video_bytes([(220, 20, 20), GREEN] + [(20, 20, 220)] * 6, size=(64, 48))
CLIP2 = video_bytes([(200, 200, 200)] * 8, size=(64, 48))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture
def client(tiny_client):
    return tiny_client


@pytest.fixture
def refs(tiny_app):
    return tiny_app.refs


@pytest.fixture
def data_root(tiny_app):
    return tiny_app.data_root


@pytest.fixture(scope="module")
def media(tiny_app):
    """An image collection of one image per supported type (+ a path item), and a video collection."""
    with tiny_app.client(ADMIN_KEY) as admin:
        return _fill(admin, tiny_app.data_root)


def _fill(admin: httpx.Client, data_root) -> dict[str, float]:
    started = time.time()
    (data_root / "media").mkdir(exist_ok=True)
    (data_root / "media" / "linked.png").write_bytes(IMAGES["png"])
    r = admin.post("/collections", json={"name": "items-img", "kind": "image", "adapter": "ret-a"})
    assert r.status_code == 201, r.text
    items = [{"id": k, "image": b64(v), "metadata": {"caption": f"a {k} Picture", "group": "a" if i < 2 else "b",
                                                     "rank": i, "flag": i == 4}}
             for i, (k, v) in enumerate(IMAGES.items())]
    items.append({"id": "linked", "path": "linked.png", "metadata": {"group": "c"}})
    r = admin.post("/collections/items-img/items", json={"items": items})
    assert r.status_code == 201, r.text
    assert admin.post("/collections", json={"name": "items-vid", "kind": "video",
                                            "adapter": "ret-video"}).status_code == 201
    r = admin.post("/collections/items-vid/items", json={"items": [{"id": "clip", "video": b64(CLIP)},
                                                                   {"id": "grey", "video": b64(CLIP2)}]})
    assert r.status_code == 201, r.text
    return {"started": started, "ended": time.time()}


def test_pages_follow_the_order_items_were_added(client, media):
    seen, cursor, pages = [], 0, 0
    while cursor is not None:
        r = client.get("/collections/items-img/items", params={"limit": 2, "cursor": cursor})
        assert r.status_code == 200, r.text
        page = r.json()
        assert len(page["items"]) <= 2
        seen += [it["id"] for it in page["items"]]
        cursor, pages = page["next_cursor"], pages + 1
    assert seen == [*IMAGES, "linked"] and pages == 3


def test_one_item_says_what_it_is(client, media, refs):
    r = client.get("/collections/items-img/items/webp")
    assert r.status_code == 200, r.text
    it = r.json()
    assert (it["kind"], it["size"], it["content_type"]) == ("image", len(IMAGES["webp"]), "image/webp")
    assert it["adapter"] == refs["ret-a"] and it["metadata"]["caption"] == "a webp Picture"
    assert media["started"] - 1 <= it["added"] <= media["ended"] + 1
    assert it["media_url"] == "/collections/items-img/items/webp/media"
    assert client.get("/collections/items-vid/items/clip").json()["content_type"] == "video/mp4"


def test_media_bytes_etag_cache_control_and_ranges(client, media):
    url = "/collections/items-img/items/jpeg/media"
    full = client.get(url)
    assert full.status_code == 200 and full.content == IMAGES["jpeg"]
    assert full.headers["content-type"] == "image/jpeg" and full.headers["accept-ranges"] == "bytes"
    assert "max-age" in full.headers["cache-control"]
    etag = full.headers["etag"]
    assert client.get(url, headers={"If-None-Match": etag}).status_code == 304
    size = len(IMAGES["jpeg"])
    for header, first, last in (("bytes=2-9", 2, 9), ("bytes=-4", size - 4, size - 1), ("bytes=5-", 5, size - 1),
                                (f"bytes=10-{size + 50}", 10, size - 1)):
        r = client.get(url, headers={"Range": header})
        assert r.status_code == 206, (header, r.text)
        assert r.content == IMAGES["jpeg"][first:last + 1]
        assert r.headers["content-range"] == f"bytes {first}-{last}/{size}"
    r = client.get(url, headers={"Range": f"bytes={size}-"})
    assert r.status_code == 416 and r.headers["content-range"] == f"bytes */{size}"
    assert r.json()["error"] == "RangeNotSatisfiable" and str(size) in r.json()["detail"]
    assert client.get(url, headers={"Range": "bytes=9-2"}).status_code == 200  # malformed: ignored
    video = client.get("/collections/items-vid/items/clip/media", headers={"Range": "bytes=0-99"})
    assert video.status_code == 206 and video.content == CLIP[:100] and video.headers["content-type"] == "video/mp4"


@pytest.mark.parametrize(("path", "status"), [
    ("/collections/items-img/items/nope", 404),
    ("/collections/items-img/items/nope/media", 404),
    ("/collections/items-img/items/nope/thumbnail", 404),
    ("/collections/no-such/items", 404),
    ("/collections/items-img/items/..%2F..%2Fitems.sqlite/media", 404),
    ("/collections/items-img/items/png/thumbnail?size=100", 422),
    ("/collections/items-img/items/png/thumbnail?size=big", 422),
    ("/collections/items-img/items?limit=0", 422),
    ("/collections/items-img/items?cursor=-1", 422),
])
def test_bad_requests_get_a_clear_4xx(client, media, path, status):
    r = client.get(path)
    assert r.status_code == status, r.text
    assert set(r.json()) == {"error", "detail"} and r.json()["detail"]


def test_a_path_never_escapes_the_media_root(client, media, data_root, tmp_path):
    secret = tmp_path / "secret.png"
    secret.write_bytes(IMAGES["gif"])
    link = data_root / "media" / "linked.png"
    link.unlink()
    link.symlink_to(secret)  # the file the item names now points outside the media root
    try:
        r = client.get("/collections/items-img/items/linked/media")
        assert r.status_code == 404 and IMAGES["gif"] not in r.content, r.text
        listed = client.get("/collections/items-img/items", params={"limit": 10}).json()["items"]
        assert next(it for it in listed if it["id"] == "linked")["media_url"] is None
    finally:
        link.unlink()
        link.write_bytes(IMAGES["png"])
    assert client.get("/collections/items-img/items/linked/media").content == IMAGES["png"]


def _decoded(r: httpx.Response) -> np.ndarray:
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg", r.text
    return np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB")).astype(int)


@pytest.mark.parametrize("kind", list(IMAGES))
def test_thumbnails_of_every_image_type(client, media, kind):
    r = client.get(f"/collections/items-img/items/{kind}/thumbnail", params={"size": 64})
    pixels = _decoded(r)
    assert max(pixels.shape[:2]) <= 64
    assert np.abs(pixels[1, 1] - np.array(COLOURS[kind])).max() <= 40  # the corner keeps the background colour
    again = client.get(f"/collections/items-img/items/{kind}/thumbnail", params={"size": 64},
                       headers={"If-None-Match": r.headers["etag"]})
    assert again.status_code == 304


def test_video_thumbnail_is_the_first_sampled_frame(client, media):
    pixels = _decoded(client.get("/collections/items-vid/items/clip/thumbnail", params={"size": 128}))
    assert pixels.shape[:2] == (48, 64)  # never enlarged
    assert np.abs(pixels[24, 32] - np.array(GREEN)).max() <= 40


def test_hits_carry_working_media_and_thumbnail_urls(client, media):
    r = client.post("/retrieve", json={"query_text": "a red picture", "collection": "items-img", "top_k": 6})
    assert r.status_code == 200, r.text
    hits = r.json()["results"]
    assert len(hits) == 6
    for hit in hits:
        assert client.get(hit["media_url"]).status_code == 200
        assert client.get(hit["thumbnail_url"]).headers["content-type"] == "image/jpeg"


def test_image_to_image_and_video_to_video(client, media):
    for kind in ("png", "bmp"):
        r = client.post("/retrieve", json={"query_image": b64(IMAGES[kind]), "collection": "items-img", "top_k": 2})
        assert r.status_code == 200, r.text
        assert r.json()["results"][0]["id"] in (kind, "linked" if kind == "png" else kind)
        assert r.json()["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)
    r = client.post("/retrieve", json={"query_video": b64(CLIP), "collection": "items-vid", "top_k": 2})
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["id"] == "clip"
    assert r.json()["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)
    r = client.post("/retrieve", files={"query_video": ("q.mp4", CLIP2, "video/mp4")},
                    data={"collection": "items-vid", "top_k": "1"})
    assert r.status_code == 200 and r.json()["results"][0]["id"] == "grey", r.text


def test_filters_apply_inside_the_search_so_top_k_still_come_back(client, media):
    body = {"query_image": b64(IMAGES["png"]), "collection": "items-img", "top_k": 2}
    unfiltered = [h["id"] for h in client.post("/retrieve", json=body).json()["results"]]
    assert "png" in unfiltered
    r = client.post("/retrieve", json={**body, "filter": {"metadata": {"group": "b"}}})
    assert r.status_code == 200, r.text
    ids = [h["id"] for h in r.json()["results"]]
    assert len(ids) == 2 and set(ids) <= {"webp", "gif", "bmp"}  # group b ranks below png and linked: still 2
    r = client.post("/retrieve", json={**body, "top_k": 5, "filter": {"caption_contains": "WEBP picture"}})
    assert [h["id"] for h in r.json()["results"]] == ["webp"]
    r = client.post("/retrieve", json={**body, "filter": {"metadata": {"flag": True, "group": "b"}}})
    assert [h["id"] for h in r.json()["results"]] == ["bmp"]
    r = client.post("/retrieve", json={**body, "filter": {"metadata": {"flag": 1}}})  # 1 is not true
    assert r.json()["results"] == []
    r = client.post("/retrieve", json={**body, "filter": {"metadata": {"rank": 2.0}}})  # 2.0 is 2
    assert [h["id"] for h in r.json()["results"]] == ["webp"]


def test_read_routes_need_the_read_key(tiny_app, media):
    for path in ("/collections/items-img/items", "/collections/items-img/items/png",
                 "/collections/items-img/items/png/media", "/collections/items-img/items/png/thumbnail"):
        with tiny_app.client() as anon:
            r = anon.get(path)
        assert r.status_code == 401 and r.json()["error"] == "AuthError", path
