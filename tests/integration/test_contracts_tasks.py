"""The task routes' contracts in-process (support.asgi: lifespan on, the shipped demo model, no subprocess):
answers the demo model must get right on rendered scenes and encoded clips, scores in range and in order, the
exact adapter version named, both body encodings, and every answer checked against the app's own OpenAPI."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image
from support.asgi import openapi_validator
from support.media import image_bytes, video_bytes

from uniadapter_serve.adapters.format import read_adapter_meta
from uniadapter_serve.model.demo.world import Scene, Shape, World
from uniadapter_serve.service import demo

SPECS = [("square", "red"), ("circle", "blue"), ("triangle", "green"), ("star", "yellow"), ("circle", "orange")]
CAPTIONS = [f"a large {color} {shape} on the left" for shape, color in SPECS]
REF = {task: read_adapter_meta(demo.SETS_DIR / name / "v1").ref for task, name in demo.DEMO_SETS.items()}
"""task -> the exact shipped version (name@version) the demo app must name in its answers"""


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def scene_png(shape: str, color: str) -> bytes:
    """One large shape on the left of a white demo-world scene, as the demo model was trained on."""
    buf = io.BytesIO()
    World(seed=0).render(Scene([Shape(shape, color, "large", 0.3, 0.5)], "white")).save(buf, "PNG")
    return buf.getvalue()


SCENES = [scene_png(shape, color) for shape, color in SPECS]


@pytest.fixture(scope="module")
def client(demo_app):
    with demo_app.client() as c:
        yield c


@pytest.fixture(scope="module")
def spec(client):
    return client.get("/openapi.json").json()


def valid(spec, path: str, response, status: int = 200):
    """The response's JSON, after checking its status and that it matches `path`'s schema for that status."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    openapi_validator(spec, path, "post", str(status)).validate(body)
    return body


def check_ranked(body: dict, top_k: int) -> None:
    scores = [a["score"] for a in body["alternatives"]]
    assert len(scores) == top_k and len({a["answer"] for a in body["alternatives"]}) == top_k
    assert scores == sorted(scores, reverse=True) and all(s <= 0 for s in scores)  # log-likelihoods
    assert body["answer"] == body["alternatives"][0]["answer"] and body["score"] == scores[0]


@pytest.mark.parametrize(("index", "question", "want"), [
    *((i, f"what colour is the {shape}?", color) for i, (shape, color) in enumerate(SPECS)),
    *((i, f"what shape is {color}?", shape) for i, (shape, color) in enumerate(SPECS)),
    (0, "how many shapes are there?", "one"),
])
def test_vqa_answers_the_rendered_scene_with_ranked_alternatives(client, spec, index, question, want):
    body = valid(spec, "/vqa", client.post("/vqa", json={"image": b64(SCENES[index]), "question": question,
                                                         "top_k": 4}))
    assert body["answer"] == want and body["mode"] == "rank" and body["adapter"] == REF["vqa"]
    check_ranked(body, 4)
    # a clear winner, not a coin toss: at least e^0.5 = 1.6x as likely as the runner-up (the shipped set's closest
    # here is the count of a lone shape, "one" over "two" by 0.63)
    assert body["score"] > body["alternatives"][1]["score"] + 0.5


def test_vqa_multipart_and_exact_ref_agree_with_json(client, spec):
    question = "what colour is the triangle?"
    by_json = valid(spec, "/vqa", client.post("/vqa", json={"image": b64(SCENES[2]), "question": question}))
    by_form = valid(spec, "/vqa", client.post("/vqa", files={"image": ("scene.png", SCENES[2], "image/png")},
                                              data={"question": question}))
    by_ref = valid(spec, "/vqa", client.post("/vqa", json={"image": b64(SCENES[2]), "question": question,
                                                           "adapter": REF["vqa"]}))
    assert by_json["adapter"] == by_form["adapter"] == by_ref["adapter"] == REF["vqa"]
    check_ranked(by_json, 3)  # the default top_k
    for other in (by_form, by_ref):
        assert [a["answer"] for a in other["alternatives"]] == [a["answer"] for a in by_json["alternatives"]]
        assert abs(other["score"] - by_json["score"]) < 1e-4


def test_vqa_generate_and_the_bare_backbone(client, spec):
    body = {"image": b64(SCENES[0]), "question": "what colour is the square?"}
    generated = valid(spec, "/vqa", client.post("/vqa", json=body | {"mode": "generate", "max_answer_length": 3}))
    assert generated["mode"] == "generate" and generated["adapter"] == REF["vqa"]
    assert generated["answer"] == "red" and len(generated["alternatives"]) == 1
    beams = valid(spec, "/vqa", client.post("/vqa", json=body | {"mode": "generate", "num_beams": 3, "top_k": 2}))
    assert len(beams["alternatives"]) == 2 and beams["answer"] == beams["alternatives"][0]["answer"]
    bare = valid(spec, "/vqa", client.post("/vqa", json=body | {"adapter": "none"}))
    assert bare["adapter"] is None and abs(bare["score"] - client.post("/vqa", json=body).json()["score"]) > 1e-3


def test_vqa_answer_carries_server_timing(client):
    r = client.post("/vqa", json={"image": b64(image_bytes()), "question": "what colour is the square?"})
    assert r.status_code == 200
    phases = dict(part.strip().split(";dur=") for part in r.headers["server-timing"].split(","))
    assert set(phases) == {"decode", "queue", "compute", "total"}
    assert all(0 <= float(phases[p]) <= float(phases["total"]) for p in ("decode", "queue", "compute"))


def clip_frames() -> list[np.ndarray]:
    """A demo-world square that turns from red to blue halfway, on gray."""
    world = World(seed=0)
    return [np.asarray(world.render(Scene([Shape("square", color, "large", 0.5, 0.5)], "gray")))
            for color in ["red"] * 4 + ["blue"] * 4]


ENCODERS = {  # name -> (encode frames, file name, content type)
    "mjpeg-avi": (lambda f: video_bytes([], codec="mjpeg", fmt="avi", frames=f), "clip.avi", "video/x-msvideo"),
    "ffv1-avi": (lambda f: video_bytes([], codec="ffv1", fmt="avi", frames=f), "clip.avi", "video/x-msvideo"),
    "h264-mp4": (demo.mp4, "clip.mp4", "video/mp4"),
}


@pytest.mark.parametrize("encoder", list(ENCODERS))
def test_videoqa_reads_encoded_clips_of_each_container(client, spec, encoder):
    encode, filename, content_type = ENCODERS[encoder]
    clip = encode(clip_frames())
    for question, want in (("what colour does the square become?", "blue"),
                           ("what colour is the square at first?", "red")):
        by_form = valid(spec, "/videoqa", client.post("/videoqa", files={"video": (filename, clip, content_type)},
                                                      data={"question": question, "top_k": "3"}))
        assert by_form["adapter"] == REF["videoqa"] and by_form["mode"] == "rank"
        assert by_form["answer"] == want
        check_ranked(by_form, 3)
        by_json = valid(spec, "/videoqa", client.post("/videoqa", json={"video": b64(clip), "question": question,
                                                                        "top_k": 3}))
        assert by_json["answer"] == want and abs(by_json["score"] - by_form["score"]) < 1e-4


def test_videoqa_frames_option_must_fit_the_sets_temporal_embedding(client, spec):
    """demo-videoqa has a temporal embedding for 4 frames: 4 is its default, another count a conflict (409)."""
    body = {"video": b64(video_bytes([(220, 40, 40)] * 4 + [(50, 80, 230)] * 4, size=(96, 96), fps=4)),
            "question": "what colour does the square become?"}
    default = valid(spec, "/videoqa", client.post("/videoqa", json=body))
    four = valid(spec, "/videoqa", client.post("/videoqa", json=body | {"num_frames": 4}))
    assert four["alternatives"] == default["alternatives"]
    eight = client.post("/videoqa", json=body | {"num_frames": 8})
    assert valid(spec, "/videoqa", eight, 409) == {
        "error": "ConflictError",
        "detail": f"num_frames: adapter set {REF['videoqa']} has a temporal embedding for 4 frames, got 8"}
    bad = valid(spec, "/videoqa", client.post("/videoqa", json=body | {"num_frames": 0}), 422)
    assert bad["error"] == "ValidationError" and "num_frames" in bad["detail"]


def test_retrieve_text_finds_its_scene_and_rerank_scores_the_head(client, spec):
    for i, caption in enumerate(CAPTIONS):
        body = valid(spec, "/retrieve", client.post("/retrieve", json={
            "query_text": caption, "candidate_images": [b64(s) for s in SCENES], "top_k": 5, "rerank_k": 2}))
        assert body["adapter"] == REF["retrieval"] and body["collection"] is None
        hits = body["results"]
        assert sorted(h["id"] for h in hits) == ["0", "1", "2", "3", "4"] and hits[0]["id"] == str(i)
        head, tail = hits[:2], hits[2:]
        assert all(h["itm_score"] is not None and 0 <= h["itm_score"] <= 1 and h["score"] == h["itm_score"]
                   for h in head)
        assert all(h["itm_score"] is None and h["score"] == h["itc_score"] for h in tail)
        assert [h["score"] for h in tail] == sorted((h["score"] for h in tail), reverse=True)
        assert all(-1.0001 <= h["itc_score"] <= 1.0001 for h in hits)
        assert hits[0]["itc_score"] > max(h["itc_score"] for h in hits[1:]) + 0.2


def test_retrieve_image_finds_its_caption_both_encodings(client, spec):
    for i, scene in enumerate(SCENES):
        by_json = valid(spec, "/retrieve", client.post("/retrieve", json={
            "query_image": b64(scene), "candidate_texts": CAPTIONS, "top_k": 3}))
        by_form = valid(spec, "/retrieve", client.post(
            "/retrieve", files={"query_image": ("q.png", scene, "image/png")},
            data={"candidate_texts": CAPTIONS, "top_k": "3"}))
        for body in (by_json, by_form):
            hits = body["results"]
            assert len(hits) == 3 and hits[0]["id"] == str(i) and hits[0]["metadata"]["text"] == CAPTIONS[i]
            assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
        assert [h["id"] for h in by_form["results"]] == [h["id"] for h in by_json["results"]]


def test_retrieve_from_the_demo_collection_names_it_and_links_media(client, spec):
    body = valid(spec, "/retrieve", client.post("/retrieve", json={
        "query_text": "a large purple circle on the right", "collection": demo.IMAGES, "top_k": 5}))
    assert body["collection"] == demo.IMAGES and body["adapter"] == REF["retrieval"]
    hits = body["results"]
    assert len(hits) == 5 and hits[0]["metadata"]["caption"] == "a large purple circle on the right"
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    for hit in hits:
        assert hit["media_url"] == f"/collections/{demo.IMAGES}/items/{hit['id']}/media"
        assert hit["thumbnail_url"] == f"/collections/{demo.IMAGES}/items/{hit['id']}/thumbnail"
    media = client.get(hits[0]["media_url"])
    assert media.status_code == 200 and media.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(media.content)).size == (96, 96)
    only = valid(spec, "/retrieve", client.post("/retrieve", json={
        "query_text": "a purple circle", "collection": demo.IMAGES, "top_k": 20,
        "filter": {"caption_contains": "small"}}))
    assert only["results"] and all("small" in h["metadata"]["caption"] for h in only["results"])


def test_retrieve_video_collection_returns_clips(client, spec):
    body = valid(spec, "/retrieve", client.post("/retrieve", json={
        "query_text": "a red circle moves left", "collection": demo.VIDEOS, "top_k": 3}))
    assert [h["id"][:5] for h in body["results"]] == ["clip-"] * 3 and body["collection"] == demo.VIDEOS
