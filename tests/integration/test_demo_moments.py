"""The demo's demo-long-videos collection over HTTP: generated 60-120 s videos whose events happen at known
times, indexed as moments (8 s every 4 s); searching an event's caption finds a moment overlapping its true
time. In-process (support.asgi): the session's demo app."""

from __future__ import annotations

import pytest

from uniadapter_serve.adapters.evaluation import temporal_iou
from uniadapter_serve.service import demo

WITHIN_VIDEO_R1 = 0.8
"""results.json's moment R@1 at IoU 0.5 is 0.96 over 888 events of 100 held-out videos; the demo's 3 videos hold
~29 events, so one miss moves the fraction by 0.035"""


@pytest.fixture(scope="module")
def client(demo_app):
    with demo_app.client() as c:
        yield c


@pytest.fixture(scope="module")
def items(client):
    stats = client.get(f"/collections/{demo.LONG_VIDEOS}").json()
    assert stats["kind"] == "video" and stats["items"] == demo.NUM_LONG_VIDEOS
    assert stats["moments"]["window_s"] == demo.MOMENT_WINDOW_S and stats["moments"]["stride_s"] == demo.MOMENT_STRIDE_S
    out = {}
    for i in range(demo.NUM_LONG_VIDEOS):
        item_id = f"long-{i:04d}"
        r = client.get(f"/collections/{demo.LONG_VIDEOS}/items/{item_id}")
        assert r.status_code == 200, r.text
        out[item_id] = r.json()
    return out


def test_each_video_is_its_events_back_to_back(items, demo_app):
    for i, (item_id, item) in enumerate(items.items()):
        video = demo.long_video(i)
        events = item["metadata"]["events"]
        assert events == [{"caption": e.caption(), "start_s": e.start_s, "end_s": e.end_s} for e in video.events]
        assert 60 <= video.duration_s <= 120 and item["metadata"]["video"] == item_id
        moments = [(m["start_s"], m["end_s"]) for m in item["moments"]]
        assert moments[0] == (0.0, demo.MOMENT_WINDOW_S)
        assert moments[-1][1] == pytest.approx(video.duration_s, abs=0.5)  # to the end (give or take a frame)
        assert (demo_app.data_root / "media" / "demo" / "long-videos" / f"{item_id}.mp4").is_file()


def test_searching_an_event_finds_a_moment_at_its_time(client, items):
    """Each event's caption, searched within its video (a metadata filter, every moment ranked): the top
    moment overlaps the event's true time with IoU >= 0.5 for most events."""
    found, total = 0, 0
    misses = []
    for item_id, item in items.items():
        for event in item["metadata"]["events"]:
            r = client.post("/retrieve", json={"query_text": event["caption"], "collection": demo.LONG_VIDEOS,
                                               "top_k": 1, "group_by_item": False, "rerank_k": 0,
                                               "filter": {"metadata": {"video": item_id}}})
            assert r.status_code == 200, r.text
            (hit,) = r.json()["results"]
            assert hit["id"] == item_id and hit["start_s"] < hit["end_s"]
            assert (hit["start_s"], hit["end_s"]) == tuple(item["moments"][hit["moment"]].values())
            iou = temporal_iou((hit["start_s"], hit["end_s"]), (event["start_s"], event["end_s"]))
            found += iou >= 0.5
            total += 1
            if iou < 0.5:
                misses.append((event["caption"], event["start_s"], event["end_s"], hit["start_s"], hit["end_s"]))
    assert total >= 20
    assert found / total >= WITHIN_VIDEO_R1, misses


def test_the_best_moment_per_video_by_default(client, items):
    event = items["long-0000"]["metadata"]["events"][1]
    r = client.post("/retrieve", json={"query_text": event["caption"], "collection": demo.LONG_VIDEOS, "top_k": 10})
    assert r.status_code == 200, r.text
    hits = r.json()["results"]
    assert sorted(h["id"] for h in hits) == sorted(items)  # one hit per video, every video
    assert all(h["start_s"] is not None and h["end_s"] is not None for h in hits)
