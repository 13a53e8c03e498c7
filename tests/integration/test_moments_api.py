"""Moments of long videos through the HTTP API in-process (support.asgi, the session's blip-tiny app): a moment
collection cuts each video into windows, /retrieve returns moments with their times (each video's best, or
every one), a query made of a moment's own frames finds that moment, /videoqa asks about a moment or a span,
and bad windows, spans and moments are 4xx naming the field."""

from __future__ import annotations

import base64

import numpy as np
import pytest
from support.media import video_bytes
from support.waiting import until

from uniadapter_serve.model.media.video import plan_moments, sample_times

FPS = 2
SIZE = (64, 48)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def frame_at(t: float) -> np.ndarray:
    """A frame that says when it is: colour from the time, a bar at the second's place."""
    w, h = SIZE
    pixels = np.zeros((h, w, 3), np.uint8)
    pixels[:] = (int(40 + 5 * t) % 256, int(200 - 4 * t) % 256, int(90 + 11 * t) % 256)
    x = int(t * 7) % (w - 6)
    pixels[:, x:x + 6] = 255
    return pixels


def long_video(seconds: float) -> bytes:
    n = int(seconds * FPS)
    return video_bytes([], fps=FPS, size=SIZE, gop=2 * FPS, frames=[frame_at(i / FPS) for i in range(n)])


LONG = long_video(40)
SHORT = long_video(5)


@pytest.fixture
def client(tiny_client):
    return tiny_client


@pytest.fixture
def admin(tiny_admin):
    return tiny_admin


@pytest.fixture
def moments(admin, request):
    name = f"moments-{request.node.name[5:30].replace('_', '-')}"
    r = admin.post("/collections", json={"name": name, "kind": "video", "adapter": "ret-video",
                                         "moments": {"window_s": 8, "stride_s": 4}})
    assert r.status_code == 201, r.text
    assert r.json()["moments"] == {"window_s": 8.0, "stride_s": 4.0, "indexed": 0}
    r = admin.post(f"/collections/{name}/items", json={"items": [
        {"id": "long", "video": b64(LONG), "metadata": {"name": "long"}},
        {"id": "short", "video": b64(SHORT), "metadata": {"name": "short"}}]})
    assert r.status_code == 201, r.text
    yield name
    admin.delete(f"/collections/{name}")


def spans_of(client, collection: str, item: str) -> list[tuple[float, float]]:
    r = client.get(f"/collections/{collection}/items/{item}")
    assert r.status_code == 200, r.text
    return [(m["start_s"], m["end_s"]) for m in r.json()["moments"]]


def test_videos_are_cut_into_the_planned_moments(client, moments):
    long, short = spans_of(client, moments, "long"), spans_of(client, moments, "short")
    planned = plan_moments(40.0, 8.0, 4.0)
    assert len(long) == len(planned) == 9 and long[0] == (0.0, 8.0)
    assert np.allclose(long, planned, atol=1e-3)
    assert len(short) == 1 and np.allclose(short, [(0.0, 5.0)], atol=1e-3)  # no longer than a window: one moment
    stats = client.get(f"/collections/{moments}").json()
    assert stats["items"] == 2 and stats["indexed"] == 2 and stats["moments"]["indexed"] == 10


def test_retrieve_returns_moments_best_per_video_or_all(client, moments):
    every = client.post("/retrieve", json={"query_text": "a white bar", "collection": moments, "top_k": 20,
                                           "group_by_item": False})
    assert every.status_code == 200, every.text
    hits = every.json()["results"]
    assert len(hits) == 10 and [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    spans = {"long": spans_of(client, moments, "long"), "short": spans_of(client, moments, "short")}
    assert sorted((h["id"], h["moment"]) for h in hits) == sorted(
        [("long", m) for m in range(9)] + [("short", 0)])
    for h in hits:
        assert (h["start_s"], h["end_s"]) == pytest.approx(spans[h["id"]][h["moment"]], abs=1e-3)
        assert h["media_url"].endswith(f"/media#t={h['start_s']:.3f},{h['end_s']:.3f}")
        assert f"thumbnail?t={(h['start_s'] + h['end_s']) / 2:.3f}" in h["thumbnail_url"]
    grouped = client.post("/retrieve", json={"query_text": "a white bar", "collection": moments, "top_k": 5}).json()
    best = {}
    for h in hits:
        best.setdefault(h["id"], h)
    assert [(h["id"], h["moment"]) for h in grouped["results"]] == [
        (h["id"], h["moment"]) for h in sorted(best.values(), key=lambda h: -h["score"])]
    one = client.post("/retrieve", json={"query_text": "a white bar", "collection": moments, "top_k": 1,
                                         "group_by_item": False, "filter": {"metadata": {"name": "long"}}}).json()
    assert [(h["id"], h["moment"]) for h in one["results"]] == [
        next((h["id"], h["moment"]) for h in hits if h["id"] == "long")]


def test_a_query_of_a_moments_own_frames_finds_that_moment(client, moments):
    spans = spans_of(client, moments, "long")
    for m in (2, 5):
        lo, hi = spans[m]
        instants = sample_times(lo, hi - lo, 4)  # ret-video samples 4 frames
        query = video_bytes([], fps=FPS, size=SIZE, frames=[frame_at(np.floor(t * FPS) / FPS) for t in instants])
        r = client.post("/retrieve", json={"query_video": b64(query), "collection": moments, "top_k": 3,
                                           "group_by_item": False})
        assert r.status_code == 200, r.text
        top = r.json()["results"][0]
        assert (top["id"], top["moment"]) == ("long", m) and top["itc_score"] > 0.999


def test_rerank_scores_the_moments_own_frames(client, moments):
    r = client.post("/retrieve", json={"query_text": "a white bar", "collection": moments, "top_k": 4,
                                       "rerank_k": 4, "group_by_item": False})
    assert r.status_code == 200, r.text
    hits = r.json()["results"]
    assert len(hits) == 4 and all(0 <= h["itm_score"] <= 1 for h in hits)
    assert len({round(h["itm_score"], 6) for h in hits}) > 1  # each moment's frames, not the whole video's


def test_videoqa_on_a_moment_equals_videoqa_on_its_span(client, moments):
    spans = spans_of(client, moments, "long")
    ask = {"question": "what colour is it?", "adapter": "video-a", "top_k": 3}
    by_moment = client.post("/videoqa", json={**ask, "collection": moments, "item": "long", "moment": 6})
    assert by_moment.status_code == 200, by_moment.text
    lo, hi = spans[6]
    by_span = client.post("/videoqa", json={**ask, "collection": moments, "item": "long", "start_s": lo,
                                            "end_s": hi})
    assert by_span.json() == by_moment.json()
    whole = client.post("/videoqa", json={**ask, "collection": moments, "item": "long"})
    first = client.post("/videoqa", json={**ask, "collection": moments, "item": "long", "moment": 0})
    assert whole.status_code == first.status_code == 200
    assert whole.json()["alternatives"] != first.json()["alternatives"]  # other frames, other scores


def test_videoqa_on_a_span_of_an_upload(client):
    clip = long_video(20)
    ask = {"question": "what colour is it?", "adapter": "video-a", "video": b64(clip)}
    part = client.post("/videoqa", json={**ask, "start_s": 10})
    assert part.status_code == 200, part.text
    same = client.post("/videoqa", json={**ask, "start_s": 10, "end_s": 20})
    assert same.json() == part.json()
    assert client.post("/videoqa", json=ask).json()["alternatives"] != part.json()["alternatives"]


@pytest.mark.parametrize(("body", "status", "names"), [
    ({"moments": {"stride_s": 0}}, 422, "stride_s"),
    ({"moments": {"window_s": -1}}, 422, "window_s"),
    ({"moments": {"window_s": "long"}}, 422, "window_s"),
    ({"moments": {"window_s": 7200}}, 422, "moments.window_s"),
    ({"moments": {"window_s": 8, "stride_s": 0.001}}, 422, "moments.stride_s"),
    ({"moments": {"window_s": 5e-324}}, 422, "moments.window_s"),  # found by the fuzzer: it once planned 10^327
    ({"moments": {"window_s": 1, "stride_s": 1}}, 422, "moments.window_s"),
    ({"moments": {"window_s": 8, "size": 3}}, 422, "size"),
    ({"kind": "image", "moments": {}}, 422, "moments"),
])
def test_bad_moment_specs_are_refused(admin, body, status, names):
    r = admin.post("/collections", json={"name": "bad-moments", "kind": "video", "adapter": "ret-video", **body})
    assert r.status_code == status, r.text
    assert names in r.text
    assert admin.get("/collections/bad-moments").status_code == 404


def test_a_stride_longer_than_the_window_leaves_gaps(client, admin):
    r = admin.post("/collections", json={"name": "sparse-moments", "kind": "video", "adapter": "ret-video",
                                         "moments": {"window_s": 4, "stride_s": 15}})
    try:
        assert r.status_code == 201, r.text
        assert admin.post("/collections/sparse-moments/items", json={"items": [{"id": "long", "video": b64(LONG)}]}
                          ).status_code == 201
        assert spans_of(client, "sparse-moments", "long") == [(0.0, 4.0), (15.0, 19.0), (30.0, 34.0), (36.0, 40.0)]
    finally:
        admin.delete("/collections/sparse-moments")


def test_the_schema_says_the_moment_limits(client):
    """The OpenAPI schema carries this server's moment limits, so a body it admits is never refused."""
    spec = client.get("/openapi.json").json()["components"]["schemas"]
    moments = spec["MomentsIn"]["properties"]
    assert moments["window_s"]["maximum"] == 3600.0
    assert moments["stride_s"]["minimum"] == pytest.approx(3600.0 / 2046)
    assert {"required": ["kind"], "properties": {"kind": {"const": "video"}}} in spec["CollectionCreate"]["anyOf"]


def test_defaults_come_from_the_settings(admin):
    r = admin.post("/collections", json={"name": "default-moments", "kind": "video", "adapter": "ret-video",
                                         "moments": {}})
    try:
        assert r.status_code == 201, r.text
        assert r.json()["moments"] == {"window_s": 8.0, "stride_s": 4.0, "indexed": 0}
    finally:
        admin.delete("/collections/default-moments")
    r = admin.post("/collections", json={"name": "short-moments", "kind": "video", "adapter": "ret-video",
                                         "moments": {"window_s": 2}})
    try:  # the default stride is never longer than the window asked for
        assert r.status_code == 201 and r.json()["moments"] == {"window_s": 2.0, "stride_s": 2.0, "indexed": 0}
    finally:
        admin.delete("/collections/short-moments")


def test_bad_spans_and_moments_are_refused(client, admin, moments):
    ask = {"question": "what colour is it?", "adapter": "video-a", "collection": moments, "item": "long"}
    cases = [
        ({"start_s": 12, "end_s": 12}, 422, "start_s"),
        ({"start_s": 20, "end_s": 10}, 422, "start_s"),
        ({"start_s": 10, "end_s": 90}, 422, "end_s: 90 s is past the end of the video"),
        ({"start_s": 45}, 422, "start_s: 45 s is at or past the end"),
        ({"start_s": -1}, 422, "start_s"),
        ({"moment": 9}, 422, "moment: item 'long' has 9 moments"),
        ({"moment": -1}, 422, "moment"),
        ({"moment": 1, "start_s": 3}, 422, "either a moment or start_s"),
        ({"item": "nope"}, 404, "nope"),
        ({"item": "lo\u0000ng"}, 404, "no NUL"),  # PostgreSQL text cannot hold one: never reaches the query
    ]
    for extra, status, names in cases:
        r = client.post("/videoqa", json={**ask, **extra})
        assert r.status_code == status, (extra, r.text)
        assert names in r.text, (extra, r.text)
    r = client.post("/videoqa", json={"question": "what?", "adapter": "video-a", "moment": 1})
    assert r.status_code == 422 and "video" in r.text
    r = client.post("/videoqa", json={"question": "what?", "adapter": "video-a", "video": b64(SHORT),
                                      "collection": moments, "item": "long"})
    assert r.status_code == 422 and "exactly one of video" in r.text
    plain = admin.post("/collections", json={"name": "plain-videos", "kind": "video", "adapter": "ret-video"})
    assert plain.status_code == 201, plain.text
    try:
        assert admin.post("/collections/plain-videos/items", json={"items": [{"id": "s", "video": b64(SHORT)}]}
                          ).status_code == 201
        r = client.post("/videoqa", json={**ask, "collection": "plain-videos", "item": "s", "moment": 0})
        assert r.status_code == 422 and "does not index moments" in r.text
        r = client.post("/videoqa", json={**ask, "collection": "plain-videos", "item": "s", "start_s": 1, "end_s": 3})
        assert r.status_code == 200, r.text
    finally:
        admin.delete("/collections/plain-videos")


def test_moment_collections_take_videos_longer_than_max_video_seconds(client, moments):
    """The session's MAX_VIDEO_SECONDS is 30: the 40 s video is refused as an upload, served from the collection."""
    r = client.post("/videoqa", json={"question": "what?", "adapter": "video-a", "video": b64(LONG)})
    assert r.status_code == 413 and "over the limit of 30 s" in r.text
    r = client.post("/videoqa", json={"question": "what?", "adapter": "video-a", "collection": moments,
                                      "item": "long", "moment": 8})
    assert r.status_code == 200, r.text


def test_deleting_a_video_removes_its_moments(client, admin, moments):
    assert admin.delete(f"/collections/{moments}/items/long").status_code == 204
    r = client.post("/retrieve", json={"query_text": "a white bar", "collection": moments, "top_k": 20,
                                       "group_by_item": False})
    assert [(h["id"], h["moment"]) for h in r.json()["results"]] == [("short", 0)]
    assert client.get(f"/collections/{moments}").json()["moments"]["indexed"] == 1


def test_reindex_embeds_every_moment_again_at_its_stored_times(client, admin, moments):
    before = client.post("/retrieve", json={"query_text": "a white bar", "collection": moments, "top_k": 20,
                                            "group_by_item": False}).json()["results"]
    r = admin.post(f"/collections/{moments}/reindex", json={"adapter": "none"})
    assert r.status_code == 202, r.text
    until(lambda: client.get(f"/collections/{moments}").json()["adapter"] == "none", "the re-index", 60)
    stats = client.get(f"/collections/{moments}").json()
    assert stats["generation"] == 1 and stats["moments"]["indexed"] == 10
    after = client.post("/retrieve", json={"query_text": "a white bar", "collection": moments, "top_k": 20,
                                           "group_by_item": False}).json()["results"]
    assert {(h["id"], h["moment"], h["start_s"], h["end_s"]) for h in after} == {
        (h["id"], h["moment"], h["start_s"], h["end_s"]) for h in before}
    assert {(h["id"], h["moment"]): round(h["itc_score"], 4) for h in after} != {
        (h["id"], h["moment"]): round(h["itc_score"], 4) for h in before}  # another model's embeddings


def test_an_image_query_searches_moments_too(client, moments):
    from support.media import image_bytes

    r = client.post("/retrieve", json={"query_image": b64(image_bytes()), "collection": moments, "top_k": 3,
                                       "group_by_item": False})
    assert r.status_code == 200, r.text
    hits = r.json()["results"]
    assert len(hits) == 3 and all(h["moment"] is not None and h["end_s"] > h["start_s"] for h in hits)
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
