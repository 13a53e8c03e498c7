"""Every route in-process (support.asgi: the session's blip-tiny app with the test sets, keys and limits of
tests/integration's `server`): shapes, both body encodings, docs and schema."""

from __future__ import annotations

import base64

import pytest
from support.media import image_bytes, video_bytes
from support.server import ANSWERS


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


def test_health_ready_metrics(client, admin):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready == {"status": "ready", "checks": {"store": "ok", "backbone": "ok", "engine": "ok", "adapters": "ok",
                                                   "redis": "off", "faiss": "cpu", "golden": "ok"}, "warnings": []}
    assert client.get("/readyz", params={"verbose": "true"}).status_code == 403  # the read key is not enough
    detail = admin.get("/readyz", params={"verbose": "true"}).json()["details"]
    assert detail["backbone"]["components"] == ["vision_model", "text_encoder", "text_decoder", "heads"]
    assert detail["adapters"]["available"] >= 6
    # the backbone's first start wrote its record in the data root (blip-tiny has no folder to hold one)
    assert detail["golden"]["backbone"]["result"] in ("recorded", "pass"), detail["golden"]
    text = client.get("/metrics").text
    assert "# TYPE uniadapter_batch_size histogram" in text and "uniadapter_queue_depth" in text
    assert 'uniadapter_golden_checks_total{result="' in text


def test_vqa_json_and_multipart_agree(client, refs):
    png = image_bytes()
    a = client.post("/vqa", json={"image": b64(png), "question": "what colour is the square?", "adapter": "vqa-a",
                                  "top_k": 4})
    assert a.status_code == 200, a.text
    body = a.json()
    assert body["adapter"] == refs["vqa-a"] and body["mode"] == "rank"
    assert body["answer"] in ANSWERS and len(body["alternatives"]) == 4
    scores = [x["score"] for x in body["alternatives"]]
    assert scores == sorted(scores, reverse=True) and body["score"] == scores[0]
    m = client.post("/vqa", files={"image": ("x.png", png, "image/png")},
                    data={"question": "what colour is the square?", "adapter": "vqa-a", "top_k": "4"})
    assert m.status_code == 200, m.text
    assert m.json()["answer"] == body["answer"]
    assert abs(m.json()["score"] - body["score"]) < 1e-4


def test_vqa_rank_scores_k_candidates_whatever_top_k(client):
    """Rank mode prunes to k = RANK_K (128, capped by the list) by the first token, not to top_k: asking for
    fewer answers returns the head of the same ranking; rank_score=blip ranks by BLIP's score."""
    png = b64(image_bytes((30, 200, 90)))
    body = {"image": png, "question": "what colour is the square?", "adapter": "vqa-a"}
    every = client.post("/vqa", json=body | {"top_k": len(ANSWERS)}).json()["alternatives"]
    assert len(every) == len(ANSWERS) and {a["answer"] for a in every} == set(ANSWERS)
    for top_k in (1, 2, 4):
        head = client.post("/vqa", json=body | {"top_k": top_k}).json()["alternatives"]
        assert [a["answer"] for a in head] == [a["answer"] for a in every[:top_k]]
        assert all(abs(x["score"] - y["score"]) <= 1e-4 for x, y in zip(head, every, strict=False))
    blip = client.post("/vqa", json=body | {"top_k": len(ANSWERS), "rank_score": "blip"}).json()["alternatives"]
    assert {a["answer"] for a in blip} == set(ANSWERS)
    likelihood = {a["answer"]: a["score"] for a in every}
    assert all(abs(b["score"] - likelihood[b["answer"]]) > 1e-3 for b in blip)  # another score
    assert [b["score"] for b in blip] == sorted((b["score"] for b in blip), reverse=True)
    bad = client.post("/vqa", json=body | {"rank_score": "loss"})
    assert bad.status_code == 422 and "rank_score" in bad.json()["detail"]


def test_vqa_generate_and_bare_backbone(client):
    r = client.post("/vqa", json={"image": b64(image_bytes(fmt="JPEG")), "question": "what is it?",
                                  "mode": "generate", "adapter": "vqa-b", "max_answer_length": 4})
    assert r.status_code == 200, r.text
    assert r.json()["mode"] == "generate" and isinstance(r.json()["answer"], str)
    bare = client.post("/vqa", json={"image": b64(image_bytes()), "question": "what is it?", "adapter": "none"})
    assert bare.status_code == 200 and bare.json()["adapter"] is None


def test_vqa_beam_search(client):
    body = {"image": b64(image_bytes(fmt="JPEG")), "question": "what is it?", "mode": "generate",
            "adapter": "vqa-b", "max_answer_length": 5}
    greedy = client.post("/vqa", json=body | {"top_k": 3})
    beams = client.post("/vqa", json=body | {"num_beams": 3, "top_k": 3})
    assert greedy.status_code == 200 and beams.status_code == 200, beams.text
    assert len(greedy.json()["alternatives"]) == 1  # greedy decoding has one answer
    alternatives = beams.json()["alternatives"]
    assert len(alternatives) == 3 and alternatives[0]["answer"] == beams.json()["answer"]
    assert len(client.post("/vqa", json=body | {"num_beams": 3, "top_k": 2}).json()["alternatives"]) == 2
    wrong = client.post("/vqa", json=body | {"mode": "rank", "num_beams": 3})
    assert wrong.status_code == 422 and "num_beams" in wrong.json()["detail"]


def test_different_sets_answer_differently(client):
    png = b64(image_bytes())
    scores = {}
    for name in ("vqa-a", "vqa-b", "none"):
        r = client.post("/vqa", json={"image": png, "question": "what colour?", "adapter": name})
        scores[name] = r.json()["score"]
    assert len({round(s, 4) for s in scores.values()}) == 3


def test_videoqa(client, refs):
    clip = video_bytes([(255, 0, 0)] * 4 + [(0, 0, 255)] * 4)
    r = client.post("/videoqa", files={"video": ("clip.mp4", clip, "video/mp4")},
                    data={"question": "what colour is it?", "adapter": "video-a"})
    assert r.status_code == 200, r.text
    assert r.json()["adapter"] == refs["video-a"] and r.json()["answer"] in ANSWERS
    j = client.post("/videoqa", json={"video": b64(clip), "question": "what colour is it?", "adapter": "video-a"})
    assert j.status_code == 200 and abs(j.json()["score"] - r.json()["score"]) < 1e-4


def test_retrieve_text_to_images_with_rerank(client, refs):
    images = [image_bytes((200, 0, 0)), image_bytes((0, 200, 0)), image_bytes((0, 0, 200))]
    r = client.post("/retrieve", json={"query_text": "a red square", "candidate_images": [b64(i) for i in images],
                                       "top_k": 3, "rerank_k": 2, "adapter": "ret-a"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["adapter"] == refs["ret-a"]
    hits = body["results"]
    assert sorted(h["id"] for h in hits) == ["0", "1", "2"]
    assert all(h["itm_score"] is not None for h in hits[:2]) and hits[2]["itm_score"] is None
    assert 0 <= hits[0]["itm_score"] <= 1 and hits[0]["itm_score"] >= hits[1]["itm_score"]
    assert all(-1.0001 <= h["itc_score"] <= 1.0001 for h in hits)


def test_retrieve_image_to_texts_multipart(client):
    texts = ["a red square", "a blue circle", "two green stars"]
    r = client.post("/retrieve", files={"query_image": ("q.png", image_bytes(), "image/png")},
                    data={"candidate_texts": texts, "top_k": "2", "adapter": "ret-b"})
    assert r.status_code == 200, r.text
    hits = r.json()["results"]
    assert len(hits) == 2 and all(h["metadata"]["text"] in texts for h in hits)
    assert hits[0]["score"] >= hits[1]["score"]


def test_adapter_listing_and_admin_routes(client, admin, refs):
    listing = client.get("/adapters").json()
    by_ref = {a["ref"]: a for a in listing["adapters"]}
    assert set(refs.values()) <= set(by_ref)
    assert by_ref[refs["ret-a"]]["task"] == "retrieval" and by_ref[refs["ret-a"]]["percent_of_backbone"] > 0
    r = admin.post("/adapters/ret-b/pin")
    assert r.status_code == 200 and r.json()["pinned"] is True and r.json()["resident"] is True
    assert admin.post("/adapters/ret-b/unload").status_code == 409
    assert admin.post("/adapters/ret-b/unpin").json()["pinned"] is False
    assert admin.post("/adapters/ret-b/unload").json()["resident"] is False
    assert admin.post("/adapters/ret-b/load").json()["resident"] is True
    assert client.get(f"/adapters/{refs['vqa-a']}").json()["answer_list_size"] == len(ANSWERS)


def test_openapi_declares_both_encodings_and_swagger_loads(client):
    schema = client.get("/openapi.json").json()
    for path in ("/vqa", "/videoqa", "/retrieve"):
        content = schema["paths"][path]["post"]["requestBody"]["content"]
        assert set(content) == {"application/json", "multipart/form-data"}
    form = schema["paths"]["/vqa"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert form["properties"]["image"] == {"type": "string", "format": "binary"}
    assert "VqaRequest" in schema["components"]["schemas"]
    docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger-ui" in docs.text and "/docs-static/swagger-ui-bundle.js" in docs.text
    js = client.get("/docs-static/swagger-ui-bundle.js")
    assert js.status_code == 200 and len(js.content) > 100_000  # served locally, no CDN


def _metric(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(name + "{"):
            got = ",".join(sorted(line[len(name) + 1:line.index("}")].split(",")))
            if got == want:
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_server_timing_and_phase_metrics(client):
    before = client.get("/metrics").text
    r = client.post("/vqa", json={"image": b64(image_bytes()), "question": "what colour is the square?",
                                  "adapter": "vqa-a"})
    assert r.status_code == 200
    phases = {}
    for part in r.headers["server-timing"].split(","):
        name, dur = part.strip().split(";dur=")
        phases[name] = float(dur)
    assert set(phases) == {"decode", "queue", "compute", "total"}
    assert phases["compute"] > 0 and phases["decode"] > 0
    assert all(phases[p] <= phases["total"] for p in ("decode", "queue", "compute"))
    assert phases["decode"] + phases["compute"] <= phases["total"]  # they never overlap in one /vqa
    after = client.get("/metrics").text
    for stage in ("vision", "answer"):  # one batch per stage at least
        name = "uniadapter_stage_compute_seconds_count"
        assert _metric(after, name, stage=stage) >= _metric(before, name, stage=stage) + 1
    for phase in ("decode", "queue", "compute"):
        name = "uniadapter_request_phase_seconds_count"
        assert _metric(after, name, route="/vqa", phase=phase) == _metric(before, name, route="/vqa", phase=phase) + 1
    assert "server-timing" not in client.get("/healthz").headers
