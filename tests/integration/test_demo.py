"""`uniadapter serve` with no arguments: the shipped demo model, its sets and collections, and the
Swagger examples that answer correctly. In-process (support.asgi): the session's demo app, and apps of their own
for a restart and for the demo switched off."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from support.asgi import running_app

from uniadapter_serve.adapters.format import read_adapter_meta
from uniadapter_serve.service import demo


@pytest.fixture(scope="module")
def demo_root(demo_app):
    return demo_app.data_root


@pytest.fixture(scope="module")
def client(demo_app):
    assert demo.shipped(), "the trained demo backbone and sets must ship in model/demo/"
    with demo_app.client() as c:
        yield c


def _example(client, path):
    spec = client.get("/openapi.json").json()
    return spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["example"]


def test_shipped_sets_are_published_once_and_are_the_defaults(client):
    listed = {a["name"]: a for a in client.get("/adapters").json()["adapters"]}
    for name in demo.DEMO_SETS.values():
        assert listed[name]["version"] == read_adapter_meta(demo.SETS_DIR / name / "v1").version


def test_swagger_vqa_example_answers_what_colour_the_circle_is(client):
    body = _example(client, "/vqa")
    assert body["question"] == "what colour is the circle?"
    r = client.post("/vqa", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["answer"] == demo.example_scene().shapes[0].color
    assert out["adapter"].startswith("demo-vqa@")


def test_vqa_over_http_answers_as_the_offline_evaluation_does(client):
    """The demo images' own questions, uploaded as files the way Swagger's file picker sends them: the
    service gets right exactly what `uniadapter eval` gets right (same preprocessing, same ranking)."""
    from uniadapter_serve.adapters.datasets import QA
    from uniadapter_serve.adapters.demo.build import ANSWERS
    from uniadapter_serve.adapters.evaluation import answer_accuracy
    from uniadapter_serve.adapters.format import load_adapter_set
    from uniadapter_serve.model.loading import load_backbone
    from uniadapter_serve.model.tokenizer import load_tokenizer

    backbone = load_backbone("demo")
    tok = load_tokenizer("demo", backbone.config)
    adapter = load_adapter_set(demo.SETS_DIR / "demo-vqa" / "v1", backbone).module
    http, offline = [], []
    for item in demo.image_items(12):
        pixels = np.asarray(Image.open(io.BytesIO(item.data)).convert("RGB"))
        for question, answer in zip(item.metadata["questions"], item.metadata["answers"], strict=True):
            r = client.post("/vqa", files={"image": ("scene.png", item.data, "image/png")},
                            data={"question": question + "?"})
            assert r.status_code == 200, r.text
            http.append(r.json()["answer"] == answer)
            offline.append(answer_accuracy(backbone, tok, [QA(pixels, question, {answer: 1.0})], ANSWERS, adapter) == 1)
    assert len(http) > 50 and http == offline
    assert sum(http) / len(http) > 0.5  # far above chance (1/21)


def test_swagger_videoqa_example_answers_the_new_colour(client):
    r = client.post("/videoqa", json=_example(client, "/videoqa"))
    assert r.status_code == 200, r.text
    assert r.json()["answer"] == demo.example_clip().new_color
    assert r.json()["adapter"].startswith("demo-videoqa@")


def test_demo_collections_hold_the_held_out_media(client, demo_root):
    ref = client.get("/adapters/demo-retrieval").json()["ref"]
    for name, count, folder in ((demo.IMAGES, demo.NUM_IMAGES, "images"), (demo.VIDEOS, demo.NUM_VIDEOS, "videos")):
        stats = client.get(f"/collections/{name}").json()
        assert stats["items"] == count and stats["adapter"] == ref
        assert len(list((demo_root / "media" / "demo" / folder).iterdir())) == count


def test_text_search_finds_the_scene_a_caption_describes(client):
    """Each demo image's caption as a query: a hit is any image with the same caption."""
    items = demo.image_items()
    hits = 0
    for item in items:
        r = client.post("/retrieve", json={"query_text": item.metadata["caption"], "collection": demo.IMAGES,
                                           "top_k": 5})
        assert r.status_code == 200, r.text
        hits += any(h["metadata"]["caption"] == item.metadata["caption"] for h in r.json()["results"])
    assert hits / len(items) >= 0.8, hits


def test_swagger_retrieve_example_runs(client):
    r = client.post("/retrieve", json=_example(client, "/retrieve"))
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == 5 and all("caption" in h["metadata"] for h in results)
    assert results[0]["metadata"]["caption"] == _example(client, "/retrieve")["query_text"]


def test_video_collection_search_returns_clips(client):
    r = client.post("/retrieve", json={"query_text": "a red circle moves left", "collection": demo.VIDEOS,
                                       "top_k": 3})
    assert r.status_code == 200, r.text
    assert [h["id"].startswith("clip-") for h in r.json()["results"]] == [True] * 3


def test_restart_changes_nothing(tmp_path):
    root = tmp_path / "data"
    with running_app(root) as first:  # creates the demo sets and collections
        assert first.client().get(f"/collections/{demo.IMAGES}").json()["items"] == demo.NUM_IMAGES
    media = sorted((root / "media" / "demo").rglob("*"))
    before = {p: p.stat().st_mtime_ns for p in media}
    with running_app(root) as again, again.client() as c:
        assert c.get(f"/collections/{demo.IMAGES}").json()["items"] == demo.NUM_IMAGES
        assert c.get(f"/collections/{demo.VIDEOS}").json()["items"] == demo.NUM_VIDEOS
        for name in demo.DEMO_SETS.values():
            assert len([a for a in c.get("/adapters").json()["adapters"] if a["name"] == name]) == 1
    assert {p: p.stat().st_mtime_ns for p in media} == before


def test_demo_content_can_be_switched_off(tmp_path):
    with running_app(tmp_path / "data", demo_content=False) as srv, srv.client() as c:
        assert c.get("/collections").json() == []
        assert c.get("/adapters").json()["adapters"] == []
        body = _example(c, "/vqa")
        assert c.post("/vqa", json=body).json()["adapter"] is None  # the bare backbone
