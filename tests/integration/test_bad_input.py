"""Bad input gets its own 4xx naming the problem, never a 500, and changes nothing on the server (in-process:
support.asgi, the session's blip-tiny app with the limits of tests/integration's `server`)."""

from __future__ import annotations

import base64

import pytest
from support.keys import ADMIN_KEY, READ_KEY
from support.media import audio_only_bytes, image_bytes, png_bomb, video_bytes


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


PNG = image_bytes()
JPEG = image_bytes(size=(64, 64), fmt="JPEG")
CLIP = video_bytes([(255, 0, 0)] * 6)
Q = "what colour is the square?"


def vqa_json(**kw):
    return ("POST", "/vqa", {"json": {"image": b64(PNG), "question": Q} | kw})


def vqa_file(data: bytes, content_type: str = "image/png", **form):
    return ("POST", "/vqa", {"files": {"image": ("x", data, content_type)}, "data": {"question": Q} | form})


CASES = {
    "non-image bytes": (vqa_json(image=b64(b"hello, not an image")), 415, "not a JPEG, PNG"),
    "truncated JPEG": (vqa_file(JPEG[: len(JPEG) // 2], "image/jpeg"), 400, "does not decode"),
    "PNG decompression bomb": (vqa_file(png_bomb()), 413, "decompression bomb"),
    "0-byte file": (vqa_file(b""), 400, "empty"),
    "oversize image": (vqa_file(b"\x89PNG\r\n\x1a\n" + b"\0" * 300_000), 413, "over the limit of 200000 bytes"),
    "oversize request": (vqa_file(b"\0" * 2_100_000), 413, "request body"),
    "wrong file content type": (vqa_file(PNG, "text/plain"), 415, "content type 'text/plain'"),
    "wrong body content type": (("POST", "/vqa", {"content": b"x", "headers": {"content-type": "text/plain"}}), 415,
                                "application/json or multipart"),
    "empty question": (vqa_json(question=""), 422, "question"),
    "blank question": (vqa_json(question="  ?! "), 422, "at least one word"),
    "overlong question": (vqa_json(question="why " * 60), 422, "over the limit of 200"),
    "unknown adapter": (vqa_json(adapter="nope"), 404, "no adapter set named 'nope'"),
    "unknown version": (vqa_json(adapter="vqa-a@abcdef123456"), 404, "has no version"),
    "adapter of another task": (vqa_json(adapter="ret-a"), 409, "is a retrieval set"),
    "malformed JSON": (("POST", "/vqa", {"content": b'{"image": ', "headers": {"content-type": "application/json"}}),
                       400, "malformed JSON"),
    "bad base64": (vqa_json(image="%%%not-base64%%%"), 400, "not valid base64"),
    "unknown field": (vqa_json(colour="red"), 422, "colour"),
    "wrong type": (vqa_json(top_k="many"), 422, "top_k"),
    "negative top_k": (vqa_json(top_k=-1), 422, "top_k"),
    "huge top_k": (("POST", "/retrieve", {"json": {"query_text": "red", "candidate_images": [b64(PNG)],
                                                   "top_k": 10_000}}), 422, "top_k: 10000 is over the limit"),
    "no query": (("POST", "/retrieve", {"json": {"candidate_texts": ["red"]}}), 422, "exactly one of"),
    "unknown collection": (("POST", "/retrieve", {"json": {"query_text": "red", "collection": "zoo"}}), 404,
                           "no collection named 'zoo'"),
    "audio-only video": (("POST", "/videoqa", {"files": {"video": ("a.wav", audio_only_bytes(), "audio/wav")},
                                                "data": {"question": Q}}), 415, "no video stream"),
    "non-video bytes": (("POST", "/videoqa", {"json": {"video": b64(b"plain text" * 50), "question": Q}}), 415,
                        "not a video container"),
    "truncated video": (("POST", "/videoqa", {"json": {"video": b64(CLIP[: len(CLIP) // 3]), "question": Q}}), 400,
                        "does not decode"),
    "oversize video": (("POST", "/videoqa", {"json": {"video": b64(b"\0" * 310_000), "question": Q}}), 413,
                       "over the limit"),
}


@pytest.fixture
def client(tiny_client):
    return tiny_client


@pytest.fixture(scope="module")
def state_before(tiny_app):
    with tiny_app.client(READ_KEY) as c:
        return c.get("/adapters").json()["adapters"]


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_bad_input_table(client, case, state_before):
    (method, path, kwargs), status, message = CASES[case]
    r = client.request(method, path, **kwargs)
    assert r.status_code == status, r.text
    body = r.json()
    assert message in body["detail"], body
    assert body["error"] != "InternalError"


def test_auth(tiny_app):
    with tiny_app.client() as anon:
        r = anon.post("/vqa", json={"image": b64(PNG), "question": Q})
        assert r.status_code == 401 and "missing API key" in r.json()["detail"]
        assert r.headers["www-authenticate"] == "Bearer"
        r = anon.post("/vqa", json={"image": b64(PNG), "question": Q}, headers={"X-API-Key": "wrong"})
        assert r.status_code == 403 and r.json()["detail"] == "wrong API key"
        assert anon.get("/healthz").status_code == 200  # probes need no key
        r = anon.post("/adapters/ret-a/pin", headers={"X-API-Key": READ_KEY})
        assert r.status_code == 403 and "admin key" in r.json()["detail"]
        assert anon.get("/adapters", headers={"X-API-Key": ADMIN_KEY}).status_code == 200


def test_nothing_changed_and_server_healthy(client, state_before):
    for case in ("unknown adapter", "PNG decompression bomb", "malformed JSON"):
        (method, path, kwargs), _, _ = CASES[case]
        client.request(method, path, **kwargs)
    after = client.get("/adapters").json()["adapters"]
    assert [a["ref"] for a in after] == [a["ref"] for a in state_before]
    assert client.get("/readyz").status_code == 200
    assert 'status="500"' not in client.get("/metrics").text
