"""The demo world's long videos (timed events) and moment retrieval on them: the generator keeps its events'
times exactly, and the shipped demo-retrieval set finds events with 8 s / 4 s windows as results.json says."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from uniadapter_serve.adapters.evaluation import (
    TimedEvent,
    TimedVideo,
    demo_timed_videos,
    long_video_recall,
    moment_recall,
    temporal_iou,
    window_frames,
)
from uniadapter_serve.adapters.format import load_adapter_set
from uniadapter_serve.model.demo.shipped import DEMO_ROOT, SET_NAMES
from uniadapter_serve.model.demo.world import COLORS, EVENT_S, LONG_VIDEO_S, World
from uniadapter_serve.model.loading import load_backbone
from uniadapter_serve.model.media.video import MomentDecoder, plan_moments
from uniadapter_serve.model.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def world():
    return World(seed=0)


def test_events_tile_the_video_on_frame_boundaries(world):
    for fps in (2, 4):
        for index in range(2_000_000, 2_000_030):
            video = world.long_video(index, fps=fps)
            assert LONG_VIDEO_S[0] <= video.duration_s < LONG_VIDEO_S[1]
            assert video.events[0].start_s == 0.0
            for a, b in zip(video.events, video.events[1:], strict=False):
                assert a.end_s == b.start_s  # back to back
            for e in video.events:
                assert EVENT_S[0] <= e.end_s - e.start_s <= EVENT_S[1]
                assert e.start_s * fps == round(e.start_s * fps) and e.end_s * fps == round(e.end_s * fps)
            assert video.num_frames == video.duration_s * fps


def test_a_caption_names_one_event_of_its_video(world):
    for index in range(2_000_000, 2_000_050):
        video = world.long_video(index)
        phrases = [s.phrase() for e in video.events for s in e.scene.shapes]
        assert len(phrases) == len(set(phrases))  # no shape of one colour twice in a video
        for e in video.events:
            assert len({s.shape for s in e.scene.shapes}) == len({s.color for s in e.scene.shapes}) \
                == len(e.scene.shapes)


def test_deterministic_from_seed_and_index(world):
    a, b = world.long_video(2_000_007), World(seed=0).long_video(2_000_007)
    assert a == b
    assert a != world.long_video(2_000_008) and a != World(seed=1).long_video(2_000_007)
    frames_a, frames_b = world.render_long_video(a), World(seed=0).render_long_video(b)
    assert len(frames_a) == a.num_frames and all(np.array_equal(x, y) for x, y in zip(frames_a, frames_b,
                                                                                         strict=True))


def test_frames_show_the_event_of_their_time(world):
    """Each frame is its event's scene at that instant: the shapes keep their side and size (the caption stays
    true while they bob), and each shape's colour is at its centre."""
    video = world.long_video(2_000_003)
    frames = world.render_long_video(video)
    size = world.size
    for k, pixels in enumerate(frames):
        t = k / video.fps
        event = video.event_at(t)
        scene = video.scene_at_frame(k)
        assert np.array_equal(pixels, np.asarray(world.render(event.scene_at(t))))
        assert scene.caption() == event.caption()
        for s in scene.shapes:
            r = 0.13 if s.size == "small" else 0.2
            assert r <= s.y <= 1 - r
            centre = pixels[min(size - 1, int(s.y * size)), min(size - 1, int(s.x * size))].astype(int)
            assert np.abs(centre - np.array(COLORS[s.color])).max() < 30
    boundary = round(video.events[1].start_s * video.fps)
    assert not np.array_equal(frames[boundary - 1], frames[boundary])
    with pytest.raises(ValueError):
        video.event_at(video.duration_s)


def test_some_window_reaches_iou_half_on_every_event(world):
    for index in range(2_000_000, 2_000_040):
        video = world.long_video(index)
        spans = plan_moments(video.duration_s, 8.0, 4.0)
        for e in video.events:
            assert max(temporal_iou(s, (e.start_s, e.end_s)) for s in spans) >= 0.5


def test_offline_windows_sample_the_frames_the_service_decodes(world):
    """window_frames picks, for every instant, the frame MomentDecoder picks from the encoded MP4."""
    from uniadapter_serve.service.demo import mp4

    video = world.long_video(2_000_001)
    frames = world.render_long_video(video)
    timed = TimedVideo(frames, video.fps, [])
    data = mp4(frames, fps=video.fps)
    with MomentDecoder(data, num_frames=8, size=world.size, max_bytes=len(data) + 1, max_seconds=600.0,
                       max_pixels=world.size ** 2, window_s=8.0, stride_s=4.0) as decoder:
        assert decoder.spans == plan_moments(timed.duration_s, 8.0, 4.0)
        decoded = [clip for chunk in decoder.chunks() for clip in chunk]  # (8, 3, S, S) uint8 each
        times = decoder.frame_times
    for span, clip, picked in zip(decoder.spans, decoded, times, strict=True):
        ours = window_frames(timed, span)
        assert [round(t * video.fps) for t in picked] == [
            next(k for k, f in enumerate(frames) if f is chosen) for chosen in ours]
        diff = np.abs(clip.permute(0, 2, 3, 1).numpy().astype(int) - np.stack(ours).astype(int))
        assert diff.mean() < 3  # near-lossless H.264


def test_moment_recall_counts_by_iou_and_by_video():
    """Two videos of two moments each, queries that hit, miss by IoU, and lose to the other video."""
    feats = [torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.7, 0.7], [-1.0, 0.0]])]
    spans = [[(0.0, 8.0), (4.0, 12.0)], [(0.0, 8.0), (2.0, 10.0)]]
    queries = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    out = moment_recall(feats, spans, queries, [0, 0, 0], [(0.0, 9.0), (0.0, 6.0), (4.0, 12.0)])
    # q0: best in video 0 is (0, 8), IoU 8/9: hit, corpus-wide too. q1: (4, 12) against (0, 6): IoU 2/12, miss.
    # q2: within video 0 (4, 12) exact: hit; corpus-wide video 1's (0, 8) scores 0.98 > 0.8: miss.
    assert out == {"moment_r@1_iou0.5": pytest.approx(2 / 3), "corpus_moment_r@1_iou0.5": pytest.approx(1 / 3),
                   "oracle_iou0.5": 1.0}
    assert temporal_iou((0.0, 4.0), (4.0, 8.0)) == 0.0 and temporal_iou((1.0, 3.0), (0.0, 4.0)) == 0.5


@pytest.fixture(scope="module")
def recorded():
    return json.loads((DEMO_ROOT / "results.json").read_text())["moment_retrieval"]


def test_the_shipped_retrieval_set_finds_events_in_fresh_long_videos(world, recorded):
    """Recomputed on 8 long videos no figure was measured on: within a video, the top window of each event's
    caption overlaps the event with IoU >= 0.5 about as often as results.json records over 100 videos."""
    backbone = load_backbone("demo")
    tok = load_tokenizer("demo", backbone.config)
    adapter = load_adapter_set(DEMO_ROOT / "adapters" / SET_NAMES["retrieval"] / "v1", backbone).module
    videos = demo_timed_videos(world, 8, first=2_100_000, fps=recorded["fps"])
    out = long_video_recall(backbone, tok, videos, adapter, recorded["window_s"], recorded["stride_s"])
    assert out["queries"] >= 50 and out["oracle_iou0.5"] == 1.0
    measured = recorded["metrics"]["moment_r@1_iou0.5"]
    assert out["moment_r@1_iou0.5"] >= measured - 0.1
    assert out["moment_r@1_iou0.5"] >= recorded["backbone_only"]["moment_r@1_iou0.5"] + 0.2  # the set matters
    assert 0.3 <= out["corpus_moment_r@1_iou0.5"] <= out["moment_r@1_iou0.5"]
    assert not math.isnan(out["moments"])


def test_timed_video_duration_is_its_frames():
    video = TimedVideo([np.full((4, 4, 3), k, np.uint8) for k in range(5)], 2, [TimedEvent("x", 0.0, 2.5)])
    assert video.duration_s == 2.5
    assert [int(f[0, 0, 0]) for f in window_frames(video, (0.0, 2.5), 5)] == [0, 1, 2, 3, 4]
    assert [int(f[0, 0, 0]) for f in window_frames(video, (0.0, 2.5), 2)] == [1, 3]  # at 0.625 s and 1.875 s
