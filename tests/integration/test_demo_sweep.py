"""The served demo against its own table: fresh scenes and clips from a world seed the build never used (it
trains and evaluates on seed 0), sent through the HTTP API as a user sends them (PNG and MP4 uploads, collections
searched by caption), score what `model/demo/results.json` (and so the README) reports for the
shipped sets, per question and caption kind (side, relation, motion) and overall, within `TOLERANCE`.

The sweep has the table's sizes (`EVAL_SIZES`: VQA 300 scenes, VideoQA 300 clips, retrieval 4 galleries of 500 scenes
in families of 8), so its sampling error is the table's own. The figures checked are the overall ones and the kinds
position decides (a shape's side, a relation, a direction); those of one colour or shape depend on which colours a
world's families happen to draw, and are not. The requests go out from several threads at once, so the batcher
batches them as it would a user's."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np
import pytest

from uniadapter_serve.adapters.datasets import SPLIT_OFFSETS
from uniadapter_serve.adapters.demo.build import DEMO_ROOT, EVAL_SIZES, RETRIEVAL_GALLERIES, VIDEO_FRAMES
from uniadapter_serve.adapters.evaluation import by_kind
from uniadapter_serve.model.demo.world import World, caption_kind, question_kind
from uniadapter_serve.service import demo

SWEEP_SEED = 9_173
"""a world the build never saw (its seed is 0): other families, layouts and motions"""
TOLERANCE = 0.05
THREADS = 8
T = TypeVar("T")
R = TypeVar("R")


@pytest.fixture(scope="module")
def table() -> dict[str, Any]:
    return {task: rows["uniadapter"]["metrics"]
            for task, rows in json.loads((DEMO_ROOT / "results.json").read_text())["tasks"].items()}


@pytest.fixture(scope="module")
def client(demo_app):
    assert demo.shipped(), "the trained demo backbone and sets must ship in model/demo/"
    with demo_app.client(timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def world() -> World:
    return World(seed=SWEEP_SEED)


def fan_out(fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
    with ThreadPoolExecutor(THREADS) as pool:
        return list(pool.map(fn, items))


def check(measured: dict[str, float], table: dict[str, float], keys: Sequence[str]) -> None:
    """Every named figure of the sweep within TOLERANCE of the table's (all named in the failure)."""
    rows = {k: (round(measured[k], 3), round(table[k], 3)) for k in keys}
    off = {k: v for k, v in rows.items() if abs(v[0] - v[1]) > TOLERANCE}
    assert not off, f"sweep vs table (measured, table), beyond {TOLERANCE}: {off}; all: {rows}"


def ask(client, path: str, field: str, name: str, media: bytes, mime: str, question: str) -> str:
    r = client.post(path, files={field: (name, media, mime)}, data={"question": question + "?"})
    assert r.status_code == 200, r.text
    return str(r.json()["answer"])


def test_vqa_on_fresh_scenes_matches_the_table(client, world, table):
    """Side (left / right of a lone shape of a kind) is the question the pre-trained position decides."""
    start = SPLIT_OFFSETS["test"]
    asked = []
    for i in range(start, start + EVAL_SIZES["vqa"]):
        scene = world.scene(i)
        image = demo.png(np.asarray(world.render(scene)))
        asked += [(image, q, a) for q, a in scene.questions()]
    answers = fan_out(lambda x: ask(client, "/vqa", "image", "scene.png", x[0], "image/png", x[1]), asked)
    scores = [float(got == a) for got, (_, _, a) in zip(answers, asked, strict=True)]
    kinds = by_kind(scores, [question_kind(q) for _, q, _ in asked])
    measured = {"accuracy": float(np.mean(scores)), **{f"accuracy_{k}": v for k, v in kinds.items()}}
    assert "other" not in kinds
    check(measured, table["vqa"], ["accuracy", "accuracy_side"])


def test_videoqa_on_fresh_clips_matches_the_table(client, world, table):
    """Direction of motion is the question the pre-trained position decides; clips as the table's (4 frames)."""
    start = SPLIT_OFFSETS["test"]
    asked = []
    for i in range(start, start + EVAL_SIZES["videoqa"]):
        clip = world.clip(i, VIDEO_FRAMES)
        video = demo.mp4(world.render_clip(clip))
        asked += [(video, q, a) for q, a in clip.questions()]
    answers = fan_out(lambda x: ask(client, "/videoqa", "video", "clip.mp4", x[0], "video/mp4", x[1]), asked)
    scores = [float(got == a) for got, (_, _, a) in zip(answers, asked, strict=True)]
    kinds = by_kind(scores, [question_kind(q) for _, q, _ in asked])
    measured = {"accuracy": float(np.mean(scores)), **{f"accuracy_{k.replace(' ', '_')}": v for k, v in kinds.items()}}
    check(measured, table["videoqa"], ["accuracy", "accuracy_direction"])


def test_text_search_on_fresh_galleries_matches_the_table(client, world, table):
    """Galleries of 500 fresh scenes, each in a collection of its own, each caption a query searched as the
    Swagger example searches (ITC: the collection's embeddings in FAISS, no re-ranking; the table's "ITC only"
    figures): a hit is a scene with that caption; averaged over as many galleries as the table (one gallery scores
    anywhere in 0.55-0.69). Lone shapes' sides and two shapes' relations are the captions position decides. (ITM
    re-ranking re-encodes 16 stored images a query: 32,000 for the sweep, too slow for CI; through HTTP it was
    measured equal to the offline evaluation, hit for hit, on a fresh gallery.)"""
    size, start = EVAL_SIZES["retrieval"], SPLIT_OFFSETS["test"]
    runs = [gallery_search(client, world, f"sweep-gallery-{g}", start + g * size, size)
            for g in range(RETRIEVAL_GALLERIES)]
    measured = {key: float(np.mean([r[key] for r in runs])) for key in runs[0]}
    check(measured, table["retrieval"], ["t2i_r@1", "t2i_r@1_side", "t2i_r@1_relation"])


def gallery_search(client, world: World, name: str, first: int, size: int) -> dict[str, float]:
    scenes = [world.scene(i) for i in range(first, first + size)]
    r = client.post("/collections", json={"name": name, "kind": "image"})
    assert r.status_code == 201, r.text
    try:
        for at in range(0, len(scenes), 50):
            items = [{"id": f"scene-{at + j}", "metadata": {"caption": s.caption()},
                      "image": base64.b64encode(demo.png(np.asarray(world.render(s)))).decode()}
                     for j, s in enumerate(scenes[at:at + 50])]
            r = client.post(f"/collections/{name}/items", json={"items": items})
            assert r.status_code == 201, r.text

        def top(caption: str) -> str:
            r = client.post("/retrieve", json={"query_text": caption, "collection": name, "top_k": 1})
            assert r.status_code == 200, r.text
            return str(r.json()["results"][0]["metadata"]["caption"])

        captions = [s.caption() for s in scenes]
        hits = [float(got == c) for got, c in zip(fan_out(top, captions), captions, strict=True)]
    finally:
        assert client.delete(f"/collections/{name}").status_code == 204
    kinds = by_kind(hits, [caption_kind(c) for c in captions])
    return {"t2i_r@1": float(np.mean(hits)), **{f"t2i_r@1_{k}": v for k, v in kinds.items()}}
