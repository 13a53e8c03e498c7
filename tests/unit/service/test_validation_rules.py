"""The id, name and JSON-value rules of service/validation.py: the OpenAPI patterns mean what the server checks
(read as ECMA-262 by a JSON-schema validator), the limits sit where pydantic-core's own are, any depth is
measured without recursion, and Range positions of any length are bounded."""

from __future__ import annotations

import json

import pydantic_core
import pytest

from uniadapter_serve.adapters.registry import NAME_RE, parse_ref
from uniadapter_serve.errors import AdapterNotFoundError
from uniadapter_serve.service.collections.item_files import RangeNotSatisfiable, parse_range
from uniadapter_serve.service.schemas import NAME_PATTERN, ItemInfo, ItemPage
from uniadapter_serve.service.validation import (
    ITEM_ID_PATTERN,
    JSON_MAX_DEPTH,
    METADATA_MAX_DEPTH,
    READ_MAX_DEPTH,
    id_problem,
    json_problem,
)

IDS = ["abc", "a/b", "/x", "x/", "a//b", "é/ü 字", "\U0001f600", " ", "...", "a/..", "../a", "media", "a/media/x",
       "x" * 256, "x" * 257, "", "a\n", "\na", "a\r", "a\x00b", "\x00", "a\x7f", "a\x85", "a\u2028b", "a\u2029",
       ".", "..", "a/media", "a/thumbnail", "/media", "é" * 256, "é" * 257, "a\t"]
NAMES = ["demo-images", "demo-images\n", "\ndemo", ".x", "-x", "x.y_z-1", "a" * 64, "a" * 65, "a b", "ü", "", "a\x00"]


def ecma(pattern: str):
    """The pattern as a JSON-schema validator reads it (ECMA-262 semantics; `$` is the end of the string)."""
    jsonschema_rs = pytest.importorskip("jsonschema_rs")
    return jsonschema_rs.Draft202012Validator({"type": "string", "pattern": pattern}).is_valid


@pytest.mark.parametrize("value", IDS, ids=[repr(v[:12]) for v in IDS])
def test_the_id_pattern_in_the_schema_is_the_servers_rule(value):
    assert ecma(ITEM_ID_PATTERN)(value) == (id_problem(value) is None)


@pytest.mark.parametrize("value", NAMES, ids=[repr(v[:12]) for v in NAMES])
def test_the_name_pattern_in_the_schema_is_the_servers_rule(value):
    accepted = ecma(NAME_PATTERN)(value)
    assert accepted == bool(NAME_RE.match(value)) == bool(NAME_RE.fullmatch(value)) == bool(NAME_RE.search(value))
    if not accepted:
        with pytest.raises(AdapterNotFoundError):
            parse_ref(value)


def test_ids_say_what_is_wrong():
    assert "257" in id_problem("x" * 257)
    assert "U+000A at position 3" in id_problem("one\n")
    assert "'..'" in id_problem("..")
    assert "/media" in id_problem("a/media")
    assert "surrogate" in id_problem("a\ud800")


def test_json_limits_sit_inside_pydantic_cores():
    pydantic_core.from_json("[" * JSON_MAX_DEPTH + "]" * JSON_MAX_DEPTH)
    with pytest.raises(ValueError, match="recursion limit"):
        pydantic_core.from_json("[" * (JSON_MAX_DEPTH + 2) + "]" * (JSON_MAX_DEPTH + 2))
    assert METADATA_MAX_DEPTH + 3 < JSON_MAX_DEPTH  # a JSON add body (items[i].metadata) reaches the metadata rule


def nested(levels: int) -> dict:
    value: dict = {}
    for _ in range(levels - 1):
        value = {"a": value}
    return value


def test_any_depth_is_measured_without_recursion():
    deep: list = []
    for _ in range(200_000):
        deep = [deep]
    assert "nested more than 32 levels" in json_problem({"a": deep}, max_depth=32, max_bytes=None)
    assert json_problem(nested(32), max_depth=32, max_bytes=None) is None
    assert "nested more than 32" in json_problem(nested(33), max_depth=32, max_bytes=None)


@pytest.mark.parametrize(("value", "problem"), [
    ({"x": float("nan")}, "not a JSON number"), ({"x": float("inf")}, "not a JSON number"),
    ({"x": "\ud800"}, "lone surrogate"), ({"\udc00": 1}, "lone surrogate"), ({"x": 10**5000}, "digits"),
    ({"x": b"bytes"}, "not a JSON value"), ({"x": "y" * 70_000}, "over 65536 bytes"),
    ({"x": list(range(1_000_000))}, "over 65536 bytes"), ({"x": "é" * 40_000}, "over 65536 bytes"),
])
def test_values_no_response_could_carry_are_named(value, problem):
    found = json_problem(value, max_depth=32, max_bytes=65536)
    assert found is not None and problem in found


def test_stored_metadata_too_deep_to_send_goes_out_empty_with_the_reason():
    ok = ItemInfo(id="a", kind="image", metadata=nested(READ_MAX_DEPTH), size=1, content_type=None, sha256=None,
                  added=0.0, adapter="none")
    bad = ItemInfo(id="b", kind="image", metadata=nested(600), size=1, content_type=None, sha256=None, added=0.0,
                   adapter="none")
    page = ItemPage(collection="c", items=[ok, bad], next_cursor=None)
    sent = page.model_dump(mode="json")  # pydantic-core serializes 255 levels at most: this must not raise
    assert sent["items"][0]["metadata_error"] is None and sent["items"][0]["metadata"] == nested(READ_MAX_DEPTH)
    assert sent["items"][1]["metadata"] == {} and "nested more than 200" in sent["items"][1]["metadata_error"]
    assert json.loads(page.model_dump_json())["items"][1]["metadata"] == {}


HUGE = "9" * 5000


@pytest.mark.parametrize(("header", "expected"), [
    ("bytes=2-9", (2, 9)), ("bytes=-4", (96, 99)), ("bytes=5-", (5, 99)), ("bytes=10-500", (10, 99)),
    ("bytes=9-2", None), ("bytes=0-1,5-6", None), ("bytes=x-", None), ("items=0-1", None), ("bytes=-", None),
    ("bytes=\u0663-9", None), (f"bytes=0-{HUGE}", (0, 99)), (f"bytes=-{HUGE}", (0, 99)),
    ("bytes=" + "0" * 5000 + "3-" + "0" * 5000 + "9", (3, 9)), (None, None), ("", None),
    (f"bytes={HUGE}-", RangeNotSatisfiable), (f"bytes={HUGE}-{HUGE}", RangeNotSatisfiable),
    ("bytes=100-", RangeNotSatisfiable), ("bytes=-0", RangeNotSatisfiable),
])
def test_range_positions_of_any_length(header, expected):
    if expected is RangeNotSatisfiable:
        with pytest.raises(RangeNotSatisfiable):
            parse_range(header, 100)
    else:
        assert parse_range(header, 100) == expected
