"""What a browser is told and what it may do: response headers (nosniff, CSP, frame protection, media
Content-Disposition) on every response, and the Origin/Host check for routes no key protects (a page on another
origin, or a DNS-rebinding one, must not drive a keyless local server)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final
from urllib.parse import quote, urlsplit

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from uniadapter_serve.service.settings import Settings

WILDCARD_BINDS = frozenset({"", "0.0.0.0", "::"})
PAGE_CSP: Final = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
                   "media-src 'self' blob:; connect-src 'self'; form-action 'self'; base-uri 'none'; "
                   "frame-ancestors 'none'")
"""The page at / : its one script and stylesheet are files under /static (no inline code), media shown from blob
URLs, every call to this origin."""
MEDIA_CSP: Final = ("default-src 'none'; img-src 'self'; media-src 'self'; style-src 'unsafe-inline'; "
                    "frame-ancestors 'none'")
"""A stored file opened on its own: the browser's image or video viewer works (its inline styles), no script runs.
Not `sandbox`: it gives the viewer an opaque origin, and the video it loads from this origin is then refused."""
API_CSP: Final = "default-src 'none'; frame-ancestors 'none'"
PAGE_PREFIXES = ("/static/",)
DOCS_PATHS = ("/docs", "/redoc")
MEDIA_SUFFIX = "/media"
EXTENSIONS = {"image/jpeg": ".jpg", "image/png": ".png", "image/gif": ".gif", "image/bmp": ".bmp",
              "image/webp": ".webp", "video/mp4": ".mp4", "video/webm": ".webm", "video/x-msvideo": ".avi",
              "video/quicktime": ".mov", "video/x-matroska": ".mkv"}
UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")
SHOWN = 100  # characters of a refused header value echoed back


def _host_name(value: str) -> str | None:
    """The host name of a `Host` value or an origin's netloc, lower-case, without port or IPv6 brackets; None if
    it does not parse."""
    try:
        name = urlsplit("//" + value).hostname
    except ValueError:
        return None
    return name or None


def _normal(name: str) -> str:
    return name.strip().lower().removeprefix("[").removesuffix("]")


@dataclass(frozen=True)
class AllowedHosts:
    """Host names (no ports) requests to routes no key protects may name in `Host` and `Origin`."""

    names: tuple[str, ...]
    any: bool = False

    @classmethod
    def from_settings(cls, settings: Settings) -> AllowedHosts:
        given = [_normal(n) for n in settings.allowed_hosts.split(",") if n.strip()]
        if "*" in given:
            return cls(("*",), any=True)
        bound = _normal(settings.host)
        names = given + ([bound] if bound not in WILDCARD_BINDS else [])
        return cls(tuple(dict.fromkeys(names)))

    def allows(self, name: str | None) -> bool:
        return self.any or (name is not None and name in self.names)


def origin_refusal(headers: Iterable[tuple[bytes, bytes]], hosts: AllowedHosts) -> str | None:
    """Why a request to a route no key protects is refused, or None. `Host` must name an allowed host (a
    DNS-rebinding page names its own); an `Origin`, if sent (browsers send it on cross-origin calls and on
    same-origin writes), must be an allowed host too. No `Origin` (curl, the Python client) passes."""
    if hosts.any:
        return None
    host = origin = None
    for name, value in headers:
        name = name.lower()
        if name == b"host" and host is None:
            host = value.decode("latin-1")
        elif name == b"origin" and origin is None:
            origin = value.decode("latin-1")
    setting = f"UNIADAPTER_ALLOWED_HOSTS (now {','.join(hosts.names)}; '*' allows any)"
    advice = "with no key set, only requests naming an allowed host are served: add it to " + setting + \
        ", or set UNIADAPTER_API_KEY and UNIADAPTER_ADMIN_KEY"
    if host is not None and not hosts.allows(_host_name(host)):
        return f"host {host[:SHOWN]!r} is not allowed: {advice}"
    if origin is not None:
        parts = _origin_parts(origin)
        if parts is None or not hosts.allows(parts):
            return f"origin {origin[:SHOWN]!r} is not allowed: {advice}"
    return None


def _origin_parts(origin: str) -> str | None:
    """The host name of an `Origin` (`scheme://host[:port]`); None for 'null' or anything else."""
    scheme, sep, rest = origin.strip().partition("://")
    if not sep or scheme.lower() not in ("http", "https") or not rest or "/" in rest:
        return None
    return _host_name(rest)


def content_disposition(item_id: str, content_type: str) -> str:
    """`inline` for images and videos, `attachment` for anything else; the file name is the item id's last part,
    reduced to safe ASCII in `filename` and percent-encoded whole in `filename*` (RFC 6266 / 5987), so no id can
    add a header or a parameter."""
    base = item_id.rsplit("/", 1)[-1][:200]
    media_type = content_type.split(";")[0].strip().lower()
    extension = EXTENSIONS.get(media_type, "")
    safe = UNSAFE_NAME.sub("_", base).strip("._")[:100] or "media"
    if extension and not safe.lower().endswith(extension):
        safe += extension
        base += extension
    kind = "inline" if media_type.startswith(("image/", "video/")) and extension else "attachment"
    return f"{kind}; filename=\"{safe}\"; filename*=UTF-8''{quote(base, safe='')}"


def route_path(scope: Scope) -> str:
    """The path the router matches (without the ASGI root_path, as Starlette does)."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if not root or not path.startswith(root):
        return path
    if path == root:
        return ""
    return path[len(root):] if path[len(root)] == "/" else path


def _csp_for(path: str) -> str | None:
    if path == "/" or path.startswith(PAGE_PREFIXES):
        return PAGE_CSP
    if path in DOCS_PATHS:
        return None  # the docs pages set their own (service/docs.py: Swagger UI's inline script by its hash)
    if path.endswith(MEDIA_SUFFIX) or path.endswith("/thumbnail"):
        return MEDIA_CSP
    return API_CSP


class SecurityHeadersMiddleware:
    """Adds to every HTTP response (errors, static files, media, docs) what it lacks of: `nosniff`,
    `X-Frame-Options: DENY`, a CSP with `frame-ancestors 'none'` (the page's own policy on / and /static),
    `Cross-Origin-Resource-Policy: same-origin`, and on a media route's 2xx a `Content-Disposition`."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = route_path(scope)
        csp = _csp_for(path)

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                extra = [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
                         (b"cross-origin-resource-policy", b"same-origin"), (b"referrer-policy", b"same-origin")]
                if csp is not None:
                    extra.append((b"content-security-policy", csp.encode()))
                if 200 <= message["status"] < 300 and path.endswith(MEDIA_SUFFIX):
                    disposition = _media_disposition(scope, headers)
                    if disposition is not None:
                        extra.append((b"content-disposition", disposition.encode("latin-1")))
                headers += [(name, value) for name, value in extra if name not in present]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, with_headers)


def _media_disposition(scope: Scope, headers: list[tuple[bytes, bytes]]) -> str | None:
    """For the item media route only (the router left the matched route and its parameters in the scope)."""
    route = scope.get("route")
    params = scope.get("path_params") or {}
    if not str(getattr(route, "path", "")).endswith("/media") or "item_id" not in params:
        return None
    content_type = next((v.decode("latin-1") for k, v in headers if k.lower() == b"content-type"),
                        "application/octet-stream")
    return content_disposition(str(params["item_id"]), content_type)
