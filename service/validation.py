"""The rules for item ids and for JSON values clients store (metadata) or search with (filters), in one place.

JSON bodies and multipart forms go through the same checks: the JSON models use the annotated types below,
multipart routes validate their fields with `form_field` and parse JSON-in-a-form-field with `form_json` (the
parser JSON bodies use, pydantic-core's: its nesting limit of 200 holds for both, where the standard library's
`json.loads` recurses until RecursionError).
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, TypeVar

from pydantic import AfterValidator, Field, TypeAdapter, ValidationError

from uniadapter_serve.errors import InputError, NotFoundError

T = TypeVar("T")

JSON_MAX_DEPTH = 200
"""pydantic-core's nesting limit when it parses JSON (bodies, and JSON in form fields here): 400 past it."""
ITEM_ID_MAX = 256
_ID_CHAR = r"[^\x00-\x1f\x7f-\x9f\u2028\u2029]"
"""Any character but control characters (C0, DEL, C1) and line and paragraph separators: every character `.`
matches in both Python's and ECMA-262's regular expressions. (Lone surrogates, which no UTF-8 text holds, are
refused apart: a surrogate range is no regex to Rust-based schema validators.)"""
ITEM_ID_PATTERN = rf"^(?!\.\.?$)(?!.*/(media|thumbnail)$){_ID_CHAR}{{1,{ITEM_ID_MAX}}}$"
"""Item ids: 1-256 characters of printable text ('/' included); not '.' or '..' (a URL path segment that clients
remove) nor ending in '/media' or '/thumbnail' (the item's own routes would answer for another id). The same
string is the OpenAPI pattern (ECMA-262: no newline can match, so its `$` is the end of the string) and, with
`re.fullmatch`, the server's check."""
ITEM_ID_RE = re.compile(ITEM_ID_PATTERN)

METADATA_MAX_DEPTH = 32
"""Levels of nesting in an item's metadata ({"a": 1} is 1 level), whatever the encoding."""
METADATA_MAX_BYTES = 64 * 1024
"""Size of an item's metadata (or a filter's) as JSON text, about: bounded per item, whatever the body size."""
READ_MAX_DEPTH = 200
"""Stored metadata deeper than this is not sent back (pydantic-core refuses to serialize past 255 levels, and a
response adds a few of its own). Rows stored under the limits above never come near it."""
MAX_INT_DIGITS = 4300
"""Python's (and pydantic-core's) limit on the digits of an integer read from or written as text."""


def id_problem(value: str) -> str | None:
    """Why `value` is not a valid item id, or None."""
    if ITEM_ID_RE.fullmatch(value):
        return None if _utf8_size(value) is not None else "text that is not UTF-8 (a lone surrogate)"
    if not value or len(value) > ITEM_ID_MAX:
        return f"an id is 1-{ITEM_ID_MAX} characters (this one has {len(value)})"
    bad = next((i for i, c in enumerate(value) if not re.fullmatch(_ID_CHAR, c)), None)
    if bad is not None:
        return f"an id holds no control characters or line breaks (U+{ord(value[bad]):04X} at position {bad})"
    if value in (".", ".."):
        return f"{value!r} is not an id (a URL path segment clients remove)"
    return "an id cannot end in '/media' or '/thumbnail' (the item's media and thumbnail routes)"


def _check_id(value: str) -> str:
    problem = id_problem(value)
    if problem is not None:
        raise ValueError(problem)
    return value


def lookup_id(value: str) -> str:
    """An item id from a URL, to look up; NotFoundError for one holding NUL, which no store can hold (PostgreSQL
    text refuses it: the query itself would fail). Other ids are looked up as given: items stored before these
    rules held stay reachable."""
    if "\x00" in value:
        raise NotFoundError(f"no item {value[:80]!r}: ids hold no NUL characters")
    return value


ItemId = Annotated[str, Field(min_length=1, max_length=ITEM_ID_MAX, json_schema_extra={"pattern": ITEM_ID_PATTERN}),
                   AfterValidator(_check_id)]


STORED_TEXT_PATTERN = r"^[^\x00]*\w[^\x00]*$"
"""A text item: a word, and no NUL (PostgreSQL text cannot hold one)."""


def _check_stored_text(value: str) -> str:
    if "\x00" in value:
        raise ValueError(f"a text holds no NUL characters (one at position {value.index(chr(0))})")
    return value


StoredText = Annotated[str, Field(min_length=1, json_schema_extra={"pattern": STORED_TEXT_PATTERN}),
                       AfterValidator(_check_stored_text)]


def json_problem(value: Any, *, max_depth: int, max_bytes: int | None) -> str | None:
    """What makes a JSON value unfit to store and send back, or None: nesting over `max_depth` levels, JSON
    text over `max_bytes` (about; None: no limit), numbers that are not finite or too long to write as text,
    strings that are not UTF-8 (lone surrogates). Iterative: any depth is measured without recursion."""
    stack: list[tuple[Any, str, int]] = [(value, "", 0)]
    size = 0
    while stack:
        node, at, depth = stack.pop()
        where = f" (at {at})" if at else ""
        if isinstance(node, dict | list):
            if depth + 1 > max_depth:
                return f"nested more than {max_depth} levels deep{where}"
            size += 2 + (4 if isinstance(node, dict) else 2) * len(node)  # brackets, ", " and ": "
            if max_bytes is not None and size > max_bytes:  # before a huge container is walked
                return f"over {max_bytes} bytes as JSON"
            if isinstance(node, list):
                stack.extend((child, f"{at}[{i}]", depth + 1) for i, child in enumerate(node))
                continue
            for key, child in node.items():
                inner = f"{at}.{str(key)[:40]}" if at else str(key)[:40]
                if not isinstance(key, str):
                    return f"keys are strings{where}"
                if (n := _utf8_size(key)) is None:
                    return f"text that is not UTF-8 (a lone surrogate) (in a key at {inner})"
                size += n + 2
                stack.append((child, inner, depth + 1))
        elif isinstance(node, str):
            if (n := _utf8_size(node)) is None:
                return f"text that is not UTF-8 (a lone surrogate){where}"
            size += n + 2
        elif isinstance(node, bool) or node is None:
            size += 5
        elif isinstance(node, int):
            digits = int(node.bit_length() * math.log10(2)) + 1
            if digits > MAX_INT_DIGITS:
                return f"an integer of over {MAX_INT_DIGITS} digits{where}"
            size += digits
        elif isinstance(node, float):
            if not math.isfinite(node):
                return f"{node} is not a JSON number{where}"
            size += 24
        else:
            return f"a {type(node).__name__} is not a JSON value{where}"
        if max_bytes is not None and size > max_bytes:
            return f"over {max_bytes} bytes as JSON"
    return None


def _utf8_size(text: str) -> int | None:
    """Bytes of `text` in UTF-8; None when it holds a lone surrogate (no UTF-8 text does)."""
    if text.isascii():
        return len(text)
    try:
        return len(text.encode())
    except UnicodeEncodeError:
        return None


def check_metadata(value: dict[str, T]) -> dict[str, T]:
    """`value` if it is within the metadata limits; ValueError saying why not (a pydantic after-validator)."""
    problem = json_problem(value, max_depth=METADATA_MAX_DEPTH, max_bytes=METADATA_MAX_BYTES)
    if problem is not None:
        raise ValueError(problem)
    return value


Metadata = Annotated[dict[str, Any], AfterValidator(check_metadata)]
"""An item's metadata, or a filter's: a JSON object within the limits above."""


def readable_metadata(value: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """Stored metadata as it can be sent back: itself, or {} and why (a row stored before the limits held)."""
    problem = json_problem(value, max_depth=READ_MAX_DEPTH, max_bytes=None)
    if problem is None:
        return value, None
    return {}, f"the stored metadata cannot be sent: {problem}; delete the item and add it again"


def json_error(why: str) -> str:
    """pydantic-core's words for unparsable JSON, naming the limit when it is the nesting one."""
    if "recursion limit" in why:
        return f"{why}: JSON nests at most {JSON_MAX_DEPTH} levels; an item's metadata {METADATA_MAX_DEPTH}"
    return why


def _message(error: ValidationError, field: str) -> str:
    parts = []
    for e in error.errors():
        loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e.get("loc", ()))
        msg = str(e.get("msg", "invalid"))
        parts.append(f"{field}{loc}: {msg.removeprefix('Value error, ')}")
    return "; ".join(parts)


def form_field(adapter: TypeAdapter[T], value: object, field: str) -> T:
    """A multipart field validated by the rule of its JSON twin; InputError (422) naming the field."""
    try:
        return adapter.validate_python(value)
    except ValidationError as e:
        raise InputError(_message(e, field)) from None


def form_json(adapter: TypeAdapter[T], text: str, field: str) -> T:
    """JSON text in a multipart field, parsed as JSON bodies are (pydantic-core: nesting limit, UTF-8) and
    validated by `adapter`; InputError (422) naming the field."""
    try:
        return adapter.validate_json(text)
    except ValidationError as e:
        if any(err.get("type") == "json_invalid" for err in e.errors()):
            detail = json_error(str(e.errors()[0].get("ctx", {}).get("error", e.errors()[0].get("msg"))))
            raise InputError(f"{field}: not valid JSON ({detail})") from None
        raise InputError(_message(e, field)) from None
