"""`uniadapter index add`: bulk ingest of files under the media root without a server, resumable; with
`--moments`, a new video collection that cuts each video into windows."""

from __future__ import annotations

import json

import numpy as np
from support.media import video_bytes

from uniadapter_serve.model.media.video import plan_moments
from uniadapter_serve.service.cli import main
from uniadapter_serve.service.collections.sqlite_backend import SqliteBackend
from uniadapter_serve.service.collections.store import MomentSpec


def clip(seconds: int, fps: int = 2) -> bytes:
    frames = [np.full((48, 64, 3), (7 * i) % 256, np.uint8) for i in range(seconds * fps)]
    return video_bytes([], fps=fps, frames=frames, gop=2 * fps)


def test_index_add_creates_a_moment_collection_and_resumes(tmp_path, capsys):
    media = tmp_path / "media"
    (media / "lectures").mkdir(parents=True)
    (media / "lectures" / "one.mp4").write_bytes(clip(40))
    (media / "lectures" / "two.mp4").write_bytes(clip(6))
    args = ["index", "add", "--collection", "lectures", "--create", "video", "--moments", "10,5", "--backbone",
            "blip-tiny", "--data-root", str(tmp_path / "data"), "--media-root", str(media), "--quiet", "lectures"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["added"] == 2 and report["items"] == 2
    backend = SqliteBackend(tmp_path / "data" / "collections")
    try:
        store = backend.open("lectures")
        assert store.meta().moments == MomentSpec(10.0, 5.0)
        one = store.get("lectures/one.mp4")
        assert np.allclose(one.moments, plan_moments(40.0, 10.0, 5.0), atol=1e-3) and len(one.moments) == 7
        two = store.get("lectures/two.mp4")
        assert len(two.moments) == 1
        ids, vectors = store.all_vectors(0, store.meta().dim)  # one vector per moment, the item's id repeated
        assert sorted(ids.tolist()) == sorted([one.item_id] * 7 + [two.item_id])
        assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-4)
        store.close()
    finally:
        backend.close()
    assert main(args) == 0  # again: nothing to add
    again = json.loads(capsys.readouterr().out)
    assert again["added"] == 0 and again["skipped"] == 2


def test_index_add_refuses_a_bad_moments_argument(tmp_path, capsys):
    assert main(["index", "add", "--collection", "x", "--create", "video", "--moments", "ten", "--data-root",
                 str(tmp_path), "x"]) == 2
    assert "--moments: give WINDOW_S[,STRIDE_S]" in capsys.readouterr().err
