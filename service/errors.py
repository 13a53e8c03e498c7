"""The one place where domain errors become HTTP responses."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.routing import Match

from uniadapter_serve import errors as e
from uniadapter_serve.service.bodies import validation_message

log = logging.getLogger(__name__)

STATUS: list[tuple[type[Exception], int]] = [
    (e.AuthError, 401),
    (e.EmptyMediaError, 400),
    (e.CorruptMediaError, 400),
    (e.MalformedUploadError, 400),
    (e.UnsupportedMediaTypeError, 415),
    (e.MediaTooLargeError, 413),
    (e.TextTooLongError, 422),
    (e.InputError, 422),
    (e.AdapterNotFoundError, 404),
    (e.AdapterVersionNotFoundError, 404),
    (e.NotFoundError, 404),
    (e.AdapterIncompatibleError, 409),
    (e.AdapterInUseError, 409),
    (e.GoldenMismatchError, 409),
    (e.ConflictError, 409),
    (e.AdapterFormatError, 422),
    (e.ConfigError, 422),
    (e.AdapterCapacityError, 503),
    (e.ServerBusyError, 503),
    (e.OverloadedError, 429),
    (e.DeadlineExceededError, 504),
    (e.CheckpointError, 503),
    (e.BackboneMismatchError, 503),
]


def status_for(error: Exception) -> int:
    if isinstance(error, e.AuthError):
        return error.status
    for cls, status in STATUS:
        if isinstance(error, cls):
            return status
    return 500


def error_response(status: int, error: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail}, status_code=status, headers=headers)


def install(app: FastAPI) -> None:
    @app.exception_handler(e.UniAdapterError)
    async def domain(request: Request, exc: e.UniAdapterError) -> JSONResponse:
        status = status_for(exc)
        headers = None
        if isinstance(exc, e.OverloadedError | e.ServerBusyError):
            headers = {"Retry-After": str(max(1, round(exc.retry_after)))}
        elif isinstance(exc, e.AdapterCapacityError):
            headers = {"Retry-After": "1"}
        elif isinstance(exc, e.AuthError) and status == 401:
            headers = {"WWW-Authenticate": "Bearer"}
        if status >= 500 and status not in (503, 504):
            log.error("%s on %s: %s", type(exc).__name__, request.url.path, exc)
        return error_response(status, type(exc).__name__, str(exc), headers)

    @app.exception_handler(ValidationError)
    async def body(request: Request, exc: ValidationError) -> JSONResponse:
        status, message = validation_message(exc)
        return error_response(status, "ValidationError", message)

    @app.exception_handler(RequestValidationError)
    async def params(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            if err.get("type") == "json_invalid":
                return error_response(400, "ValidationError", f"malformed JSON: {err.get('msg')}")
            loc = ".".join(str(p) for p in err.get("loc", ()))
            parts.append(f"{loc}: {err.get('msg')}")
        return error_response(422, "ValidationError", "; ".join(parts))

    @app.exception_handler(HTTPException)
    async def framework(request: Request, exc: HTTPException) -> JSONResponse:
        """404 / 405 from routing, 400 from body and multipart parsing: the same error shape."""
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers["Allow"] = ", ".join(allowed_methods(app, request))
        name = {400: "BadRequest", 404: "NotFound", 405: "MethodNotAllowed"}.get(exc.status_code, "HTTPError")
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no route {request.url.path[:200]!r} (see /docs)"
        elif exc.status_code == 405:
            detail = f"{request.method} is not allowed on {request.url.path[:200]!r}; allowed: {headers['Allow']}"
        return error_response(exc.status_code, name, detail, headers or None)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return error_response(500, "InternalError", "internal error; see the server log")


def allowed_methods(app: FastAPI, request: Request) -> list[str]:
    """Every method some route serves at this path (Starlette's 405 names only the first route's)."""
    methods = set()
    for method in ("GET", "POST", "PUT", "PATCH", "DELETE"):
        scope = {**request.scope, "method": method}
        if any(route.matches(scope)[0] == Match.FULL for route in app.router.routes):
            methods.add(method)
    if "GET" in methods:
        methods.add("HEAD")
    return sorted(methods)
