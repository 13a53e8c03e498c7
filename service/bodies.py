"""One body, two encodings: JSON with base64 media, or multipart with files (Swagger's file picker).

Routes declare both in OpenAPI (`body_openapi`) and parse with `parse_body`, which returns the
validated model and the media bytes, whatever the encoding.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import copy
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError
from python_multipart.multipart import parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile

from uniadapter_serve.errors import CorruptMediaError, UnsupportedMediaTypeError
from uniadapter_serve.service.validation import json_error

M = TypeVar("M", bound=BaseModel)
FILE_PLACEHOLDER = "(file)"
BODY_MODELS: list[type[BaseModel]] = []
"""Models used as request bodies; their schemas are added to the OpenAPI components."""
FORM_CHARSETS = frozenset({"utf-8", "ascii", "iso8859-1"})
"""Charsets a multipart body may declare for its fields (Python codec names). Starlette decodes fields with any
codec the client names, and some (utf-7, unicode_escape) yield lone surrogates, which no response can carry."""


@dataclass
class Upload:
    data: bytes
    content_type: str | None
    filename: str | None = None


def component_ref(model: type[BaseModel]) -> dict[str, str]:
    """A $ref to `model` in the OpenAPI components (added there, with the models it uses, by the app)."""
    if model not in BODY_MODELS:
        BODY_MODELS.append(model)
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def body_openapi(model: type[BaseModel], media_fields: dict[str, bool],
                 example: dict[str, Any] | None = None) -> dict[str, Any]:
    """`openapi_extra` declaring JSON and multipart bodies; media_fields: name -> is a list; `example`:
    the JSON body Swagger's "Try it out" starts from."""
    ref = component_ref(model)
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    form = copy.deepcopy(schema)
    form.pop("title", None)
    for prop in form["properties"].values():  # a form field is omitted, never null
        branches = [b for b in prop.pop("anyOf", []) if b.get("type") != "null"]
        if branches:
            prop.update(branches[0])
        if prop.get("default", 0) is None:
            del prop["default"]
    for name, is_list in media_fields.items():
        binary = {"type": "string", "format": "binary"}
        form["properties"][name] = {"type": "array", "items": binary, "minItems": 1} if is_list else binary
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": ref,
                                     **({"example": example} if example is not None else {})},
                "multipart/form-data": {"schema": form},
            },
        }
    }


def b64decode(value: str, field: str) -> bytes:
    """Base64 (optionally a data: URL) -> bytes; undecodable media (400) when it is not base64."""
    text = value.split(",", 1)[1] if value.startswith("data:") and "," in value else value
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise CorruptMediaError(f"{field}: not valid base64 ({e})") from e


async def parse_body(request: Request, model: type[M], media_fields: dict[str, bool],
                     list_fields: tuple[str, ...] = ()) -> tuple[M, dict[str, list[Upload]]]:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    media: dict[str, list[Upload]] = {}
    if content_type == "application/json":
        body = await request.body()
        # parsing and base64-decoding megabytes of media is CPU work: keep it off the event loop
        return await run_in_threadpool(_parse_json, body, model, media_fields)
    if content_type == "multipart/form-data":
        form = await read_form(request)
        fields: dict[str, Any] = {}
        for key in form:
            if key in media_fields:
                uploads = [u for u in form.getlist(key) if isinstance(u, UploadFile)]
                media[key] = [Upload(await u.read(), u.content_type, u.filename) for u in uploads]
                texts = [u for u in form.getlist(key) if isinstance(u, str) and u]
                media[key] += [Upload(b64decode(t, key), None) for t in texts]  # base64 typed into a text box
                if media[key]:
                    fields[key] = [FILE_PLACEHOLDER] * len(media[key]) if media_fields[key] else FILE_PLACEHOLDER
            elif key in list_fields:
                fields[key] = [v for v in form.getlist(key) if isinstance(v, str)]
            else:
                value = form.get(key)
                if isinstance(value, str) and value != "":
                    fields[key] = value
        return model.model_validate(fields), media
    raise UnsupportedMediaTypeError(
        f"request body of type {content_type or '(none)'!r}: send application/json or multipart/form-data"
    )


async def read_form(request: Request) -> FormData:
    """A multipart body's form, its fields decoded as UTF-8 (or ASCII, Latin-1): 415 for any other declared
    charset. Every multipart route reads its form here."""
    _, params = parse_options_header(request.headers.get("content-type", ""))
    declared = params.get(b"charset")
    if declared is not None:
        name = declared.decode("latin-1")
        try:
            codec = codecs.lookup(name).name
        except LookupError:
            codec = None
        if codec not in FORM_CHARSETS:
            raise UnsupportedMediaTypeError(f"multipart charset {name[:40]!r}: send UTF-8 (or declare no charset)")
    return await request.form()


def _parse_json(body: bytes, model: type[M], media_fields: dict[str, bool]) -> tuple[M, dict[str, list[Upload]]]:
    parsed = model.model_validate_json(body)
    media: dict[str, list[Upload]] = {}
    for name, is_list in media_fields.items():
        value = getattr(parsed, name)
        if value is None:
            continue
        values = value if is_list else [value]
        media[name] = [Upload(b64decode(v, f"{name}[{i}]" if is_list else name), None) for i, v in enumerate(values)]
    return parsed, media


def validation_message(error: ValidationError) -> tuple[int, str]:
    """(status, message) for a body that failed validation: 400 for malformed JSON, else 422."""
    parts = []
    for e in error.errors():
        if e.get("type") == "json_invalid":
            return 400, f"malformed JSON: {json_error(str(e.get('ctx', {}).get('error', e.get('msg'))))}"
        loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
        parts.append(f"{loc}: {str(e.get('msg')).removeprefix('Value error, ')}")  # our validators' own words
    return 422, "; ".join(parts)
