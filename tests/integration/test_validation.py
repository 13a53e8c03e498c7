"""One validation for every encoding, in-process (support.asgi: the session's blip-tiny app; the malformed
Content-Length, which uvicorn refuses before the app, on the real session server): item ids, metadata and filters
get the same rules as JSON and as multipart fields (depth, size, characters), names match whole strings, every
header and query value the service parses is bounded; each nasty case gets a 4xx naming the field and changes
nothing. Rows stored before these rules held (metadata nested 600 deep, lone surrogates) still list, read and
search."""

from __future__ import annotations

import base64
import json
import socket
import sqlite3
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
import pytest
from support.asgi import running_app
from support.keys import ADMIN_KEY, READ_KEY
from support.media import image_bytes

COLL = "val-img"
PNG = image_bytes((200, 30, 30))
BLUE = image_bytes((30, 30, 200))
Q = "a red picture"
DEEP = 200_000


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def nest(n: int) -> str:
    """JSON text of an object nested n levels deep ({"a": ... [[]] ...}: lists keep 200,000 levels in 400 KB)."""
    return '{"a":' + "[" * (n - 1) + "]" * (n - 1) + "}"


def nest_objects(n: int) -> dict[str, Any]:
    value: dict[str, Any] = {"leaf": 1}
    for _ in range(n - 1):
        value = {"a": value}
    return value


@pytest.fixture
def client(tiny_client):
    return tiny_client


@pytest.fixture
def admin(tiny_admin):
    return tiny_admin


@pytest.fixture(scope="module")
def coll(tiny_app):
    with tiny_app.client(ADMIN_KEY) as admin:
        _fill(admin)
    return COLL


def _fill(admin: httpx.Client) -> None:
    r = admin.post("/collections", json={"name": COLL, "kind": "image", "adapter": "ret-a"})
    assert r.status_code == 201, r.text
    r = admin.post(f"/collections/{COLL}/items", json={"items": [
        {"id": "one", "image": b64(PNG), "metadata": {"caption": "a red one", "deep": nest_objects(31)}}]})
    assert r.status_code == 201, r.text
    r = admin.post(f"/collections/{COLL}/items", files=[("files", ("two.png", BLUE, "image/png"))],
                   data={"ids": "dir/two", "metadata": json.dumps([{"caption": "a blue one"}])})
    assert r.status_code == 201, r.text
    assert admin.post("/collections", json={"name": "val-txt", "kind": "text", "adapter": "ret-a"}).status_code == 201


def snapshot(c: httpx.Client) -> tuple[Any, ...]:
    """What a client can see of the collection: its items, their metadata, one read and a search."""
    page = c.get(f"/collections/{COLL}/items", params={"limit": 100})
    assert page.status_code == 200, page.text
    one = c.get(f"/collections/{COLL}/items/dir%2Ftwo")
    assert one.status_code == 200, one.text
    hits = c.post("/retrieve", json={"query_text": Q, "collection": COLL, "top_k": 5})
    assert hits.status_code == 200, hits.text
    names = sorted(c.get("/collections").json(), key=lambda s: s["name"])
    return (page.json()["items"], one.json(), [h["id"] for h in hits.json()["results"]],
            [(s["name"], s["items"]) for s in names])


def raw_json(text: str) -> dict[str, Any]:
    """A body of JSON text json.dumps cannot write (NaN, a lone surrogate escape, 200,000 levels)."""
    return {"content": text.encode(), "headers": {"content-type": "application/json"}}


def add_json(item: dict[str, Any], raw: str | None = None) -> dict[str, Any]:
    if raw is not None:
        return raw_json('{"items":[{"image":"' + b64(PNG) + '","metadata":' + raw + "}]}")
    return {"json": {"items": [{"image": b64(PNG), **item}]}}


def form(**fields: str) -> dict[str, Any]:
    """A multipart body of text fields only (httpx sends `data` alone urlencoded)."""
    parts = [f'--zz\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n' for k, v in fields.items()]
    return {"content": ("".join(parts) + "--zz--\r\n").encode(),
            "headers": {"content-type": "multipart/form-data; boundary=zz"}}


def add_form(filename: str = "x.png", **data: str) -> dict[str, Any]:
    return {"files": [("files", (filename, PNG, "image/png"))], "data": data}


ITEMS = f"/collections/{COLL}/items"
CASES: dict[str, tuple[str, dict[str, Any], int, str]] = {
    # item ids: the same rule in both encodings
    "json id with NUL": (ITEMS, add_json({"id": "a\x00b"}), 422, "items.0.id: an id holds no control"),
    "form id with NUL": (ITEMS, add_form(ids="a\x00b"), 422, "ids[0]: an id holds no control"),
    "json id of 900 KB": (ITEMS, add_json({"id": "x" * 900_000}), 422, "items.0.id: String should have at most 256"),
    "form id of 900 KB": (ITEMS, add_form(ids="x" * 900_000), 422, "ids[0]: String should have at most 256"),
    "json id of 257": (ITEMS, add_json({"id": "é" * 257}), 422, "items.0.id"),
    "form id of 257": (ITEMS, add_form(ids="é" * 257), 422, "ids[0]"),
    "json id with final newline": (ITEMS, add_json({"id": "one\n"}), 422, "items.0.id: an id holds no control"),
    "form id with final newline": (ITEMS, add_form(ids="one\n"), 422, "ids[0]: an id holds no control"),
    "json id '..'": (ITEMS, add_json({"id": ".."}), 422, "items.0.id: '..' is not an id"),
    "form id '.'": (ITEMS, add_form(ids="."), 422, "ids[0]: '.' is not an id"),
    "json id ending /media": (ITEMS, add_json({"id": "one/media"}), 422, "items.0.id: an id cannot end in"),
    "form id ending /thumbnail": (ITEMS, add_form(ids="one/thumbnail"), 422, "ids[0]: an id cannot end in"),
    "json id U+2028": (ITEMS, add_json({"id": "a\u2028b"}), 422, "items.0.id"),
    "form id C1 control": (ITEMS, add_form(ids="a\x85b"), 422, "ids[0]"),
    # metadata: one depth and size limit in both encodings; the parser's own nesting limit in both
    "json metadata 33 deep": (ITEMS, add_json({"metadata": nest_objects(33)}), 422,
                              "items.0.metadata: nested more than 32 levels deep"),
    "form metadata 33 deep": (ITEMS, add_form(metadata=json.dumps([nest_objects(33)])), 422,
                              "metadata[0]: nested more than 32 levels deep"),
    "json metadata 600 deep": (ITEMS, add_json({}, nest(600)), 400, "recursion limit exceeded"),
    "form metadata 600 deep": (ITEMS, add_form(metadata=f"[{nest(600)}]"), 422,
                               "metadata: not valid JSON (recursion limit exceeded"),
    "json metadata 200,000 deep": (ITEMS, add_json({}, nest(DEEP)), 400, "JSON nests at most 200 levels"),
    "form metadata 200,000 deep": (ITEMS, add_form(metadata=f"[{nest(DEEP)}]"), 422,
                                   "metadata: not valid JSON (recursion limit exceeded"),
    "json metadata of 70 KB": (ITEMS, add_json({"metadata": {"s": "x" * 70_000}}), 422,
                               "items.0.metadata: over 65536 bytes"),
    "form metadata of 70 KB": (ITEMS, add_form(metadata=json.dumps([{"s": "x" * 70_000}])), 422,
                               "metadata[0]: over 65536 bytes"),
    "form file name over the limit": (ITEMS, add_form(filename="n" * 3000 + ".png", metadata=json.dumps(
        [{"s": "x" * 63_000}])), 422,
                                "metadata[0] with files[0]'s name: over 65536 bytes"),
    "json metadata NaN": (ITEMS, add_json({}, '{"x": NaN}'), 422, "items.0.metadata: nan is not"),
    "form metadata NaN": (ITEMS, add_form(metadata='[{"x": NaN}]'), 422, "metadata[0]: nan is not a JSON number"),
    "json metadata lone surrogate": (ITEMS, add_json({}, '{"x": "\\ud800"}'), 400, "malformed JSON"),
    "form metadata lone surrogate": (ITEMS, add_form(metadata='[{"x": "\\ud800"}]'), 422,
                                     "metadata: not valid JSON"),
    "form metadata not a list": (ITEMS, add_form(metadata='{"a": 1}'), 422, "metadata: Input should be a valid array"),
    "form charset utf-7": (ITEMS, {"content": b"--zz\r\nContent-Disposition: form-data; name=\"ids\"\r\n\r\n+2AA-"
                                   b"\r\n--zz\r\nContent-Disposition: form-data; name=\"files\"; filename=\"x.png\"\r\n"
                                   b"Content-Type: image/png\r\n\r\n" + PNG + b"\r\n--zz--\r\n",
                                   "headers": {"content-type": "multipart/form-data; charset=utf-7; boundary=zz"}},
                           415, "multipart charset 'utf-7'"),
    "form with no boundary": (ITEMS, {"content": b"--x\r\n", "headers": {"content-type": "multipart/form-data; "
                                                                                        "boundary="}}, 400, ""),
    "json in utf-16": (ITEMS, {"content": json.dumps({"items": []}).encode("utf-16"),
                               "headers": {"content-type": "application/json; charset=utf-16"}}, 400, "malformed"),
    "json text with NUL": ("/collections/val-txt/items", {"json": {"items": [{"text": "a red\x00one"}]}}, 422,
                           "items.0.text: a text holds no NUL"),
    # filters: JSON in a form field parsed as JSON bodies are
    "json filter 200,000 deep": ("/retrieve", raw_json('{"query_text":"red","collection":"' + COLL + '","filter":'
                                                      + nest(DEEP) + "}"), 400, "recursion limit"),
    "form filter 200,000 deep": ("/retrieve", form(query_text="red", collection=COLL, filter=nest(DEEP)), 422,
                                 "filter: not valid JSON (recursion limit exceeded"),
    "json filter of 70 KB": ("/retrieve", {"json": {"query_text": "red", "collection": COLL, "filter": {
        "metadata": {f"k{i}": "v" * 100 for i in range(700)}}}}, 422, "filter.metadata: over 65536"),
    "form filter of 70 KB": ("/retrieve", form(query_text="red", collection=COLL, filter=json.dumps(
        {"metadata": {f"k{i}": "v" * 100 for i in range(700)}})), 422, "filter.metadata: over 65536"),
    "form filter NaN": ("/retrieve", form(query_text="red", collection=COLL, filter='{"metadata": {"x": NaN}}'), 422,
                        "filter.metadata: nan is not a JSON number"),
    # names match whole strings
    "collection name with final newline": ("/collections", {"json": {"name": "val-img\n", "kind": "image"}}, 422,
                                           "invalid collection name 'val-img\\n'"),
    "adapter name with final newline": ("/retrieve", {"json": {"query_text": "red", "collection": COLL,
                                                               "adapter": "ret-a\n"}}, 404, "invalid adapter name"),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_each_nasty_field_gets_a_4xx_naming_it_and_changes_nothing(admin, coll, case):
    path, kwargs, status, message = CASES[case]
    before = snapshot(admin)
    r = admin.post(path, **kwargs)
    assert r.status_code == status, r.text[:500]
    body = r.json()
    assert set(body) == {"error", "detail"} and message in body["detail"], body
    assert snapshot(admin) == before


@pytest.mark.parametrize("encoding", ["json", "form"])
def test_ids_with_slashes_and_any_printable_text_add_read_and_delete(admin, client, coll, encoding):
    ids = [f"{encoding}/a b/ü", f"{encoding}-" + "字" * 251]
    if encoding == "json":
        r = admin.post(ITEMS, json={"items": [{"id": ids[0], "image": b64(PNG)}, {"id": ids[1], "image": b64(BLUE)}]})
    else:
        r = admin.post(ITEMS, files=[("files", ("a.png", PNG, "image/png")), ("files", ("b.png", BLUE, "image/png"))],
                       data={"ids": ids})
    assert r.status_code == 201 and r.json()["ids"] == ids, r.text
    for item_id in ids:
        got = client.get(f"{ITEMS}/{quote(item_id, safe='')}")
        assert got.status_code == 200 and got.json()["id"] == item_id, got.text
        assert client.get(got.json()["media_url"]).status_code == 200
        assert admin.delete(f"{ITEMS}/{quote(item_id, safe='')}").status_code == 204
        assert client.get(f"{ITEMS}/{quote(item_id, safe='')}").status_code == 404
    assert admin.delete(f"{ITEMS}/{quote(ids[0], safe='')}").status_code == 404


def test_an_id_with_nul_is_found_nowhere(admin, client, coll):
    for r in (client.get(f"{ITEMS}/a%00b"), client.get(f"{ITEMS}/a%00b/media"), admin.delete(f"{ITEMS}/a%00b")):
        assert r.status_code == 404 and "NUL" in r.json()["detail"], r.text


def test_a_name_with_a_final_newline_is_never_created(admin, coll):
    admin.post("/collections", json={"name": "val-new\n", "kind": "image", "adapter": "ret-a"})
    assert "val-new\n" not in [s["name"] for s in admin.get("/collections").json()]
    assert admin.get("/collections/val-new%0A").status_code == 404


MEDIA = f"{ITEMS}/one/media"


@pytest.mark.parametrize(("header", "status", "span"), [
    ("bytes=" + "9" * 5000 + "-", 416, None),
    ("bytes=" + "9" * 5000 + "-" + "9" * 5000, 416, None),
    ("bytes=0-" + "9" * 5000, 206, (0, len(PNG) - 1)),
    ("bytes=-" + "9" * 5000, 206, (0, len(PNG) - 1)),
    ("bytes=" + "0" * 5000 + "3-" + "0" * 5000 + "9", 206, (3, 9)),
    ("bytes=\u0663-9".encode(), 200, None),  # not ASCII digits: malformed, ignored
    ("bytes=0-1," * 500 + "0-1", 200, None),  # several ranges: ignored
])
def test_range_values_of_any_length_are_bounded(client, coll, header, status, span):
    r = client.get(MEDIA, headers={"Range": header})
    assert r.status_code == status, r.text[:300]
    if status == 416:
        assert r.json()["error"] == "RangeNotSatisfiable" and r.headers["content-range"] == f"bytes */{len(PNG)}"
    elif span is not None:
        assert r.content == PNG[span[0]:span[1] + 1]
        assert r.headers["content-range"] == f"bytes {span[0]}-{span[1]}/{len(PNG)}"
    else:
        assert r.content == PNG


@pytest.mark.parametrize(("path", "params", "field"), [
    (f"{ITEMS}/one/thumbnail", {"size": "9" * 5000}, "size"),
    (f"{ITEMS}/one/thumbnail", {"size": "-" + "9" * 30}, "size"),
    (ITEMS, {"cursor": "9" * 5000}, "cursor"),
    (ITEMS, {"limit": "9" * 5000}, "limit"),
    (ITEMS, {"cursor": "1e400"}, "cursor"),
])
def test_query_values_of_any_length_get_422_naming_them(client, coll, path, params, field):
    r = client.get(path, params=params)
    assert r.status_code == 422 and field in r.json()["detail"], r.text[:300]


def test_other_headers_of_any_size_or_bytes(tiny_app, client, coll):
    etag = client.get(MEDIA).headers["etag"]
    assert client.get(MEDIA, headers={"If-None-Match": '"x", ' * 1500 + etag}).status_code == 304
    assert client.get(MEDIA, headers={"If-None-Match": b"\xff\xfe\x00"[:2] * 2000}).status_code == 200
    for headers in ({"Authorization": "Bearer " + "k" * 8000}, {"Authorization": b"Bearer \xff\xfe\x80"},
                    {"Authorization": "Bearer"}, {"X-API-Key": b"\xc3\x28" * 1000}, {"X-API-Key": ""}):
        with tiny_app.client() as anon:
            r = anon.get(f"/collections/{COLL}/items", headers=headers)
        assert r.status_code in (401, 403) and r.json()["error"] == "AuthError", (headers, r.text)
    with tiny_app.client() as anon:
        assert anon.get(f"/collections/{COLL}/items",
                        headers={"Authorization": f"Bearer {READ_KEY}"}).status_code == 200


def test_a_content_length_that_is_not_a_number_is_refused(server):
    url = urlsplit(server.url)
    with socket.create_connection((url.hostname, url.port), timeout=30) as s:
        s.sendall(f"POST {ITEMS} HTTP/1.1\r\nHost: x\r\nX-API-Key: {ADMIN_KEY}\r\nContent-Type: application/json\r\n"
                  "Content-Length: 12abc\r\n\r\n{}".encode())
        head = s.recv(200)
    assert head.startswith(b"HTTP/1.1 400"), head


# -- rows stored before these rules held -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def legacy(tiny_app, tmp_path_factory):
    """An app whose store holds rows no add accepts now (metadata 600 deep, a lone surrogate), written into its
    SQLite file while it was stopped, as an older version could have stored them."""
    root = tmp_path_factory.mktemp("legacy-data")
    (root / "adapters").symlink_to(tiny_app.data_root / "adapters")
    with running_app(root, backbone="blip-tiny") as srv, srv.client() as c:
        assert c.post("/collections", json={"name": "old", "kind": "image", "adapter": "ret-a"}).status_code == 201
        r = c.post("/collections/old/items", json={"items": [
            {"id": "deep", "image": b64(PNG)}, {"id": "odd", "image": b64(BLUE)},
            {"id": "fine", "image": b64(image_bytes((30, 200, 30))), "metadata": {"caption": "green"}}]})
        assert r.status_code == 201, r.text
    stores = list(root.rglob("items.sqlite"))
    assert len(stores) == 1, stores
    with sqlite3.connect(stores[0]) as db:
        db.execute("UPDATE items SET metadata = ? WHERE external_id = 'deep'", ('{"a":' * 600 + "1" + "}" * 600,))
        db.execute("UPDATE items SET metadata = ? WHERE external_id = 'odd'", ('{"x": "\\ud800"}',))
    with running_app(root, backbone="blip-tiny") as srv:
        yield srv


def test_stored_metadata_that_cannot_be_sent_never_breaks_a_read(legacy, caplog):
    with legacy.client() as c:
        page = c.get("/collections/old/items")
        assert page.status_code == 200, page.text
        rows = {it["id"]: it for it in page.json()["items"]}
        assert rows["fine"]["metadata"] == {"caption": "green"} and rows["fine"]["metadata_error"] is None
        assert rows["deep"]["metadata"] == {} and "nested more than 200" in rows["deep"]["metadata_error"]
        assert rows["odd"]["metadata"] == {} and "lone surrogate" in rows["odd"]["metadata_error"]
        for item_id in ("deep", "odd"):
            one = c.get(f"/collections/old/items/{item_id}")
            assert one.status_code == 200 and one.json()["metadata_error"], one.text
        hits = c.post("/retrieve", json={"query_text": Q, "collection": "old", "top_k": 3})
        assert hits.status_code == 200, hits.text
        assert {h["id"]: h["metadata_error"] is not None for h in hits.json()["results"]} == {
            "deep": True, "odd": True, "fine": False}
        assert c.delete("/collections/old/items/deep").status_code == 204
        assert [it["id"] for it in c.get("/collections/old/items").json()["items"]] == ["odd", "fine"]
    assert not [r for r in caplog.records if r.exc_info], "a traceback in the app's log"
