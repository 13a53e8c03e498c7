"""Swagger UI and ReDoc served from local files (no CDN), so /docs works on an offline machine. Each page carries a
CSP that lets it run and nothing else: Swagger UI's one inline start-up script is allowed by its hash."""

from __future__ import annotations

import base64
import hashlib
import re
from importlib.resources import files
from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

STATIC_PREFIX = "/docs-static"
INLINE_SCRIPT = re.compile(r"<script>(.*?)</script>", re.S)
DOCS_CSP = ("default-src 'none'; script-src 'self'{hashes}; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
            "font-src 'self' data:; connect-src 'self'; worker-src 'self' blob:; form-action 'self'; "
            "base-uri 'none'; frame-ancestors 'none'")
"""Swagger UI and ReDoc set inline styles, ReDoc runs a worker from a blob URL; both fetch /openapi.json."""


def with_csp(page: HTMLResponse) -> HTMLResponse:
    """`page` with a CSP allowing exactly its inline scripts (by sha256), so nothing injected could run."""
    html = bytes(page.body).decode()
    hashes = "".join(f" 'sha256-{base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()}'"
                     for s in INLINE_SCRIPT.findall(html))
    page.headers["Content-Security-Policy"] = DOCS_CSP.format(hashes=hashes)
    return page


def install(app: FastAPI) -> None:
    static = Path(str(files("fastapi_offline") / "static"))
    app.mount(STATIC_PREFIX, StaticFiles(directory=static), name="docs-static")

    @app.get("/docs", include_in_schema=False)
    def swagger_ui() -> HTMLResponse:
        return with_csp(get_swagger_ui_html(
            openapi_url="/openapi.json", title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{STATIC_PREFIX}/swagger-ui-bundle.js", swagger_css_url=f"{STATIC_PREFIX}/swagger-ui.css",
            swagger_favicon_url=f"{STATIC_PREFIX}/favicon.png",
        ))

    @app.get("/redoc", include_in_schema=False)
    def redoc() -> HTMLResponse:
        return with_csp(get_redoc_html(openapi_url="/openapi.json", title=f"{app.title} - ReDoc",
                                       redoc_js_url=f"{STATIC_PREFIX}/redoc.standalone.js",
                                       redoc_favicon_url=f"{STATIC_PREFIX}/favicon.png", with_google_fonts=False))
