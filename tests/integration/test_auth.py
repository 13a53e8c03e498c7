"""Auth: fails closed with a read key and no admin key, every admin route enumerated from the app's own table so
none is missed; keys checked from the headers before any body byte is read (the 401 comes back while 60 MB are
still unsent); hostile Authorization bytes; with no keys, Origin and Host. What rides on raw sockets or on the
server's log runs on real uvicorn; the rest in-process (support.asgi)."""

from __future__ import annotations

import base64
import re
import socket
from urllib.parse import quote, urlsplit

import httpx
import pytest
from support.asgi import running_app
from support.keys import ADMIN_KEY, READ_KEY
from support.media import image_bytes
from support.server import start_server

from uniadapter_serve.service.app import create_app
from uniadapter_serve.service.auth import guards
from uniadapter_serve.service.settings import Settings

MB = 1024 * 1024
PNG = image_bytes()
DISABLED = "UNIADAPTER_ADMIN_KEY is not set while UNIADAPTER_API_KEY is"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def admin_routes() -> list[tuple[str, str]]:
    """(method, path template) of every route the app's auth table marks admin, and /readyz?verbose=true."""
    table = guards(create_app(Settings(_env_prefix="UNIADAPTER_TEST_IGNORED_")).router.routes)  # type: ignore[call-arg]
    found = sorted({(m, g.path) for g in table if g.level == "admin" for m in g.methods or ()})
    assert len(found) >= 10, found
    return [*found, ("GET", "/readyz?verbose=true")]


ADMIN_ROUTES = admin_routes()


def fill(template: str, **params: str) -> str:
    return re.sub(r"\{(\w+)(?::\w+)?\}", lambda m: quote(params[m.group(1)], safe=""), template)


def body_for(method: str, template: str) -> dict[str, object]:
    """A body each write would act on if it were let through (so 'nothing changed' means something)."""
    plain = re.sub(r"\{(\w+):\w+\}", r"{\1}", template)
    return {
        ("POST", "/collections"): {"json": {"name": "auth-new", "kind": "image"}},
        ("POST", "/collections/{name}/items"): {"json": {"items": [{"id": "auth-added", "image": b64(PNG)}]}},
        ("POST", "/collections/{name}/reindex"): {"json": {"adapter": "ret-b"}},
        ("POST", "/adapters/{name}/publish"): {"files": {"config": ("c.json", b"{}"), "weights": ("w", b"x")}},
    }.get((method, plain), {})


@pytest.fixture(scope="module")
def shared_root(tmp_path_factory, refs, data_root):
    root = tmp_path_factory.mktemp("auth-data")
    (root / "adapters").symlink_to(data_root / "adapters")  # the session's published test sets
    return root


@pytest.fixture(scope="module")
def open_server(shared_root):
    """No keys (the documented local default), holding the collection 'auth-kept' with one item; in-process."""
    with running_app(shared_root, backbone="blip-tiny") as srv:
        with srv.client() as c:
            r = c.post("/collections", json={"name": "auth-kept", "kind": "image", "adapter": "ret-a"})
            assert r.status_code == 201, r.text
            r = c.post("/collections/auth-kept/items", json={"items": [{"id": "kept-1", "image": b64(PNG)}]})
            assert r.status_code == 201, r.text
        yield srv


@pytest.fixture(scope="module")
def read_only(shared_root, open_server, tmp_path_factory):
    """A read key and no admin key, on the same data root: 'auth-kept' is there to be (not) deleted."""
    srv = start_server(shared_root, tmp_path_factory.mktemp("auth-ro-logs"), api_key=READ_KEY,
                       max_request_bytes=64 * MB)
    yield srv
    srv.stop()


def snapshot(url: str, key: str | None) -> dict[str, object]:
    with httpx.Client(base_url=url, headers={"X-API-Key": key} if key else {}, timeout=60) as c:
        adapters = c.get("/adapters").json()["adapters"]
        return {"collections": sorted(x["name"] for x in c.get("/collections").json()),
                "kept": c.get("/collections/auth-kept").json()["items"],
                "item": c.get("/collections/auth-kept/items/kept-1").status_code,
                "adapters": sorted((a["ref"], a["resident"], a["pinned"]) for a in adapters)}


# -- fails closed --------------------------------------------------------------------------------------------

def test_a_read_key_without_an_admin_key_refuses_every_write_and_changes_nothing(read_only):
    before = snapshot(read_only.url, READ_KEY)
    assert before["kept"] == 1 and "auth-kept" in before["collections"]  # type: ignore[operator]
    params = {"name": "auth-kept", "ref": "ret-a", "item_id": "kept-1"}
    with httpx.Client(base_url=read_only.url, timeout=60) as c:
        for method, template in ADMIN_ROUTES:
            for headers in ({}, {"X-API-Key": READ_KEY}, {"Authorization": f"Bearer {READ_KEY}"},
                            {"X-API-Key": ADMIN_KEY}):
                r = c.request(method, fill(template, **params), headers=headers, **body_for(method, template))
                assert r.status_code == 403, (method, template, headers, r.text)
                assert r.json()["error"] == "AuthError" and DISABLED in r.json()["detail"], r.text
        assert c.get("/collections", headers={"X-API-Key": READ_KEY}).status_code == 200  # reads still work
        assert c.get("/collections").status_code == 401
    assert snapshot(read_only.url, READ_KEY) == before
    log = read_only.log.read_text()
    assert "WARNING" in log and "UNIADAPTER_ADMIN_KEY is not" in log  # said at start


def test_with_both_keys_only_the_admin_key_opens_admin_routes(tiny_app):
    params = {"name": "auth-no-such", "ref": "no-such-set", "item_id": "none"}  # the admin key gets 404s: no effect
    with tiny_app.client() as c:
        for method, template in ADMIN_ROUTES:
            path = fill(template, **params)
            r = c.request(method, path)
            assert r.status_code == 401 and "missing admin key" in r.json()["detail"], (path, r.text)
            r = c.request(method, path, headers={"X-API-Key": READ_KEY})
            assert r.status_code == 403 and "needs the admin key" in r.json()["detail"], (path, r.text)
            r = c.request(method, path, headers={"X-API-Key": ADMIN_KEY})
            assert r.status_code not in (401, 403) and r.status_code < 500, (path, r.text)
        r = c.post("/adapters/ret-a/pin", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
        assert r.status_code == 200 and r.json()["pinned"] is True
        assert c.post("/adapters/ret-a/unpin", headers={"X-API-Key": ADMIN_KEY}).json()["pinned"] is False


# -- before the body --------------------------------------------------------------------------------------------

def read_response(s: socket.socket) -> tuple[int, dict[str, str], bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        assert chunk, f"connection closed before an answer: {data!r}"
        data += chunk
    top, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = top.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
    while len(body) < int(headers.get("content-length", "0")):
        chunk = s.recv(65536)
        assert chunk
        body += chunk
    return int(status_line.split()[1]), headers, body


def partial_request(url: str, head: list[str], total: int, sent: int) -> tuple[int, dict[str, str], bytes, bool]:
    """Send a request's head declaring `total` body bytes and only the first `sent`; read the answer.
    -> (status, headers, body, whether the server then closed the connection). An answer here proves the server
    did not wait for the body: the rest of it was never sent."""
    parts = urlsplit(url)
    host, port = parts.hostname or "", parts.port or 80
    lines = [*head, f"Host: {host}:{port}", f"Content-Length: {total}"]
    with socket.create_connection((host, port), timeout=30) as s:  # a deadline, not a wait: answers come at once
        s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + b"\0" * sent)
        status, headers, body = read_response(s)
        closed = s.recv(65536) == b""  # Connection: close -> the server closes; nothing else could come
    return status, headers, body, closed


@pytest.mark.parametrize(("method", "path", "content_type"), [
    ("POST", "/collections", "application/json"),  # a route with a body parameter: FastAPI parses it first
    ("POST", "/collections/auth-kept/items", "multipart/form-data; boundary=x"),
    ("POST", "/adapters/ret-a/publish", "multipart/form-data; boundary=x"),
    ("POST", "/vqa", "application/json"),
])
def test_a_60_mb_body_without_a_key_is_refused_before_it_is_sent(server, read_only, method, path, content_type):
    for url, status in ((server.url, 401), (read_only.url, 401 if path == "/vqa" else 403)):
        head = [f"{method} {path} HTTP/1.1", f"Content-Type: {content_type}"]
        code, headers, body, closed = partial_request(url, head, total=60 * MB, sent=64 * 1024)
        assert code == status, body
        assert headers["connection"] == "close" and closed  # the unread body does not keep the connection
        assert b'"AuthError"' in body and headers["x-content-type-options"] == "nosniff"
    # with the key, the same head reaches the body limit (2 MB on the session server): auth runs first, then it
    code, _, body, _ = partial_request(server.url, [f"{method} {path} HTTP/1.1", f"Content-Type: {content_type}",
                                                    f"X-API-Key: {ADMIN_KEY}"], total=60 * MB, sent=1024)
    assert code == 413, body
    assert httpx.get(f"{read_only.url}/readyz").status_code == 200


def raw_get(url: str, path: str, header: bytes) -> tuple[int, bytes]:
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname or "", parts.port or 80), timeout=30) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: {parts.netloc}\r\n".encode() + header + b"\r\n\r\n")
        status, _, body = read_response(s)
    return status, body


@pytest.mark.parametrize("header", [
    b"Authorization: Bearer " + bytes(range(0x80, 0x100)) * 32,
    b"X-API-Key: " + bytes(range(0x80, 0x100)) * 32,
    b"Authorization: Bearer " + b"\xff" * 100_000,
    b"Authorization: " + bytes(range(0x21, 0x7f)) * 50,
])
def test_hostile_key_bytes_are_refused_never_a_500(server, header):
    for path, detail in (("/adapters", b"wrong API key"), ("/readyz?verbose=1", b"needs the admin key")):
        status, data = raw_get(server.url, path, header)
        assert status in (400, 401, 403, 431), data[:300]
        if status == 403:
            assert detail in data
    assert 'status="500"' not in httpx.get(f"{server.url}/metrics").text


# -- no keys: Origin and Host ---------------------------------------------------------------------------------

def test_with_no_keys_another_origin_cannot_pin_or_add(open_server):
    evil = {"Origin": "http://evil.example"}
    with open_server.client() as c:
        before = c.get("/collections/auth-kept").json()["items"]
        r = c.post("/adapters/ret-a/pin", headers=evil)
        assert r.status_code == 403 and "UNIADAPTER_ALLOWED_HOSTS" in r.json()["detail"], r.text
        assert "'http://evil.example'" in r.json()["detail"]
        r = c.post("/collections/auth-kept/items", headers=evil, json={"items": [{"id": "x1", "image": b64(PNG)}]})
        assert r.status_code == 403, r.text
        r = c.post("/collections/auth-kept/items", headers=evil, files={"files": ("a.png", PNG, "image/png")})
        assert r.status_code == 403, r.text  # what a cross-origin <form> can send with no preflight
        for origin in ("null", "https://127.0.0.1.evil.example", "http://localhost.evil.example:1"):
            assert c.post("/adapters/ret-a/pin", headers={"Origin": origin}).status_code == 403, origin
        assert c.get("/adapters/ret-a").json()["pinned"] is False
        assert c.get("/collections/auth-kept").json()["items"] == before


def test_with_no_keys_same_origin_and_no_origin_pass(open_server):
    url = open_server.url
    with open_server.client() as c:
        r = c.post("/adapters/ret-a/pin", headers={"Origin": url})  # the page itself
        assert r.status_code == 200 and r.json()["pinned"] is True, r.text
        port = urlsplit(url).port
        r = c.post("/adapters/ret-a/unpin", headers={"Origin": f"http://localhost:{port}"})
        assert r.status_code == 200 and r.json()["pinned"] is False, r.text
        r = c.post("/collections/auth-kept/items", json={"items": [{"id": "no-origin", "image": b64(PNG)}]})
        assert r.status_code == 201, r.text  # curl, the Python client: no Origin
        assert c.delete("/collections/auth-kept/items/no-origin").status_code == 204


def test_with_no_keys_a_rebound_host_is_refused_but_probes_answer(open_server):
    port = urlsplit(open_server.url).port
    with open_server.client() as c:
        for host in (f"evil.example:{port}", "evil.example", f"127.0.0.1.evil.example:{port}"):
            r = c.get("/collections", headers={"Host": host})
            assert r.status_code == 403 and "host" in r.json()["detail"] and "UNIADAPTER_ALLOWED_HOSTS" in r.text
            assert c.post("/adapters/ret-a/pin", headers={"Host": host}).status_code == 403
            assert c.get("/readyz", headers={"Host": host}).status_code == 200  # probes: no data, any host
        assert c.get("/collections", headers={"Host": f"localhost:{port}"}).status_code == 200
        assert c.get("/adapters/ret-a").json()["pinned"] is False
