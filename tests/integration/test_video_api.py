"""Video through the HTTP API in-process (support.asgi, the session's blip-tiny app): text -> video search
(frame-aware ITM re-rank), VideoQA, and no leaked descriptors in the serving process after many bad uploads."""

from __future__ import annotations

import base64
import os

import pytest
from support.media import audio_only_bytes, video_bytes

CLIPS = {
    "reds": video_bytes([(230, 20, 20)] * 8),
    "blues": video_bytes([(20, 20, 230)] * 8, codec="libvpx-vp9", fmt="webm"),
    "flash": video_bytes([(230, 20, 20), (20, 230, 20)] * 5, codec="mjpeg", fmt="avi"),
}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture
def client(tiny_client):
    return tiny_client


@pytest.fixture
def admin(tiny_admin):
    return tiny_admin


@pytest.fixture
def refs(tiny_app):
    return tiny_app.refs


def test_text_to_video_search_with_frame_aware_rerank(client, admin, refs):
    r = admin.post("/collections", json={"name": "clips", "kind": "video", "adapter": "ret-video"})
    assert r.status_code == 201, r.text
    r = admin.post("/collections/clips/items", json={"items": [{"id": k, "video": b64(v)} for k, v in CLIPS.items()]})
    assert r.status_code == 201, r.text
    r = client.post("/retrieve", json={"query_text": "a red square", "collection": "clips", "top_k": 3,
                                       "rerank_k": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["adapter"] == refs["ret-video"] and len(body["results"]) == 3
    assert sorted(h["id"] for h in body["results"]) == sorted(CLIPS)
    assert all(0 <= h["itm_score"] <= 1 for h in body["results"])
    plain = client.post("/retrieve", json={"query_text": "a red square", "collection": "clips", "top_k": 3}).json()
    assert {h["id"]: round(h["itc_score"], 5) for h in plain["results"]} == {
        h["id"]: round(h["itc_score"], 5) for h in body["results"]}


def test_videoqa_frame_count_and_formats(client):
    for name, clip in CLIPS.items():
        r = client.post("/videoqa", json={"video": b64(clip), "question": "what colour is it?", "adapter": "video-a"})
        assert r.status_code == 200, (name, r.text)
    r = client.post("/videoqa", json={"video": b64(CLIPS["reds"]), "question": "what colour is it?",
                                      "adapter": "video-a", "num_frames": 3})
    assert r.status_code == 409 and "temporal embedding for 4 frames, got 3" in r.json()["detail"]
    r = client.post("/videoqa", json={"video": b64(CLIPS["reds"]), "question": "what colour is it?",
                                      "adapter": "vqa-a", "num_frames": 3})  # no temporal embedding: any T
    assert r.status_code == 200, r.text


def test_no_descriptor_leak_after_bad_uploads(client):
    fd_dir = "/proc/self/fd"  # the app runs in this process
    client.get("/healthz")  # the keep-alive connection exists before counting
    before = len(os.listdir(fd_dir))
    bad = [b"not a video at all" * 10, audio_only_bytes(), CLIPS["reds"][: len(CLIPS["reds"]) // 3], b""]
    for i in range(50):
        r = client.post("/videoqa", files={"video": ("x.mp4", bad[i % 4], "video/mp4")},
                        data={"question": "what?", "adapter": "video-a"})
        assert r.status_code in (400, 415), r.text
    assert len(os.listdir(fd_dir)) <= before + 2  # allow for the process's own sockets/log rotation
