"""Through the real server: concurrent requests for different sets share one batch and each gets
exactly what its set gives alone.

Whether concurrent requests meet in a batch must not depend on scheduling (a lone request's batch closes at
once, and a loaded machine can delay the second request past any wait): the server runs in this process and
the test holds the vision and answer stages (`Batcher.hold`) until every request's job is queued, then checks
in the batch metrics that each stage ran them as exactly one batch."""

from __future__ import annotations

import base64
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from support.inprocess import InProcessServer, start_in_process
from support.media import image_bytes
from support.server import publish_test_sets
from support.waiting import until

STAGES = ("vision", "answer")


@pytest.fixture(scope="module")
def held_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("batching")
    publish_test_sets(root)
    srv = start_in_process(root, max_wait_ms=150, max_batch_size=32)
    yield srv
    srv.stop()


def wait_until(condition, what: str, futures: list[Future[httpx.Response]], timeout: float = 30.0) -> None:
    """Poll the server's state until `condition()`, with a deadline; fail at once if every request was answered
    meanwhile (nothing held them)."""
    def answered() -> str | None:
        if not all(f.done() for f in futures):
            return None
        return (f"every request was answered meanwhile: "
                f"{[f.result().text if f.exception() is None else f.exception() for f in futures]}")

    until(condition, what, timeout, every=0.005, stop=answered)


def batch_stats(srv: InProcessServer) -> dict[str, tuple[float, float, float]]:
    """stage -> (batches run, jobs in them, mixed batches), from the server's own metrics."""
    registry = srv.parts.metrics.registry

    def value(name: str, stage: str) -> float:
        return registry.get_sample_value(name, {"stage": stage}) or 0.0

    return {s: (value("uniadapter_batch_size_count", s), value("uniadapter_batch_size_sum", s),
                value("uniadapter_mixed_batches_total", s)) for s in STAGES}


def together(srv: InProcessServer, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """POST every request to /vqa at once with the vision and answer stages held: vision runs once every
    request's vision job is queued, answering once every answer job is; asserts each stage ran one batch of
    them all (the second one mixing sets)."""
    batcher, n = srv.batcher, len(requests)
    before = batch_stats(srv)
    with httpx.Client(base_url=srv.url, timeout=60) as client, ThreadPoolExecutor(n) as pool:
        with batcher.hold("answer"):
            with batcher.hold("vision"):
                futures = [pool.submit(client.post, "/vqa", json=r) for r in requests]
                wait_until(lambda: batcher.queued("vision") == n, f"{n} vision jobs", futures)
            wait_until(lambda: batcher.queued("answer") == n, f"{n} answer jobs", futures)
        replies = [f.result() for f in futures]
    assert [r.status_code for r in replies] == [200] * n, [r.text for r in replies]
    after = batch_stats(srv)
    for stage in STAGES:
        runs, jobs, mixed = (a - b for a, b in zip(after[stage], before[stage], strict=True))
        assert (runs, jobs) == (1, n), f"{stage}: {runs:g} batches of {jobs:g} jobs, not one of {n}"
        assert mixed == 1, f"{stage}: the batch did not mix the sets"
    return [r.json() for r in replies]


def alone(srv: InProcessServer, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    with httpx.Client(base_url=srv.url, timeout=60) as client:
        replies = [client.post("/vqa", json=r) for r in requests]
    assert [r.status_code for r in replies] == [200] * len(requests), [r.text for r in replies]
    return [r.json() for r in replies]


def assert_same_answers(mixed: list[dict[str, Any]], solo: list[dict[str, Any]]) -> None:
    for m, s in zip(mixed, solo, strict=True):
        assert m["adapter"] == s["adapter"]
        assert [a["answer"] for a in m["alternatives"]] == [a["answer"] for a in s["alternatives"]]
        for x, y in zip(m["alternatives"], s["alternatives"], strict=True):
            assert abs(x["score"] - y["score"]) <= 1e-4


def test_two_sets_in_one_batch_match_each_alone(held_server):
    png = base64.b64encode(image_bytes((10, 180, 40))).decode()
    requests = [{"image": png, "question": "what colour is the square?", "adapter": name, "top_k": 3}
                for name in ("vqa-a", "vqa-b")]
    solo = alone(held_server, requests)
    assert solo[0]["score"] != solo[1]["score"]  # the two sets really differ
    assert_same_answers(together(held_server, requests), solo)


def test_rank_greedy_and_beams_in_one_batch_match_each_alone(held_server):
    png = base64.b64encode(image_bytes((200, 40, 10))).decode()
    base = {"image": png, "question": "what colour is the square?", "top_k": 3}
    requests = [base | {"adapter": "vqa-a"},
                base | {"adapter": "vqa-b", "mode": "generate", "max_answer_length": 4},
                base | {"adapter": "vqa-a", "mode": "generate", "num_beams": 3, "max_answer_length": 5}]
    solo = alone(held_server, requests)
    assert [len(x["alternatives"]) for x in solo] == [3, 1, 3]
    assert_same_answers(together(held_server, requests), solo)


def test_a_held_stage_keeps_jobs_queued_and_runs_them_on_release(held_server):
    """The hook itself: while vision is held a request's job stays queued (the request is not answered);
    leaving the block runs it."""
    png = base64.b64encode(image_bytes()).decode()
    batcher = held_server.batcher
    with httpx.Client(base_url=held_server.url, timeout=60) as client, ThreadPoolExecutor(1) as pool:
        with batcher.hold("vision"):
            future = pool.submit(client.post, "/vqa", json={"image": png, "question": "what colour?",
                                                            "adapter": "vqa-a"})
            wait_until(lambda: batcher.queued("vision") == 1, "the vision job", [future])
            assert not future.done() and batcher.queued() == 1
        assert future.result().status_code == 200
    assert batcher.queued() == 0
    with pytest.raises(ValueError, match="no such stage"), batcher.hold("visoin"):
        pass
