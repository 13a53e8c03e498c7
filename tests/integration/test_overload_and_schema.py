"""A server with a tiny queue under a burst (429 + Retry-After, accepted work correct), and a
schemathesis run over the OpenAPI schema finding no 5xx."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from support.inprocess import start_in_process
from support.media import image_bytes
from support.server import publish_test_sets, start_server
from support.waiting import until


@pytest.fixture(scope="module")
def small_server(data_root, refs, tmp_path_factory):
    srv = start_server(data_root, tmp_path_factory.mktemp("logs"), max_queue=1, max_batch_size=1, max_wait_ms=0)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def held_queue(tmp_path_factory):
    """A queue of one job, in this process so that the test can hold the vision stage."""
    root = tmp_path_factory.mktemp("held-queue")
    publish_test_sets(root)
    srv = start_in_process(root, max_queue=1, max_batch_size=1, max_wait_ms=0)
    yield srv
    srv.stop()


def test_burst_gets_429_with_retry_after_and_accepted_requests_complete(held_queue):
    """While an admitted request's job is held in the queue (Batcher.hold: whatever the machine's speed, the
    queue is full for the whole burst), every other request is refused at once with 429 + Retry-After; the
    accepted one then completes with the answer it gets alone, and the queue takes work again."""
    png = base64.b64encode(image_bytes()).decode()
    body = {"image": png, "question": "what colour?", "adapter": "vqa-a"}
    batcher = held_queue.batcher
    with httpx.Client(base_url=held_queue.url, timeout=60) as c, ThreadPoolExecutor(8) as pool:
        reference = c.post("/vqa", json=body).json()
        with batcher.hold("vision"):
            accepted = pool.submit(c.post, "/vqa", json=body)
            until(lambda: batcher.queued("vision") >= 1, "the first request's job to be queued", every=0.005,
                  stop=lambda: accepted.result().text if accepted.done() else None)
            burst = list(pool.map(lambda _: c.post("/vqa", json=body), range(8)))
        first = accepted.result()
        after = c.post("/vqa", json=body)
    assert [r.status_code for r in burst] == [429] * 8, [r.text for r in burst]
    for r in burst:
        assert int(r.headers["retry-after"]) >= 1 and "queue full" in r.json()["detail"]
    for r in (first, after):
        assert r.status_code == 200, r.text
        assert r.json()["answer"] == reference["answer"]
        assert abs(r.json()["score"] - reference["score"]) <= 1e-4


POSITIVE_ACCEPTANCE = """
[checks.positive_data_acceptance]
# what a schema cannot promise about a body it admits: media that do not decode (400), over a byte or
# pixel limit (413), not an image/video (415); names that do not exist (404), state conflicts (409),
# load (429, 503)
expected-statuses = ["2xx", "400", "401", "403", "404", "409", "413", "415", "429", "503"]
"""


def schemathesis(url: str, schema: str, checks: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    cli = Path(sys.executable).parent / "schemathesis"
    (cwd / "schemathesis.toml").write_text(POSITIVE_ACCEPTANCE)
    return subprocess.run(
        [str(cli), "--config-file", str(cwd / "schemathesis.toml"), "run", schema, "--url", url, "--checks", checks,
         "--max-examples", "12", "--seed", "1", "--phases", "examples,coverage,fuzzing", "--request-timeout", "30",
         "--workers", "1", "--suppress-health-check", "all"],
        capture_output=True, text=True, timeout=600, cwd=cwd,
    )


def test_schemathesis_finds_no_server_errors(small_server, tmp_path):
    result = schemathesis(small_server.url, f"{small_server.url}/openapi.json", "not_a_server_error", tmp_path)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]


def test_schemathesis_every_json_body_the_schema_admits_is_accepted(small_server, tmp_path):
    """positive_data_acceptance: a body valid under the schema never gets 422 (the schema carries the one-of
    rules, patterns and this server's limits). JSON bodies only: schemathesis does not apply one-of rules
    to multipart form fields, and 'ids: one per file' of the items form cannot be said in JSON Schema."""
    spec = httpx.get(f"{small_server.url}/openapi.json").json()
    for ops in spec["paths"].values():
        for op in ops.values():
            content = op.get("requestBody", {}).get("content", {})
            if "application/json" in content:
                content.pop("multipart/form-data", None)
    (tmp_path / "openapi.json").write_text(json.dumps(spec))
    result = schemathesis(small_server.url, str(tmp_path / "openapi.json"),
                          "not_a_server_error,positive_data_acceptance", tmp_path)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]
