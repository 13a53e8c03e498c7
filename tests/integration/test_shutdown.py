"""SIGTERM under load: the server stops accepting, answers every accepted request, flushes, exits 0."""

from __future__ import annotations

import base64
import re
import signal
import threading
import time

import httpx
from support.media import image_bytes
from support.server import publish_test_sets, start_server


def in_flight(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    m = re.search(r"^uniadapter_requests_in_flight (\S+)$", text, re.M)
    assert m, text
    return float(m.group(1))


def wait_for_in_flight(url: str, n: int, deadline: float) -> None:
    """Until the server itself counts n requests in flight."""
    while (now := in_flight(url)) < n:
        assert time.monotonic() < deadline, f"only {now} of {n} requests reached the server"
        time.sleep(0.02)


def test_sigterm_drains_in_flight_requests_then_exits_0(tmp_path):
    root = tmp_path / "data"
    publish_test_sets(root)
    # batches wait up to 5 s to fill: the requests are still in flight when SIGTERM comes
    server = start_server(root, tmp_path, max_wait_ms=5000, max_batch_size=64)
    assert httpx.post(f"{server.url}/collections", json={"name": "c", "kind": "image"}).status_code == 201
    png = base64.b64encode(image_bytes()).decode()
    results: list[int | str] = []
    lock = threading.Lock()

    def call(i: int) -> None:
        body = {"image": png, "question": f"what colour is {i}?", "adapter": "vqa-a"}
        try:
            status: int | str = httpx.post(f"{server.url}/vqa", json=body, timeout=60).status_code
        except httpx.HTTPError as e:
            status = type(e).__name__
        with lock:
            results.append(status)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    wait_for_in_flight(server.url, 12, deadline=time.monotonic() + 60)
    server.process.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(60)
    code = server.process.wait(60)
    assert results.count(200) == 12, results
    assert code == 0
    assert (root / "collections" / "c" / "index.snap").is_file()  # indexes flushed on the way out
    log = server.log.read_text()
    assert "Traceback" not in log, log[-3000:]
