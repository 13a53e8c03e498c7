"""Optional API keys: a read key for task routes, an admin key for writes (adapters, collections).

Keys come as `Authorization: Bearer KEY` or `X-API-Key: KEY`. The admin key also opens read routes.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request

from uniadapter_serve.errors import AuthError
from uniadapter_serve.service.core import ServiceCore


def get_core(request: Request) -> ServiceCore:
    core: ServiceCore = request.app.state.core
    return core


CoreDep = Annotated[ServiceCore, Depends(get_core)]


def _presented(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return request.headers.get("x-api-key")


def _matches(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


def require_read(request: Request, core: CoreDep) -> None:
    keys = [k.get_secret_value() for k in (core.settings.api_key, core.settings.admin_key) if k is not None]
    if core.settings.api_key is None:
        return
    given = _presented(request)
    if given is None:
        raise AuthError("missing API key: send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'", 401)
    if not any(_matches(given, k) for k in keys):
        raise AuthError("wrong API key", 403)


def require_admin(request: Request, core: CoreDep) -> None:
    if core.settings.admin_key is None:
        return
    given = _presented(request)
    if given is None:
        raise AuthError("missing admin key: send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'", 401)
    if not _matches(given, core.settings.admin_key.get_secret_value()):
        raise AuthError("this route needs the admin key", 403)


ReadAuth = Depends(require_read)
AdminAuth = Depends(require_admin)
