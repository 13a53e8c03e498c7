"""What every response tells a browser, in-process (support.asgi, the session's blip-tiny app): nosniff, frame
protection and a CSP on a response of every route of the app's table (and on errors, static files, docs, media
ranges), the page's own CSP, Swagger UI's inline script allowed by its hash only, and a Content-Disposition on media
that no item id can break out of."""

from __future__ import annotations

import base64
import hashlib
import re
from urllib.parse import quote, unquote

import httpx
import pytest
from support.keys import ADMIN_KEY
from support.media import image_bytes

from uniadapter_serve.service.app import create_app
from uniadapter_serve.service.auth import guards
from uniadapter_serve.service.settings import Settings

HOSTILE_ID = 'sub/ré"vil; name=x.html\\ \u202e'  # quotes, ';', a backslash, non-ASCII, a bidi override
MOUNT_FILES = {"/static": "/static/app.js", "/docs-static": "/docs-static/swagger-ui.css"}


@pytest.fixture(scope="module")
def stored(tiny_app):
    with tiny_app.client(ADMIN_KEY) as admin:
        assert admin.post("/collections", json={"name": "hdr-media", "kind": "image", "adapter": "ret-a"}
                          ).status_code == 201
        r = admin.post("/collections/hdr-media/items", json={"items": [
            {"id": HOSTILE_ID, "image": base64.b64encode(image_bytes()).decode()}]})
        assert r.status_code == 201, r.text
    return f"/collections/hdr-media/items/{quote(HOSTILE_ID, safe='')}"


def assert_protected(r: httpx.Response) -> None:
    where = f"{r.request.method} {r.request.url.path} -> {r.status_code}"
    assert r.headers.get("x-content-type-options") == "nosniff", where
    assert r.headers.get("x-frame-options") == "DENY", where
    assert "frame-ancestors 'none'" in r.headers.get("content-security-policy", ""), where


def every_route_request() -> list[tuple[str, str]]:
    """(method, path) of one request per route of the app's table: reads at stored objects, writes at absent ones
    (they answer 4xx and change nothing), mounts at a file they serve."""
    table = guards(create_app(Settings(_env_prefix="UNIADAPTER_TEST_IGNORED_")).router.routes)  # type: ignore[call-arg]
    out = []
    for g in table:
        template = g.path
        if g.methods is None:
            out.append(("GET", MOUNT_FILES[template]))
            continue
        for method in sorted(g.methods):
            read = method in ("GET", "HEAD")
            params = {"name": "hdr-media" if read else "hdr-no-such", "ref": "ret-a" if read else "no-such-set",
                      "item_id": HOSTILE_ID}
            out.append((method, re.sub(r"\{(\w+)(?::\w+)?\}", lambda m, p=params: quote(p[m.group(1)], safe=""),
                                       template)))
    assert len(out) >= 25, out
    return out


def test_a_response_of_every_route_and_every_kind_carries_the_headers(tiny_app, stored):
    with tiny_app.client() as anon, tiny_app.client(ADMIN_KEY) as admin:
        for method, path in every_route_request():
            r = admin.request(method, path)
            assert r.status_code < 500, (method, path, r.text)
            assert_protected(r)
        media = admin.get(f"{stored}/media")
        etag = media.headers["etag"]
        responses = [
            anon.get("/collections"),  # 401 from the auth middleware
            admin.get("/no/such/route"), admin.put("/collections/x"),  # 404, 405
            admin.post("/vqa", content=b"{", headers={"content-type": "application/json"}),  # 400
            admin.post("/vqa", content=b"\0" * 3_000_000),  # 413 from the body limit
            admin.post("/retrieve", json={"top_k": "x"}),  # 422
            admin.get(f"{stored}/media", headers={"Range": "bytes=0-9"}),  # 206
            admin.get(f"{stored}/media", headers={"If-None-Match": etag}),  # 304
            admin.get(f"{stored}/media", headers={"Range": "bytes=999999-"}),  # 416
            admin.get(f"{stored}/thumbnail?size=64"),
            admin.get("/docs"), admin.get("/redoc"), admin.get("/openapi.json"), admin.get("/static/app.css"),
            admin.get("/docs-static/swagger-ui-bundle.js"), admin.get("/static/no-such.js"),
        ]
        assert [r.status_code for r in responses] == [401, 404, 405, 400, 413, 422, 206, 304, 416, 200, 200, 200,
                                                      200, 200, 200, 404]
        for r in responses:
            assert_protected(r)


def test_the_page_has_its_own_csp_without_inline_script(tiny_app):
    with tiny_app.client() as anon:
        r = anon.get("/")
    assert r.status_code == 200
    csp = dict(part.strip().split(" ", 1) for part in r.headers["content-security-policy"].split(";"))
    assert csp["frame-ancestors"] == "'none'" and csp["default-src"] == "'none'"
    assert csp["script-src"] == "'self'" and csp["style-src"] == "'self'"  # no 'unsafe-inline', no other host
    assert csp["connect-src"] == "'self'" and "blob:" in csp["img-src"] and "blob:" in csp["media-src"]
    assert r.headers["x-frame-options"] == "DENY" and r.headers["x-content-type-options"] == "nosniff"
    assert re.search(r"<script>|<script [^>]*>[^<\s]|\son\w+=", r.text) is None  # the page has no inline code


def test_the_docs_allow_exactly_their_inline_script(tiny_app):
    with tiny_app.client() as anon:
        r = anon.get("/docs")
    inline = re.findall(r"<script>(.*?)</script>", r.text, re.S)
    assert len(inline) == 1
    digest = base64.b64encode(hashlib.sha256(inline[0].encode()).digest()).decode()
    script_src = re.search(r"script-src ([^;]*)", r.headers["content-security-policy"])
    assert script_src is not None and script_src.group(1) == f"'self' 'sha256-{digest}'"
    assert "frame-ancestors 'none'" in r.headers["content-security-policy"]


def test_media_is_served_with_a_content_disposition_no_id_can_break(tiny_app, stored):
    with tiny_app.client(ADMIN_KEY) as admin:
        for r in (admin.get(f"{stored}/media"), admin.get(f"{stored}/media", headers={"Range": "bytes=0-9"})):
            value = r.headers["content-disposition"]
            assert r.headers["content-type"] == "image/png" and value.isascii()
            kind, name, encoded = (part.strip() for part in value.split(";"))
            assert kind == "inline" and re.fullmatch(r'filename="[A-Za-z0-9._-]+\.png"', name), value
            assert encoded.startswith("filename*=UTF-8''")
            assert unquote(encoded.removeprefix("filename*=UTF-8''")) == HOSTILE_ID.rsplit("/", 1)[-1] + ".png"
        assert "content-disposition" not in admin.get(f"{stored}").headers  # the item's JSON: no attachment
