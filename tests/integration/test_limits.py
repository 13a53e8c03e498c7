"""Bodies and connections are bounded before any route runs: the body budget (bytes of bodies in flight,
across requests), header and body read timeouts, and connection caps per client. Real uvicorn servers;
every wait is on state the server exposes in /metrics, or on the socket the server closes, with a deadline."""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from support.server import Server, start_server
from support.waiting import until

BODY = 900_000
"""a body that fills most of the 1 MiB budgets below"""
DEADLINE_S = 60.0


def _server(tmp_path_factory: pytest.TempPathFactory, **settings: object) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("limits")
    srv = start_server(root, root, max_request_bytes=1_000_000, **settings)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def timeouts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Short read timeouts: headers within 1 s, bodies at 16 KB/s at least."""
    yield from _server(tmp_path_factory, header_timeout_s=1, body_timeout_s=1, body_min_rate_kbps=16)


@pytest.fixture(scope="module")
def capped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """4 connections per client; a 1 MiB body budget that answers 503 at once; no read timeouts (tests
    hold connections and half-sent bodies as long as they need)."""
    yield from _server(tmp_path_factory, max_connections_per_client=4, body_budget_mb=1, body_wait_s=0,
                       header_timeout_s=0, body_timeout_s=0)


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """4 connections in all; no read timeouts."""
    yield from _server(tmp_path_factory, max_connections=4, header_timeout_s=0, body_timeout_s=0)


@pytest.fixture(scope="module")
def waiting(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A 1 MiB body budget that bodies wait for (up to a minute); no read timeouts."""
    yield from _server(tmp_path_factory, body_budget_mb=1, body_wait_s=60, header_timeout_s=0, body_timeout_s=0)


def metric(server: Server, name: str, **labels: str) -> float:
    r = httpx.get(f"{server.url}/metrics", timeout=30)
    assert r.status_code == 200, r.text
    text = r.text
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.compile(rf"^{re.escape(name)}(?:{{{re.escape(want)}}})? (\S+)$" if want else
                         rf"^{re.escape(name)} (\S+)$", re.M)
    match = pattern.search(text)
    return float(match.group(1)) if match else 0.0


def wait_until(check: Callable[[], bool], what: str) -> None:
    until(check, what, DEADLINE_S, every=0.05)


def connect(server: Server, source: str = "127.0.0.1") -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.bind((source, 0))
    sock.settimeout(DEADLINE_S)
    sock.connect((host, int(port)))
    return sock


def read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (the socket's timeout is the deadline)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def post_head(length: int, path: str = "/vqa") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


def json_body(size: int) -> bytes:
    """Valid JSON of exactly `size` bytes whose image is not an image: a 4xx once it is read."""
    head = b'{"question": "what?", "image": "'
    return head + b"A" * (size - len(head) - 2) + b'"}'


# -- read timeouts -----------------------------------------------------------------------------------

def trickle(sock: socket.socket, data: bytes, every_s: float = 0.1) -> bytes:
    """Send `data` a byte every `every_s` until the server answers or closes; -> what it answered."""
    sock.settimeout(every_s)
    deadline = time.monotonic() + DEADLINE_S
    for byte in data:
        assert time.monotonic() < deadline, "the server kept the trickling connection"
        try:
            sock.send(bytes([byte]))
        except OSError:  # the server closed it: read what it said before
            break
        try:
            return sock.recv(65536)
        except TimeoutError:
            continue
    else:
        raise AssertionError("the whole request was sent without an answer")
    sock.settimeout(DEADLINE_S)
    try:
        return sock.recv(65536)
    except OSError:
        return b""


def test_slowloris_headers_are_cut_off_after_the_header_timeout(timeouts: Server) -> None:
    before = metric(timeouts, "uniadapter_request_read_timeouts_total", phase="headers")
    with connect(timeouts) as sock:
        started = time.monotonic()
        answer = trickle(sock, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"x" * 100_000)
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert time.monotonic() - started >= 1.0  # not before the timeout
        sock.settimeout(DEADLINE_S)
        read_all(sock)  # and the server closes it
    assert metric(timeouts, "uniadapter_request_read_timeouts_total", phase="headers") == before + 1


def test_a_connection_that_sends_nothing_is_closed(timeouts: Server) -> None:
    with connect(timeouts) as sock:
        assert read_all(sock).startswith(b"HTTP/1.1 408")


def test_a_trickling_body_is_cut_off_with_408_and_no_500(timeouts: Server) -> None:
    before = metric(timeouts, "uniadapter_request_read_timeouts_total", phase="body")
    with connect(timeouts) as sock:
        sock.sendall(post_head(BODY) + b"{")
        answer = trickle(sock, b" " * BODY)  # 10 B/s, far under 16 KB/s
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert metric(timeouts, "uniadapter_request_read_timeouts_total", phase="body") == before + 1
    wait_until(lambda: metric(timeouts, "uniadapter_requests_total", route="/vqa", status="408") >= 1,
               "the cut-off request to be counted as 408")
    assert metric(timeouts, "uniadapter_requests_total", route="/vqa", status="500") == 0
    assert "unhandled error" not in timeouts.log.read_text()


def test_a_body_at_full_speed_is_not_cut_off(timeouts: Server) -> None:
    r = httpx.post(f"{timeouts.url}/vqa", content=json_body(BODY), headers={"content-type": "application/json"},
                   timeout=DEADLINE_S)
    assert 400 <= r.status_code < 500 and r.status_code != 408, r.text


# -- connections per client ------------------------------------------------------------------------------

def test_a_client_over_its_connection_cap_is_refused_while_others_are_served(capped: Server) -> None:
    held = [connect(capped, "127.0.0.2") for _ in range(4)]
    try:
        wait_until(lambda: metric(capped, "uniadapter_connections", scope="busiest_client") == 4,
                   "4 connections from 127.0.0.2")
        refused_before = metric(capped, "uniadapter_connections_refused_total", reason="per_client")
        with connect(capped, "127.0.0.2") as extra:
            extra.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            answer = read_all(extra)
        assert answer.startswith(b"HTTP/1.1 503"), answer
        assert b"retry-after: 1" in answer.lower() and b"MAX_CONNECTIONS_PER_CLIENT" in answer
        assert metric(capped, "uniadapter_connections_refused_total", reason="per_client") == refused_before + 1
        # another client is served meanwhile
        with httpx.Client(base_url=capped.url, timeout=DEADLINE_S) as other:
            assert [other.get("/healthz").status_code for _ in range(3)] == [200] * 3
        held.pop().close()
        wait_until(lambda: metric(capped, "uniadapter_connections", scope="busiest_client") == 3,
                   "a connection from 127.0.0.2 to close")
        with connect(capped, "127.0.0.2") as again:
            again.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            assert read_all(again).startswith(b"HTTP/1.1 200")
    finally:
        for sock in held:
            sock.close()


def test_a_full_server_evicts_the_oldest_unfinished_headers_and_then_refuses(full: Server) -> None:
    """Slow clients spread over many addresses cannot lock everyone out: when the server is full, the
    connection that has been sending its headers longest makes room; busy ones never do."""
    with httpx.Client(base_url=full.url, timeout=DEADLINE_S) as c:  # one kept-alive connection, never evicted

        def count(scope: str) -> float:
            text = c.get("/metrics").text
            match = re.search(rf'^uniadapter_connections{{scope="{scope}"}} (\S+)$', text, re.M)
            return float(match.group(1)) if match else 0.0

        def refused(reason: str) -> float:
            text = c.get("/metrics").text
            match = re.search(rf'^uniadapter_connections_refused_total{{reason="{reason}"}} (\S+)$', text, re.M)
            return float(match.group(1)) if match else 0.0

        slow = []
        for source in ("127.0.0.2", "127.0.0.3", "127.0.0.4"):
            slow.append(connect(full, source))
            slow[-1].sendall(b"POST /vqa HTTP/1.1\r\n")  # and, for now, nothing more
        wait_until(lambda: count("sending_headers") == 3, "the slow connections to be counted")  # accepted in order
        assert count("total") == 4  # full
        with connect(full, "127.0.0.5") as newcomer:
            newcomer.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            assert read_all(newcomer).startswith(b"HTTP/1.1 200")
        evicted = read_all(slow[0])
        assert evicted.startswith(b"HTTP/1.1 503") and b"MAX_CONNECTIONS" in evicted, evicted
        for sock in slow[1:]:  # the younger ones are untouched
            sock.setblocking(False)
            with pytest.raises(BlockingIOError):
                sock.recv(1)
            sock.setblocking(True)
        assert refused("evicted") == 1
        # the slow ones finish their headers (their bodies stay pending: busy), a fourth busy one joins:
        # nobody is left to evict, and a newcomer is refused
        for sock in slow[1:]:
            sock.sendall(post_head(100).split(b"\r\n", 1)[1])
        busy = connect(full, "127.0.0.6")
        busy.sendall(post_head(100))
        wait_until(lambda: count("sending_headers") == 0 and count("total") == 4, "every connection to be busy")
        with connect(full, "127.0.0.7") as late:
            late.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            answer = read_all(late)
        assert answer.startswith(b"HTTP/1.1 503") and b"MAX_CONNECTIONS" in answer, answer
        assert refused("total") == 1
        for sock in [*slow, busy]:
            sock.close()


# -- the body budget -----------------------------------------------------------------------------------

def hold_charged_body(server: Server) -> socket.socket:
    """A request whose body (BODY bytes) is charged to the budget but not yet sent: the budget is full."""
    used = metric(server, "uniadapter_body_budget_bytes", state="used")
    sock = connect(server)
    sock.sendall(post_head(BODY) + b"{")
    wait_until(lambda: metric(server, "uniadapter_body_budget_bytes", state="used") >= used + BODY,
               "the held body to be charged")
    return sock


def finish(sock: socket.socket) -> bytes:
    sock.sendall(json_body(BODY)[1:])
    answer = sock.recv(65536)
    sock.close()
    return answer


def test_a_body_refused_413_by_content_length_is_never_read(capped: Server) -> None:
    peak = metric(capped, "uniadapter_body_budget_bytes", state="peak")
    with connect(capped) as sock:
        sock.sendall(post_head(50_000_000))  # and not one byte of the body
        answer = read_all(sock)  # answered and closed without waiting for it
    assert answer.startswith(b"HTTP/1.1 413"), answer
    assert metric(capped, "uniadapter_body_budget_bytes", state="peak") == peak
    assert metric(capped, "uniadapter_body_budget_bytes", state="used") == 0


def test_bodies_over_the_budget_get_503_with_retry_after_never_500(capped: Server) -> None:
    held = hold_charged_body(capped)
    try:
        timeouts = metric(capped, "uniadapter_body_budget_waits_total", outcome="timeout")
        with httpx.Client(base_url=capped.url, timeout=DEADLINE_S) as c:
            r = c.post("/vqa", content=json_body(BODY), headers={"content-type": "application/json"})
            assert r.status_code == 503, r.text
            assert r.headers["retry-after"] == "1" and "body budget" in r.json()["detail"]

            def chunks() -> Iterator[bytes]:  # no Content-Length: charged as it arrives
                body = json_body(BODY)
                for i in range(0, len(body), 50_000):
                    yield body[i:i + 50_000]

            r = c.post("/vqa", content=chunks(), headers={"content-type": "application/json"})
            assert r.status_code == 503, r.text
            assert metric(capped, "uniadapter_body_budget_waits_total", outcome="timeout") == timeouts + 2
            assert 400 <= int(finish(held)[9:12]) < 500  # the held request is answered as usual
            wait_until(lambda: metric(capped, "uniadapter_body_budget_bytes", state="used") == 0, "the budget to free")
            r = c.post("/vqa", content=json_body(BODY), headers={"content-type": "application/json"})
            assert 400 <= r.status_code < 500, r.text  # read and answered now
    finally:
        held.close()
    assert metric(capped, "uniadapter_requests_total", route="/vqa", status="500") == 0


def test_a_body_waits_for_the_budget_and_is_served_when_it_frees(waiting: Server) -> None:
    held = hold_charged_body(waiting)
    waited = metric(waiting, "uniadapter_body_budget_waits_total", outcome="waited")
    answers: list[httpx.Response] = []
    sender = threading.Thread(target=lambda: answers.append(httpx.post(
        f"{waiting.url}/vqa", content=json_body(BODY), headers={"content-type": "application/json"},
        timeout=DEADLINE_S)))
    sender.start()
    try:
        wait_until(lambda: metric(waiting, "uniadapter_body_budget_waiting") == 1, "the second body to wait")
        assert metric(waiting, "uniadapter_body_budget_bytes", state="used") == BODY  # it holds nothing yet
        assert 400 <= int(finish(held)[9:12]) < 500
    finally:
        held.close()
        sender.join(DEADLINE_S)
    assert len(answers) == 1 and 400 <= answers[0].status_code < 500 and answers[0].status_code != 408, answers
    assert metric(waiting, "uniadapter_body_budget_waits_total", outcome="waited") == waited + 1


def test_concurrent_big_bodies_never_hold_more_than_the_budget(waiting: Server) -> None:
    def post(_: int) -> int:
        return httpx.post(f"{waiting.url}/vqa", content=json_body(BODY), headers={"content-type": "application/json"},
                          timeout=DEADLINE_S).status_code

    with ThreadPoolExecutor(6) as pool:
        codes = list(pool.map(post, range(6)))
    assert all(400 <= c < 500 and c != 408 for c in codes), codes
    capacity = metric(waiting, "uniadapter_body_budget_bytes", state="capacity")
    assert capacity == 1024 * 1024
    assert metric(waiting, "uniadapter_body_budget_bytes", state="peak") <= capacity
    assert metric(waiting, "uniadapter_body_budget_bytes", state="used") == 0
