"""`uniadapter index add`: bulk ingest of files under the media root, without an HTTP server.

It builds the same parts as the server (backbone, adapter manager, batcher, collections) in-process, embeds in
batches, and is resumable: an item's id is its path relative to the media root, and ids already in
the collection are skipped, so re-running after an interruption continues where it stopped.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from tqdm import tqdm

from uniadapter_serve.errors import InputError, NotFoundError
from uniadapter_serve.service.collections.ingest import IncomingItem
from uniadapter_serve.service.collections.store import MomentSpec
from uniadapter_serve.service.local_engine import LocalEngine
from uniadapter_serve.service.metrics import ServiceMetrics
from uniadapter_serve.service.parts import build_parts
from uniadapter_serve.service.settings import Settings

SUFFIXES = {
    "image": {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp"},
    "video": {".mp4", ".webm", ".avi", ".mkv", ".mov"},
}


def expand(paths: list[str], media_root: Path, kind: str) -> list[str]:
    """Files (folders walked recursively) as paths relative to the media root, sorted."""
    root = media_root.resolve()
    out: set[str] = set()
    for raw in paths:
        path = Path(raw)
        path = (path if path.is_absolute() else Path.cwd() / path).resolve()
        if not path.is_relative_to(root):
            path = (root / raw).resolve()
        if not path.is_relative_to(root):
            raise InputError(f"{raw}: outside the media root {root}")
        if not path.exists():
            raise NotFoundError(f"{raw}: no such file or folder")
        files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
        out.update(str(f.relative_to(root)) for f in files
                   if path.is_file() or f.suffix.lower() in SUFFIXES.get(kind, set()))
    return sorted(out)


def index_paths(settings: Settings, collection: str, paths: list[str], *, batch_size: int = 32,
                create: str | None = None, adapter: str | None = None, index: str = "flat",
                progress: bool = True, moments: MomentSpec | None = None) -> dict[str, Any]:
    parts = build_parts(settings, ServiceMetrics(), LocalEngine)
    parts.start()
    try:
        try:
            target = parts.collections.get(collection)
        except NotFoundError:
            if create is None:
                raise
            target = parts.collections.create(collection, create, adapter, index, moments)
        kind = target.meta.kind
        if kind == "text":
            raise InputError("index add takes media files; add texts through POST /collections/{name}/items")
        files = expand(paths, settings.media_dir, kind)
        done = target.store.existing(files)
        todo = [f for f in files if f not in done]
        with tqdm(total=len(files), initial=len(files) - len(todo), unit="item", disable=not progress) as bar:
            for start in range(0, len(todo), batch_size):
                chunk = todo[start:start + batch_size]
                items = [IncomingItem(id=f, path=f) for f in chunk]
                asyncio.run(parts.collections.add(collection, items))
                bar.update(len(chunk))
        return {"collection": collection, "files": len(files), "added": len(todo), "skipped": len(done),
                "items": target.store.count(), "adapter": target.meta.adapter_ref}
    finally:
        parts.stop()
