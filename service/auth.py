"""Optional API keys: a read key for task routes, an admin key for writes (adapters, collections).

Keys come as `Authorization: Bearer KEY` or `X-API-Key: KEY`. The admin key also opens read routes. Auth fails
closed: with a read key and no admin key, writes are refused (no key opens them). `AuthMiddleware` checks keys
before the app reads a byte of the body; the route dependencies below check again (defence in depth).
"""

from __future__ import annotations

import hmac
import logging
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar
from urllib.parse import parse_qsl

import fastapi.routing
from fastapi import Depends, Request
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from starlette.routing import BaseRoute, Mount, compile_path
from starlette.types import ASGIApp, Receive, Scope, Send

from uniadapter_serve.errors import AuthError
from uniadapter_serve.service.errors import error_response
from uniadapter_serve.service.security import AllowedHosts, origin_refusal, route_path
from uniadapter_serve.service.settings import Settings

log = logging.getLogger(__name__)

Level = Literal["open", "read", "admin"]
RANK: dict[Level, int] = {"open": 0, "read": 1, "admin": 2}
WRITES = frozenset({"POST", "PUT", "PATCH", "DELETE"})
WRITES_DISABLED = ("writes are disabled: UNIADAPTER_ADMIN_KEY is not set while UNIADAPTER_API_KEY is (set "
                   "UNIADAPTER_ADMIN_KEY to allow adapter and collection changes and verbose readiness)")
SEND_KEY = "send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'"
FALSE_VALUES = frozenset({"", "0", "off", "f", "false", "n", "no"})  # pydantic's, plus an empty value
F = TypeVar("F", bound=Callable[..., object])


def presented(headers: Iterable[tuple[bytes, bytes]]) -> bytes | None:
    """The key a request presents, as raw bytes (never decoded: any header bytes compare, none can raise)."""
    bearer = api_key = None
    for name, value in headers:
        name = name.lower()
        if name == b"authorization" and bearer is None:
            bearer = value
        elif name == b"x-api-key" and api_key is None:
            api_key = value
    if bearer is not None and bearer[:7].lower() == b"bearer ":
        return bearer[7:].strip()
    return api_key


def _matches(given: bytes, expected: str) -> bool:
    return hmac.compare_digest(given, expected.encode())


def refusal(level: Level, given: bytes | None, settings: Settings) -> AuthError | None:
    """Why a request presenting `given` may not use a route of this level, or None. Fails closed: an admin route
    with a read key configured and no admin key is refused whatever the request sends."""
    api, admin = settings.api_key, settings.admin_key
    if level == "admin":
        if admin is None:
            return None if api is None else AuthError(WRITES_DISABLED, 403)
        if given is None:
            return AuthError(f"missing admin key: {SEND_KEY}", 401)
        return None if _matches(given, admin.get_secret_value()) else AuthError("this route needs the admin key", 403)
    if level == "read" and api is not None:
        if given is None:
            return AuthError(f"missing API key: {SEND_KEY}", 401)
        keys = [k.get_secret_value() for k in (api, admin) if k is not None]
        if not any([_matches(given, k) for k in keys]):  # a list: every key compared, no early exit to time
            return AuthError("wrong API key", 403)
    return None


def unguarded(level: Level, settings: Settings) -> bool:
    """Whether no configured key protects this level (the local default): then Origin and Host are checked."""
    if level == "open":
        return False
    if level == "admin":
        return settings.admin_key is None and settings.api_key is None
    return settings.api_key is None


def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.parts.settings
    return settings


def check_key(level: Level, request: Request) -> None:
    """AuthError unless the request presents a key good for `level` (or the level needs none)."""
    error = refusal(level, presented(request.scope["headers"]), _settings(request))
    if error is not None:
        raise error


async def require_read(request: Request) -> None:
    check_key("read", request)  # async: run on the loop (a plain def dependency costs a thread hop)


async def require_admin(request: Request) -> None:
    check_key("admin", request)


ReadAuth = Depends(require_read)
AdminAuth = Depends(require_admin)


def admin_when(flag: str) -> Callable[[F], F]:
    """Marks a GET route that needs the admin key when its query flag `flag` is true (`/readyz?verbose=true`);
    the route still checks the admin key itself (`check_key("admin", request)`)."""
    def mark(endpoint: F) -> F:
        setattr(endpoint, "admin_when", flag)  # noqa: B010 (an attribute the middleware reads)
        return endpoint
    return mark


def _calls(dependant: Dependant | None) -> Iterable[object]:
    for sub in dependant.dependencies if dependant is not None else ():
        yield sub.call
        yield from _calls(sub)


@dataclass(frozen=True)
class Guard:
    """One route as the auth check sees it: where it matches, what it declares."""

    route: BaseRoute
    path: str  # the template, e.g. '/collections/{name}'
    regex: re.Pattern[str]
    methods: frozenset[str] | None  # None: a mount (any method, any path below)
    level: Level
    flag: str | None  # the query flag that makes it admin (`admin_when`)


def declared_level(dependant: Dependant | None, methods: Iterable[str]) -> Level:
    """The level a route declares through its dependencies. A write method on a route that declares no key is an
    admin route (fail closed: a new route without `ReadAuth`/`AdminAuth` is never an open write)."""
    calls = set(_calls(dependant))
    if require_admin in calls:
        return "admin"
    if require_read in calls:
        return "read"
    return "admin" if set(methods) & WRITES else "open"


def _effective(routes: Sequence[BaseRoute]) -> Iterable[Any]:
    """Every route the app serves, flat: FastAPI >= 0.16x keeps included routers whole in `app.router.routes`
    and resolves them through `iter_route_contexts` (whose items forward `path`, `methods`, `dependant`)."""
    flatten = getattr(fastapi.routing, "iter_route_contexts", None)
    return flatten(routes) if flatten is not None else routes


def guards(routes: Sequence[BaseRoute]) -> list[Guard]:
    """The app's routes in the router's order (the first full match wins, as in the router)."""
    table = []
    for entry in _effective(routes):
        route: BaseRoute = getattr(entry, "original_route", entry)
        path = getattr(entry, "path", None)
        if path is None:
            continue
        if isinstance(route, Mount):  # static files, docs assets: no data behind them
            prefix = re.compile("^" + re.escape(path.rstrip("/")) + "(/.*)?$")
            table.append(Guard(route, path, prefix, None, "open", None))
            continue
        methods = frozenset(getattr(entry, "methods", None) or ())
        regex, _, _ = compile_path(path)
        dependant = getattr(entry, "dependant", None) if isinstance(route, APIRoute) else None
        flag = getattr(getattr(entry, "endpoint", None), "admin_when", None)
        table.append(Guard(route, path, regex, methods, declared_level(dependant, methods), flag))
    return table


def _flag_on(scope: Scope, flag: str) -> bool:
    values = [v for k, v in parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
              if k == flag]
    return any(v.strip().lower() not in FALSE_VALUES for v in values)  # a true-ish or unparsable value: on


def resolve(table: Sequence[Guard], scope: Scope) -> tuple[Guard | None, dict[str, str], Level]:
    """The route the router will pick for this request (the first full match), its path parameters and the level
    the request needs. No full match (404, 405, a slash redirect): nothing runs behind it, so 'open'."""
    path, method = route_path(scope), scope.get("method", "GET")
    for guard in table:
        found = guard.regex.match(path)
        if found is None or (guard.methods is not None and method not in guard.methods):
            continue
        level: Level = "admin" if guard.flag is not None and _flag_on(scope, guard.flag) else guard.level
        return guard, found.groupdict(), level
    return None, {}, "open"


class AuthMiddleware:
    """Keys (and, with no key configured, Origin and Host) checked from the headers alone, before the app reads
    the body: a 60 MB upload without a key gets its 401 after the headers."""

    def __init__(self, app: ASGIApp, routes: Sequence[BaseRoute], settings: Settings) -> None:
        self.app = app
        self.table = guards(routes)  # built when Starlette builds the middleware stack, after every route is added
        self.settings = settings
        self.hosts = AllowedHosts.from_settings(settings)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        guard, params, level = resolve(self.table, scope)
        if guard is not None and isinstance(guard.route, APIRoute):  # as the router will set them: the middleware
            scope.update(route=guard.route, path_params=params)  # outside (metrics, headers) sees them even on a 401
        error = refusal(level, presented(scope["headers"]), self.settings)
        if error is None and unguarded(level, self.settings):
            reason = origin_refusal(scope["headers"], self.hosts)
            error = AuthError(reason, 403) if reason is not None else None
        if error is None:
            await self.app(scope, receive, send)
            return
        headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else {}
        if _has_body(scope["headers"]):
            headers["Connection"] = "close"  # the body is never read: do not keep the connection for it
        await error_response(error.status, type(error).__name__, str(error), headers)(scope, receive, send)


def _has_body(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    for name, value in headers:
        name = name.lower()
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip() not in (b"", b"0")):
            return True
    return False


def log_key_settings(settings: Settings) -> None:
    """Say at start what the keys leave open or shut (a read key without an admin key shuts every write)."""
    if settings.api_key is not None and settings.admin_key is None:
        log.warning("UNIADAPTER_API_KEY is set and UNIADAPTER_ADMIN_KEY is not: every write (adapters, collections) "
                    "and /readyz?verbose=true is refused; set UNIADAPTER_ADMIN_KEY to allow them")
    elif settings.api_key is None and settings.admin_key is None:
        hosts = AllowedHosts.from_settings(settings)
        if hosts.any:
            log.warning("no keys and UNIADAPTER_ALLOWED_HOSTS='*': any web page the browser of a user of this host "
                        "opens can call every route")
        else:
            log.info("no keys: routes answer requests naming an allowed host (%s) with no other-origin Origin",
                     ", ".join(hosts.names))
