"""The built-in web page at `/`: static HTML, JS and CSS shipped in service/static/ (no build step, no CDN), so it
works offline. It calls the same HTTP API as any client; the key it needs is typed into the page."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"

router = APIRouter(tags=["web"])


@router.get("/", response_class=FileResponse, summary="The web page: search, ask, adapters, collections",
            responses={200: {"description": "The page (HTML)", "content": {"text/html": {}}}})
def page() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html",
                        headers={"Cache-Control": "no-cache"})


def static_files() -> StaticFiles:
    """/static/*: the page's script, styles and icon."""
    return StaticFiles(directory=STATIC_DIR)
