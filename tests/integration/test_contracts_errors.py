"""Error contracts in-process (support.asgi, the shipped demo model): each kind of bad request gets its own 4xx,
the `{"error", "detail"}` envelope the OpenAPI document declares for that code, the security headers, and changes
nothing the service shows."""

from __future__ import annotations

import base64

import pytest
from support.asgi import openapi_validator
from support.media import audio_only_bytes, image_bytes, png_bomb, video_bytes

from uniadapter_serve.adapters.format import read_adapter_meta
from uniadapter_serve.service import demo

REF = {task: read_adapter_meta(demo.SETS_DIR / name / "v1").ref for task, name in demo.DEMO_SETS.items()}
PNG = image_bytes()
JPEG = image_bytes(size=(64, 64), fmt="JPEG")
CLIP = video_bytes([(255, 0, 0)] * 6)
Q = "what colour is the square?"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def vqa(**fields):
    return "/vqa", {"json": {"image": b64(PNG), "question": Q} | fields}


def retrieve(**fields):
    return "/retrieve", {"json": {"query_text": "a red square", "candidate_texts": ["a red square"]} | fields}


def raw(path: str, body: bytes, content_type: str):
    return path, {"content": body, "headers": {"content-type": content_type}}


CASES = {  # name -> ((path, request), status, error class, the detail exactly or a part of it)
    "malformed JSON /vqa": (raw("/vqa", b'{"image": ', "application/json"), 400, "ValidationError",
                            "malformed JSON: EOF while parsing a value at line 1 column 10"),
    "malformed JSON /retrieve": (raw("/retrieve", b"[1, 2", "application/json"), 400, "ValidationError",
                                 "malformed JSON"),
    "malformed JSON /collections": (raw("/collections", b"{name", "application/json"), 400, "ValidationError",
                                    "malformed JSON"),
    "body of another type": (raw("/vqa", b"x", "text/plain"), 415, "UnsupportedMediaTypeError",
                             "application/json or multipart"),
    "unknown adapter": (vqa(adapter="nope"), 404, "AdapterNotFoundError", "no adapter set named 'nope'"),
    "unknown version": (vqa(adapter="demo-vqa@abcdef123456"), 404, "AdapterVersionNotFoundError",
                        "adapter set 'demo-vqa' has no version 'abcdef123456'"),
    "unknown collection": (retrieve(candidate_texts=None, collection="zoo"), 404, "NotFoundError",
                           "no collection named 'zoo' (GET /collections lists them)"),
    "retrieval set for /vqa": (vqa(adapter="demo-retrieval"), 409, "ConflictError",
                               f"adapter set {REF['retrieval']} is a retrieval set; /vqa needs a vqa or videoqa set"),
    "vqa set for /retrieve": (retrieve(adapter="demo-vqa"), 409, "ConflictError",
                              f"adapter set {REF['vqa']} is a vqa set; /retrieval needs a retrieval set"),
    "too-long question": (vqa(question="x" * 600), 422, "TextTooLongError",
                          "question: 600 characters is over the limit of 512"),
    "too-long query": (retrieve(query_text="x " * 300), 422, "TextTooLongError",
                       "query_text: 600 characters is over the limit of 512"),
    "blank question": (vqa(question=" ?! "), 422, "InputError", "at least one word"),
    "extra field": (vqa(colour="red"), 422, "ValidationError", "colour: Extra inputs are not permitted"),
    "top_k of the wrong type": (vqa(top_k="many"), 422, "ValidationError", "top_k"),
    "two queries": (retrieve(query_image=b64(PNG)), 422, "InputError", "exactly one of"),
    "text that is no image": (vqa(image=b64(b"hello, not an image")), 415, "UnsupportedMediaTypeError",
                              "not a JPEG, PNG"),
    "bad base64": (vqa(image="%%%not-base64%%%"), 400, "CorruptMediaError", "not valid base64"),
    "truncated JPEG": (("/vqa", {"files": {"image": ("x.jpg", JPEG[: len(JPEG) // 2], "image/jpeg")},
                                 "data": {"question": Q}}), 400, "CorruptMediaError", "does not decode"),
    "empty file": (("/vqa", {"files": {"image": ("x.png", b"", "image/png")}, "data": {"question": Q}}), 400,
                   "EmptyMediaError", "empty"),
    "decompression bomb": (("/vqa", {"files": {"image": ("x.png", png_bomb(), "image/png")},
                                     "data": {"question": Q}}), 413, "MediaTooLargeError", "decompression bomb"),
    "audio for a video": (("/videoqa", {"files": {"video": ("a.wav", audio_only_bytes(), "audio/wav")},
                                        "data": {"question": Q}}), 415, "UnsupportedMediaTypeError",
                          "no video stream"),
    "truncated video": (("/videoqa", {"json": {"video": b64(CLIP[: len(CLIP) // 3]), "question": Q}}), 400,
                        "CorruptMediaError", "does not decode"),
}


@pytest.fixture(scope="module")
def client(demo_app):
    with demo_app.client() as c:
        yield c


@pytest.fixture(scope="module")
def spec(client):
    return client.get("/openapi.json").json()


def seen(client) -> tuple:
    """What a bad request must not change: the sets, their residency, the collections and their counts."""
    adapters = client.get("/adapters").json()["adapters"]
    collections = client.get("/collections").json()
    return ([(a["ref"], a["pinned"]) for a in adapters],
            [(c["name"], c["uid"], c["items"], c["generation"]) for c in collections])


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_bad_request_gets_its_code_and_the_declared_envelope(client, spec, case):
    (path, request), status, error, detail = CASES[case]
    before = seen(client)
    r = client.post(path, **request)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    assert r.headers["x-content-type-options"] == "nosniff" and r.headers["x-frame-options"] == "DENY"
    body = r.json()
    assert set(body) == {"error", "detail"} and body["error"] == error
    assert detail == body["detail"] if case.startswith(("unknown", "retrieval set", "vqa set", "too-long")) \
        else detail in body["detail"], body
    openapi_validator(spec, path, "post", str(status)).validate(body)
    assert seen(client) == before


def test_unknown_route_and_method_get_the_same_envelope(client):
    r = client.get("/nope")
    assert r.status_code == 404 and r.json() == {"error": "NotFound", "detail": "no route '/nope' (see /docs)"}
    r = client.delete("/healthz")
    assert r.status_code == 405 and r.json() == {
        "error": "MethodNotAllowed", "detail": "DELETE is not allowed on '/healthz'; allowed: GET, HEAD"}


def test_errors_never_count_as_server_errors(client):
    for case in ("malformed JSON /vqa", "decompression bomb", "unknown adapter", "truncated video"):
        (path, request), status, _, _ = CASES[case]
        assert client.post(path, **request).status_code == status
    text = client.get("/metrics").text
    assert 'status="500"' not in text and 'status="400"' in text
    assert client.get("/readyz").json()["status"] == "ready"
