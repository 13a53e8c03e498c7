"""GET /collections/{name}/items/{id}/thumbnail?t=SECONDS on real H.264 files whose frames' colours encode their
index (in-process, the session's blip-tiny app): the frame on screen at t comes back (a moment hit's thumbnail is
its middle frame), a moment collection's video longer than MAX_VIDEO_SECONDS has its own limits, thumbnails are
cached per (size, t to 0.1 s), bad t values are 422 naming `t`, and the frame is reached by a seek (one GOP of
frames decoded, not the video up to t)."""

from __future__ import annotations

import base64
import io
import math

import numpy as np
import pytest
from PIL import Image
from support.media import image_bytes, video_bytes

from uniadapter_serve.service.collections import item_files
from uniadapter_serve.service.collections.item_files import video_frame_at, video_thumbnail

FPS = 2
SECONDS = 100  # over the session's MAX_VIDEO_SECONDS (30): only a moment collection takes it
GOP = 20  # a keyframe every 10 s
LEVELS = [30 + 36 * k for k in range(7)]  # 7 levels per channel, 36 apart: 343 colours that survive H.264 + JPEG


def colour(i: int) -> tuple[int, int, int]:
    """Frame i's colour: its index in base 7 over (R, G, B)."""
    i %= 7 ** 3
    return LEVELS[i % 7], LEVELS[i // 7 % 7], LEVELS[i // 49 % 7]


def index_of(jpeg: bytes) -> int:
    """The frame index a thumbnail shows (its mean colour, each channel to the nearest level)."""
    mean = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"), np.float64).reshape(-1, 3).mean(0)
    r, g, b = (int(np.argmin([abs(c - level) for level in LEVELS])) for c in mean)
    return r + 7 * g + 49 * b


def on_screen(t: float, seconds: float = SECONDS) -> int:
    """The frame shown at t once t is rounded to 0.1 s, as the route does (at the end: the last frame)."""
    return min(math.floor(round(t, 1) * FPS + 1e-9), int(seconds * FPS) - 1) % 7 ** 3


def timed_video(seconds: float, gop: int = GOP) -> bytes:
    return video_bytes([colour(i) for i in range(int(seconds * FPS))], fps=FPS, gop=gop)


LONG = timed_video(SECONDS)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def collections(tiny_admin):
    """A moment collection holding the 100 s video, a plain video collection with a 10 s one, an image one."""
    made = {"moments": "thumbs-moments", "plain": "thumbs-plain", "images": "thumbs-images"}
    r = tiny_admin.post("/collections", json={"name": made["moments"], "kind": "video", "adapter": "ret-video",
                                              "moments": {"window_s": 8, "stride_s": 4}})
    assert r.status_code == 201, r.text
    r = tiny_admin.post(f"/collections/{made['moments']}/items", json={"items": [{"id": "long", "video": b64(LONG)}]})
    assert r.status_code == 201, r.text
    assert tiny_admin.post("/collections", json={"name": made["plain"], "kind": "video",
                                                 "adapter": "ret-video"}).status_code == 201
    r = tiny_admin.post(f"/collections/{made['plain']}/items", json={"items": [
        {"id": "short", "video": b64(timed_video(10))}]})
    assert r.status_code == 201, r.text
    assert tiny_admin.post("/collections", json={"name": made["images"], "kind": "image",
                                                 "adapter": "ret-a"}).status_code == 201
    r = tiny_admin.post(f"/collections/{made['images']}/items", json={"items": [
        {"id": "red", "image": b64(image_bytes())}]})
    assert r.status_code == 201, r.text
    yield made
    for name in made.values():
        tiny_admin.delete(f"/collections/{name}")


def thumb(client, collection: str, item: str, **params):
    return client.get(f"/collections/{collection}/items/{item}/thumbnail", params=params)


@pytest.mark.parametrize("t", [0, 0.4, 0.5, 9.9, 10.0, 37.3, 63.85, 99.4, 99.9, 100.0])
def test_the_frame_on_screen_at_t_comes_back(tiny_client, collections, t):
    r = thumb(tiny_client, collections["moments"], "long", t=t, size=64)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/jpeg"
    assert index_of(r.content) == on_screen(t)


def test_a_plain_video_collection_takes_t_too(tiny_client, collections):
    r = thumb(tiny_client, collections["plain"], "short", t=7.6)
    assert r.status_code == 200, r.text
    assert index_of(r.content) == on_screen(7.6)
    whole = thumb(tiny_client, collections["plain"], "short")  # no t: the first sampled frame, as before
    assert whole.status_code == 200 and whole.headers["etag"].endswith('f"')


def test_a_moment_hits_thumbnail_is_its_middle_frame(tiny_client, collections):
    r = tiny_client.post("/retrieve", json={"query_text": "a colour", "collection": collections["moments"],
                                            "top_k": 20, "group_by_item": False})
    assert r.status_code == 200, r.text
    hits = r.json()["results"]
    assert len(hits) == 20  # of plan_moments(100, 8, 4)'s 24 (MAX_TOP_K)
    for h in hits[:: 5]:
        middle = (h["start_s"] + h["end_s"]) / 2
        got = tiny_client.get(h["thumbnail_url"])
        assert got.status_code == 200, got.text
        assert index_of(got.content) == on_screen(middle), h
    whole = thumb(tiny_client, collections["moments"], "long")  # the item's own thumbnail: within the moment limits
    assert whole.status_code == 200, whole.text
    assert index_of(whole.content) == on_screen(SECONDS / 4 / 2)  # ret-video's first of 4 sampled frames


def test_thumbnails_at_t_are_cached_per_size_and_tenth_of_a_second(tiny_app, tiny_client, collections):
    name = collections["moments"]
    first = thumb(tiny_client, name, "long", t=41.32, size=128)
    assert first.status_code == 200, first.text
    etag = first.headers["etag"]
    assert etag.endswith('-128-t413"')
    cached = list(tiny_app.data_root.rglob("*-128-t413.jpg"))
    assert len(cached) == 1 and cached[0].read_bytes() == first.content
    marker = io.BytesIO()
    Image.new("RGB", (8, 8), colour(7)).save(marker, "JPEG")
    cached[0].write_bytes(marker.getvalue())  # what the cache holds is what is served, without a decode
    again = thumb(tiny_client, name, "long", t=41.28, size=128)  # rounds to the same 41.3 s
    assert again.status_code == 200 and again.headers["etag"] == etag and again.content == marker.getvalue()
    other_size = thumb(tiny_client, name, "long", t=41.3, size=64)
    assert other_size.headers["etag"] != etag and index_of(other_size.content) == on_screen(41.3)
    later = thumb(tiny_client, name, "long", t=41.5, size=128)
    assert later.headers["etag"] != etag and index_of(later.content) == on_screen(41.5)
    assert len(list(tiny_app.data_root.rglob("*-t415.jpg"))) == 1
    unchanged = tiny_client.get(f"/collections/{name}/items/long/thumbnail", params={"t": 41.3, "size": 128},
                                headers={"If-None-Match": etag})
    assert unchanged.status_code == 304 and unchanged.content == b""


@pytest.mark.parametrize(("t", "says"), [
    ("-1", "t: must be a finite number of seconds >= 0"),
    ("-0.01", "t: must be a finite number of seconds >= 0"),
    ("nan", "t: must be a finite number of seconds >= 0"),
    ("inf", "t: must be a finite number of seconds >= 0"),
    ("1e400", "t: must be a finite number of seconds >= 0"),
    ("abc", "query.t: Input should be a valid number"),
    ("", "query.t: Input should be a valid number"),
    ("100.2", "t: 100.2 s is past the end of the video (100.000 s)"),
    ("3600", "t: 3600 s is past the end of the video (100.000 s)"),
])
def test_bad_t_is_422_naming_t(tiny_client, collections, t, says):
    r = thumb(tiny_client, collections["moments"], "long", t=t)
    assert r.status_code == 422, r.text
    assert says in r.json()["detail"]


def test_t_on_an_image_is_422(tiny_client, collections):
    r = thumb(tiny_client, collections["images"], "red", t=1)
    assert r.status_code == 409 and r.json()["detail"].startswith("t: collection 'thumbs-images' holds images")
    assert thumb(tiny_client, collections["images"], "red").status_code == 200


def test_the_frame_is_reached_by_a_seek_not_from_the_start(monkeypatch):
    """A 20-minute file with a keyframe every 10 s: the frame at 1150 s costs at most one GOP of decoding, and so
    does the first sampled frame 150 s in (under a cap of 50 frames, which decoding from the start would pass)."""
    data = timed_video(1200)
    monkeypatch.setattr(item_files, "VIDEO_THUMB_MAX_FRAMES", 50)
    for t in (0.0, 611.7, 1150.2, 1199.9):
        got = video_frame_at(data, t, max_bytes=len(data), max_seconds=3600, max_pixels=64 * 48, field="video")
        jpeg = io.BytesIO()
        got.image.save(jpeg, "JPEG")
        assert index_of(jpeg.getvalue()) == on_screen(t, 1200)
        assert got.time_s == pytest.approx(math.floor(t * FPS) / FPS)
        assert got.decoded <= GOP + 1, (t, got.decoded)
    limits = {"max_bytes": len(data), "max_seconds": 3600, "max_pixels": 64 * 48, "field": "video"}
    first = video_thumbnail(data, 64, 4, **limits)  # no t: the first of 4 sampled frames, 150 s in (frame 300)
    assert index_of(first) == on_screen(150.0, 1200)
    with pytest.raises(Exception, match="over the limit of 600 s"):
        video_frame_at(data, 5.0, max_bytes=len(data), max_seconds=600, max_pixels=64 * 48, field="video")
