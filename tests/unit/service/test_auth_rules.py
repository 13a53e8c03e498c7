"""The auth table the middleware builds from the app's own routes, key checks on raw header bytes, the Origin/Host
rules and media Content-Disposition: pure functions, no server (tests/integration/test_auth.py runs them live)."""

from __future__ import annotations

import re
from urllib.parse import unquote

import pytest

from uniadapter_serve.service.app import create_app
from uniadapter_serve.service.auth import guards, presented, refusal, resolve
from uniadapter_serve.service.security import AllowedHosts, content_disposition, origin_refusal
from uniadapter_serve.service.settings import Settings

OPEN = {("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/metrics"), ("GET", "/"), ("GET", "/docs"),
        ("GET", "/redoc"), ("GET", "/openapi.json"), ("HEAD", "/openapi.json"), ("*", "/static"),
        ("*", "/docs-static")}
"""Every route that answers without a key: probes, the page, the docs. A new route lands here only by editing this."""


def table():
    return guards(create_app(Settings(_env_prefix="UNIADAPTER_UNIT_IGNORED_")).router.routes)  # type: ignore[call-arg]


def rows(level):
    """(method, path) of every route of this level; '*' for a mount (any method below its path)."""
    out = set()
    for g in table():
        if g.level == level:
            out |= {(m, g.path) for m in (sorted(g.methods) if g.methods is not None
                                                                     else ["*"])}
    return out


def test_every_write_route_is_admin_and_only_probes_page_and_docs_are_open():
    every = rows("open") | rows("read") | rows("admin")
    writes = {(m, p) for m, p in every if m in ("POST", "PUT", "PATCH", "DELETE")}
    assert writes - {("POST", "/vqa"), ("POST", "/videoqa"), ("POST", "/retrieve")} == rows("admin")
    plain = {(m, re.sub(r"\{(\w+):\w+\}", r"{\1}", p)) for m, p in rows("admin")}  # '{item_id:path}' -> '{item_id}'
    assert plain >= {("POST", f"/adapters/{{ref}}/{op}") for op in ("load", "unload", "pin", "unpin")} | {
        ("POST", "/adapters/{name}/publish"), ("POST", "/collections"), ("DELETE", "/collections/{name}"),
        ("POST", "/collections/{name}/items"), ("DELETE", "/collections/{name}/items/{item_id}"),
        ("POST", "/collections/{name}/reindex")}
    assert rows("open") == OPEN


def scope(method, path, query=b"", headers=()):
    return {"type": "http", "method": method, "path": path, "root_path": "", "query_string": query,
            "headers": list(headers)}


@pytest.mark.parametrize(("method", "path", "query", "level"), [
    ("GET", "/readyz", b"", "open"), ("GET", "/readyz", b"verbose=false", "open"),
    ("GET", "/readyz", b"verbose=true", "admin"), ("GET", "/readyz", b"verbose=1&verbose=0", "admin"),
    ("GET", "/readyz", b"verbose=maybe", "admin"), ("GET", "/readyz", b"Verbose=true", "open"),
    ("DELETE", "/collections/x", b"", "admin"), ("GET", "/collections/x", b"", "read"),
    ("PUT", "/collections/x", b"", "open"),  # no route: 405, nothing runs
    ("GET", "/collections/x/items/a/b/media", b"", "read"), ("DELETE", "/collections/x/items/a", b"", "admin"),
    ("POST", "/adapters/a@1/pin", b"", "admin"), ("POST", "/vqa", b"", "read"), ("GET", "/static/app.js", b"", "open"),
    ("GET", "/no/such", b"", "open"),
])
def test_each_request_gets_its_routes_level(method, path, query, level):
    assert resolve(table(), scope(method, path, query))[2] == level


def settings(**keys):
    return Settings(_env_prefix="UNIADAPTER_UNIT_IGNORED_", **keys)  # type: ignore[call-arg]


@pytest.mark.parametrize(("keys", "level", "given", "status", "says"), [
    ({}, "admin", None, None, ""),
    ({"api_key": "r"}, "admin", None, 403, "UNIADAPTER_ADMIN_KEY is not set"),
    ({"api_key": "r"}, "admin", b"r", 403, "UNIADAPTER_ADMIN_KEY is not set"),
    ({"api_key": "r"}, "read", b"r", None, ""),
    ({"api_key": "r", "admin_key": "a"}, "admin", None, 401, "missing admin key"),
    ({"api_key": "r", "admin_key": "a"}, "admin", b"r", 403, "needs the admin key"),
    ({"api_key": "r", "admin_key": "a"}, "admin", b"a", None, ""),
    ({"api_key": "r", "admin_key": "a"}, "read", b"a", None, ""),
    ({"api_key": "r", "admin_key": "a"}, "read", bytes(range(256)) * 300, 403, "wrong API key"),
    ({"admin_key": "a"}, "read", None, None, ""),
    ({"api_key": "r"}, "open", None, None, ""),
    ({"api_key": "clé"}, "read", "clé".encode(), None, ""),  # a UTF-8 key matches its UTF-8 bytes
])
def test_key_rules_fail_closed(keys, level, given, status, says):
    error = refusal(level, given, settings(**keys))
    assert (error.status if error else None) == status
    assert says in (str(error) if error else "")


@pytest.mark.parametrize(("headers", "key"), [
    ([(b"authorization", b"Bearer  k ")], b"k"), ([(b"Authorization", b"bearer k")], b"k"),
    ([(b"x-api-key", b"k")], b"k"), ([(b"authorization", b"Basic zzz"), (b"x-api-key", b"k")], b"k"),
    ([(b"authorization", b"Bearer \xff\xfe")], b"\xff\xfe"), ([], None),
])
def test_presented_key_is_raw_bytes(headers, key):
    assert presented(headers) == key


HOSTS = AllowedHosts.from_settings(settings(host="10.1.2.3"))


@pytest.mark.parametrize(("headers", "allowed"), [
    ([], True), ([(b"host", b"127.0.0.1:8000")], True), ([(b"host", b"LOCALHOST")], True),
    ([(b"host", b"[::1]:8000")], True), ([(b"host", b"10.1.2.3:8000")], True),
    ([(b"host", b"evil.example:8000")], False), ([(b"host", b"localhost.evil.example")], False),
    ([(b"host", b"127.0.0.1:8000"), (b"origin", b"http://127.0.0.1:8000")], True),
    ([(b"host", b"127.0.0.1:8000"), (b"origin", b"http://localhost:8000")], True),
    ([(b"host", b"127.0.0.1:8000"), (b"origin", b"http://evil.example")], False),
    ([(b"host", b"127.0.0.1:8000"), (b"origin", b"null")], False),
    ([(b"host", b"127.0.0.1:8000"), (b"origin", b"http://127.0.0.1.evil.example")], False),
    ([(b"host", b"127.0.0.1:8000"), (b"origin", b"file://")], False),
    ([(b"host", b"[::1"), (b"origin", b"http://[::1")], False),  # does not parse: refused, not a 500
    ([(b"host", b"\xff\xfe" * 5000)], False),
])
def test_origin_and_host_rules(headers, allowed):
    reason = origin_refusal(headers, HOSTS)
    assert (reason is None) == allowed
    if reason is not None:
        assert "UNIADAPTER_ALLOWED_HOSTS" in reason and len(reason) < 600


def test_bound_wildcards_are_not_allowed_hosts_and_star_turns_the_check_off():
    assert AllowedHosts.from_settings(settings(host="0.0.0.0")).names == ("localhost", "127.0.0.1", "::1")
    assert origin_refusal([(b"host", b"evil.example")], AllowedHosts.from_settings(settings(allowed_hosts="*"))) \
        is None


@pytest.mark.parametrize(("item_id", "content_type", "kind", "name"), [
    ("scene-0001", "image/png", "inline", "scene-0001.png"),
    ("clip.mp4", "video/mp4", "inline", "clip.mp4"),
    ('dir/"a"; filename=x.exe\\', "image/jpeg", "inline", "a_filename_x.exe.jpg"),
    ("ünï cödé", "image/webp", "inline", "n_c_d.webp"),
    ("...", "application/octet-stream", "attachment", "media"),
])
def test_content_disposition_cannot_carry_a_header_or_a_parameter(item_id, content_type, kind, name):
    value = content_disposition(item_id, content_type)
    assert value.startswith(f'{kind}; filename="{name}"; filename*=UTF-8\'\'')
    assert value.isascii() and not any(c in value for c in "\r\n\0")
    assert value.count('"') == 2 and value.count(";") == 2
    encoded = value.split("filename*=UTF-8''", 1)[1]
    assert unquote(encoded).startswith(item_id.rsplit("/", 1)[-1])


def test_a_root_path_is_taken_off_as_the_router_does():
    assert resolve(table(), {**scope("DELETE", "/api/collections/x"), "root_path": "/api"})[2] == "admin"
    assert resolve(table(), {**scope("GET", "/api/readyz", b"verbose=on"), "root_path": "/api"})[2] == "admin"
