"""The error answers every API route documents in OpenAPI (the bodies are `schemas.ErrorResponse`)."""

from __future__ import annotations

from uniadapter_serve.service.schemas import ErrorResponse

ERRORS: dict[int | str, dict[str, object]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        400: "Malformed JSON or undecodable media", 401: "Missing API key", 403: "Wrong API key",
        404: "Unknown adapter set or collection", 409: "Adapter set of the wrong task or incompatible",
        413: "Media over a limit (bytes, pixels, duration)", 415: "Unsupported media or body type",
        422: "Invalid field", 429: "Queue full (see Retry-After)", 503: "No room for the adapter set now",
        504: "Deadline passed",
    }.items()
}
