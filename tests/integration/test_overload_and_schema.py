"""A server with a tiny queue under a burst (429 + Retry-After, accepted work correct), and a
schemathesis run over the OpenAPI schema finding no 5xx."""

from __future__ import annotations

import base64
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from support.media import image_bytes
from support.server import start_server


@pytest.fixture(scope="module")
def small_server(data_root, refs, tmp_path_factory):
    srv = start_server(data_root, tmp_path_factory.mktemp("logs"), max_queue=1, max_batch_size=1, max_wait_ms=0)
    yield srv
    srv.stop()


def test_burst_gets_429_with_retry_after_and_accepted_requests_complete(small_server):
    png = base64.b64encode(image_bytes()).decode()
    body = {"image": png, "question": "what colour?", "adapter": "vqa-a"}
    with httpx.Client(base_url=small_server.url, timeout=60) as c:
        reference = c.post("/vqa", json=body).json()
        responses: list[httpx.Response] = []
        for _ in range(5):  # bounded: stop as soon as a burst overflowed the queue
            with ThreadPoolExecutor(24) as pool:
                burst = list(pool.map(lambda _: c.post("/vqa", json=body), range(24)))
            responses += burst
            if any(r.status_code == 429 for r in burst):
                break
    codes = {r.status_code for r in responses}
    assert codes <= {200, 429}, codes
    rejected = [r for r in responses if r.status_code == 429]
    accepted = [r for r in responses if r.status_code == 200]
    assert rejected and accepted
    for r in rejected:
        assert int(r.headers["retry-after"]) >= 1 and "queue full" in r.json()["detail"]
    for r in accepted:
        assert r.json()["answer"] == reference["answer"]
        assert abs(r.json()["score"] - reference["score"]) <= 1e-4


def test_schemathesis_finds_no_server_errors(small_server, tmp_path):
    cli = Path(sys.executable).parent / "schemathesis"
    result = subprocess.run(
        [str(cli), "run", f"{small_server.url}/openapi.json", "--checks", "not_a_server_error",
         "--max-examples", "12", "--seed", "1", "--phases", "examples,coverage,fuzzing", "--request-timeout", "30",
         "--workers", "1", "--suppress-health-check", "all"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]
