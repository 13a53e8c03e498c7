"""A request has one deadline, fixed when it arrives, that every step spends from; and nothing CPU-bound (the
tokenizer included) runs on the event loop. Against the real service in this process (real uvicorn, the
tiny random backbone), with the batcher's stages held so that which step runs when never depends on timing."""

from __future__ import annotations

import asyncio
import base64
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from support.inprocess import InProcessServer, start_in_process
from support.media import image_bytes
from support.waiting import until

TIMEOUT_S = 6.0
COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def srv(tmp_path_factory) -> Any:
    server = start_in_process(tmp_path_factory.mktemp("deadlines"), request_timeout_s=TIMEOUT_S)
    r = httpx.post(f"{server.url}/collections", json={"name": "shapes", "kind": "image"}, timeout=30)
    assert r.status_code == 201, r.text
    items = [{"id": f"img{i}", "image": b64(image_bytes(c))} for i, c in enumerate(COLOURS)]
    r = httpx.post(f"{server.url}/collections/shapes/items", json={"items": items}, timeout=60)
    assert r.status_code == 201, r.text
    yield server
    server.stop()


def test_a_retrieve_that_embeds_then_reranks_ends_at_its_one_deadline(srv: InProcessServer):
    """/retrieve over a collection with re-ranking makes two engine calls (embed the query; then ITM on the
    hits): the second spends from the deadline the request got on arrival, not from a fresh timeout, so the
    request ends at that deadline (it used to be able to take twice REQUEST_TIMEOUT_S)."""
    body = {"collection": "shapes", "query_text": "a red square", "top_k": 2, "rerank_k": 2}
    batcher = srv.batcher
    with ThreadPoolExecutor(1) as pool, batcher.hold("itm"):
        with batcher.hold("text"):
            reply: Future[httpx.Response] = pool.submit(httpx.post, f"{srv.url}/retrieve", json=body,
                                                        timeout=4 * TIMEOUT_S)
            until(lambda: batcher.queued("text") == 1, "the query's text job to queue", 30,
                  stop=lambda: f"the request ended first: {reply.result().text}" if reply.done() else None)
            (first,) = batcher.deadlines("text")
        # the text stage runs now; the re-rank's ITM jobs queue behind the held stage
        until(lambda: batcher.queued("itm") == 2, "the re-rank's two ITM jobs to queue", 30,
              stop=lambda: f"the request ended first: {reply.result().text}" if reply.done() else None)
        assert batcher.deadlines("itm") == [first, first]  # the same instant, not a fresh timeout per call
        response = reply.result(timeout=4 * TIMEOUT_S)  # the held ITM jobs expire at that deadline: 504
        answered = time.monotonic()
    assert response.status_code == 504, response.text
    assert response.json()["error"] == "DeadlineExceededError" and "itm" in response.json()["detail"]
    assert answered >= first  # not before the deadline ...
    assert batcher.queued("itm") == 0  # ... and the expired jobs were dropped, not run


def test_nothing_is_tokenised_on_the_event_loop(srv: InProcessServer, monkeypatch):
    """Every tokenizer call (questions, captions, queries, answer decoding) happens off the event loop: the
    tokenizer is watched where it is called, for requests of every task."""
    tokenizer = srv.parts.engine.tokenizer  # type: ignore[attr-defined]
    calls: list[tuple[str, bool]] = []

    def watched(name: str) -> None:
        real = getattr(tokenizer, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                asyncio.get_running_loop()
                on_loop = True
            except RuntimeError:
                on_loop = False
            calls.append((threading.current_thread().name, on_loop))
            return real(*args, **kwargs)

        monkeypatch.setattr(tokenizer, name, call)

    for name in ("encode", "encode_answers", "decode"):
        watched(name)
    image = b64(image_bytes((200, 30, 30)))
    requests = [
        ("/vqa", {"image": image, "question": "what colour is it?"}),
        ("/vqa", {"image": image, "question": "what colour is it?", "mode": "generate", "num_beams": 2,
                  "top_k": 2}),
        ("/retrieve", {"query_text": "a red square", "candidate_images": [image, image], "rerank_k": 1}),
        ("/retrieve", {"query_image": image, "candidate_texts": ["a red square", "a blue circle"], "rerank_k": 2}),
        ("/retrieve", {"collection": "shapes", "query_text": "a green square", "rerank_k": 2}),
    ]
    for path, body in requests:
        r = httpx.post(f"{srv.url}{path}", json=body, timeout=60)
        assert r.status_code == 200, (path, r.text)
    assert len(calls) >= len(requests)  # the watch saw the tokenizer at work
    on_loop = [thread for thread, loop in calls if loop]
    assert not on_loop, f"tokenizer called on the event loop in {sorted(set(on_loop))}"
