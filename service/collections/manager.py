"""Collections: create, add, delete, search, re-index under a newer adapter version.

Each collection is bound to one exact adapter version (`name@version`, or `none` for the bare
backbone): items and queries are embedded by that version only. Media of uploaded items are kept
on the data volume so the collection can be re-embedded later; path items must lie under the media
root. Embeddings go through the batcher (so ingest batches with live traffic) and the embedding
cache (adapter version, media sha256).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from starlette.concurrency import run_in_threadpool

from uniadapter_serve.adapters.format import AdapterSetMeta
from uniadapter_serve.adapters.registry import NAME_RE
from uniadapter_serve.errors import ConflictError, InputError, MediaTooLargeError, NotFoundError, OverloadedError
from uniadapter_serve.fileio import atomic_write
from uniadapter_serve.model.media.image import sniff_image_type
from uniadapter_serve.model.media.video import sniff_video_type
from uniadapter_serve.service.collections.collection import Collection, Hit
from uniadapter_serve.service.collections.faiss_device import FaissDevice
from uniadapter_serve.service.collections.index import validate_factory
from uniadapter_serve.service.collections.store import (
    GenerationChanged,
    Item,
    NewItem,
    Store,
    StoreBackend,
    StoreUnavailableError,
)
from uniadapter_serve.service.engine import Engine
from uniadapter_serve.service.metrics import ServiceMetrics
from uniadapter_serve.service.redis_glue import EmbeddingCache, EventBus
from uniadapter_serve.service.settings import Settings
from uniadapter_serve.service.stages import VisionInput


class CollectionHost(Protocol):
    """What collections need from the service (ServiceCore has it): settings, the model engine, media
    decoding, adapter resolution, the embedding cache, events and metrics."""

    settings: Settings
    engine: Engine
    faiss: FaissDevice
    cache: EmbeddingCache
    events: EventBus
    metrics: ServiceMetrics

    def resolve_adapter(self, ref: str | None, task: str) -> AdapterSetMeta | None: ...

    def check_text(self, text: str, field: str) -> str: ...

    def timeout(self) -> float: ...

    async def media_input(self, kind: str, data: bytes, meta: AdapterSetMeta | None,
                          field: str) -> VisionInput: ...

log = logging.getLogger(__name__)

KINDS = ("image", "video", "text")
MAX_PATH_CHARS = 1024
REINDEX_CHUNK = 64
EXTENSIONS = {"image/jpeg": ".jpg", "image/png": ".png", "image/gif": ".gif", "image/bmp": ".bmp",
              "image/webp": ".webp", "video/mp4": ".mp4", "video/webm": ".webm", "video/x-msvideo": ".avi"}


@dataclass
class IncomingItem:
    """One item to add: media bytes, a path under the media root, or a text (text collections)."""

    id: str | None = None
    data: bytes | None = None
    content_type: str | None = None
    path: str | None = None
    text: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Prepared:
    label: str
    """how errors name the item: items[i], with its filename when it has one"""
    external_id: str
    source: str
    sha256: str
    metadata: dict[str, Any]
    content: bytes | str
    """media bytes or text"""


class CollectionManager:
    def __init__(self, backend: StoreBackend, media_root: Path, core: CollectionHost) -> None:
        self.backend = backend
        self.media_root = media_root
        self.core = core
        self.device = core.faiss
        self._collections: dict[str, Collection] = {}
        self._lock = threading.RLock()
        self._reindex_tasks: dict[str, asyncio.Task[None]] = {}
        self.refresh()
        backend.listen(self.on_store_change)

    # -- the set of collections ----------------------------------------------------------------

    def _open(self, name: str, store: Store | None = None) -> Collection:
        b = self.backend
        return Collection(store or b.open(name), b.local_dir(name), b.media_dir(name), device=self.device)

    def refresh(self) -> None:
        """Open collections another replica created, forget deleted ones (nothing changes while the store
        cannot be reached)."""
        try:
            present = set(self.backend.names())
        except StoreUnavailableError as e:
            log.warning("cannot list collections: %s", e)
            return
        with self._lock:
            for name in sorted(present - set(self._collections)):
                try:
                    self._collections[name] = self._open(name)
                except Exception as e:
                    log.error("cannot open collection %s: %s", name, e)
            for name in sorted(set(self._collections) - present):
                self._collections.pop(name).store.close()

    def on_store_change(self, name: str) -> None:
        """Another process changed collection `name` ("": maybe any): catch up now, not on the next read."""
        self.refresh()
        with self._lock:
            targets = [self._collections[name]] if name in self._collections else (
                list(self._collections.values()) if not name else [])
        for collection in targets:
            collection.fresh()

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._collections)

    def get(self, name: str) -> Collection:
        with self._lock:
            found = self._collections.get(name)
        if found is None:
            self.refresh()
            with self._lock:
                found = self._collections.get(name)
        if found is None:
            raise NotFoundError(f"no collection named {name[:80]!r} (GET /collections lists them)")
        return found

    def create(self, name: str, kind: str, adapter: str | None, factory: str = "flat") -> Collection:
        if not NAME_RE.match(name):
            raise InputError(f"invalid collection name {name[:80]!r}: 1-64 ASCII letters, digits, '.', '_' or '-', "
                             "starting with a letter or digit")
        if kind not in KINDS:
            raise InputError(f"kind must be one of {KINDS}, got {kind!r}")
        meta = self.core.resolve_adapter(adapter, "retrieval")  # None: the default retrieval set
        dim = self.core.engine.embed_dim
        factory = validate_factory(factory, dim)
        with self._lock:
            if name in self._collections:
                raise ConflictError(f"collection {name!r} already exists")
            store = self.backend.create(name, kind, meta.ref if meta else "none", factory, dim)
            collection = self._collections[name] = self._open(name, store)
        self.core.events.publish({"type": "collection", "name": name})
        return collection

    def drop(self, name: str) -> None:
        collection = self.get(name)
        with self._lock:
            self.backend.drop(name)
            self._collections.pop(name, None)
            collection.store.close()
            shutil.rmtree(collection.folder, ignore_errors=True)  # snapshots (with SQLite, gone already)
        self.core.events.publish({"type": "collection", "name": name})

    def close(self) -> None:
        for task in self._reindex_tasks.values():
            task.cancel()
        with self._lock:
            for collection in self._collections.values():
                try:
                    collection.close()
                except Exception:
                    log.exception("closing collection %s", collection.folder.name)

    # -- items -----------------------------------------------------------------------------------

    def adapter_of(self, collection: Collection) -> AdapterSetMeta | None:
        ref = collection.meta.adapter_ref
        return None if ref == "none" else self.core.resolve_adapter(ref, "retrieval")

    async def add(self, name: str, items: list[IncomingItem]) -> list[str]:
        """Embed and add items; all or nothing. Returns their external ids."""
        collection = self.get(name)
        with self.core.engine.admit(len(items)):
            prepared = await run_in_threadpool(self._prepare_all, collection, items)
            return await self._add_prepared(collection, prepared)

    async def _add_prepared(self, collection: Collection, prepared: list[_Prepared]) -> list[str]:
        name = collection.meta.name
        for _ in range(3):
            meta = collection.meta
            adapter = self.adapter_of(collection)
            vectors = await asyncio.gather(*(self._embed(meta.kind, p.content, p.sha256, adapter, p.label)
                                             for p in prepared))
            await run_in_threadpool(self._store_media, collection, prepared)
            news = [NewItem(p.external_id, p.source, p.sha256, p.metadata, v)
                    for p, v in zip(prepared, vectors, strict=True)]
            try:
                await run_in_threadpool(collection.store.add, news, meta.generation)
                break
            except GenerationChanged:
                continue  # re-indexed under another version meanwhile: embed again
        else:
            raise ConflictError(f"collection {name!r} kept switching adapter versions; retry")
        await run_in_threadpool(collection.sync)
        self.core.events.publish({"type": "collection", "name": name})
        return [p.external_id for p in prepared]

    def _prepare_all(self, collection: Collection, items: list[IncomingItem]) -> list[_Prepared]:
        kind = collection.meta.kind
        out = [self._prepare(kind, i, it) for i, it in enumerate(items)]
        taken = collection.store.existing([p.external_id for p in out])
        if taken:
            raise ConflictError(f"ids already in collection {collection.meta.name!r}: {sorted(taken)[:5]}")
        return out

    def _prepare(self, kind: str, i: int, item: IncomingItem) -> _Prepared:
        filename = item.metadata.get("filename")
        label = f"items[{i}]" + (f" ({str(filename)[:80]})" if filename else "")
        if kind == "text":
            if item.text is None or item.data is not None or item.path is not None:
                raise ConflictError(f"{label}: a text collection takes 'text' items")
            text = self.core.check_text(item.text, f"{label}.text")
            sha = hashlib.sha256(text.encode()).hexdigest()
            return _Prepared(label, item.id or sha[:16], f"text:{text}", sha, item.metadata, text)
        if item.text is not None:
            raise ConflictError(f"{label}: an {kind} collection takes files or paths, not 'text' items")
        if (item.data is None) == (item.path is None):
            raise InputError(f"{label}: give exactly one of an uploaded file and a path")
        if item.path is not None:
            path = self.resolve_media_path(item.path, f"{label}.path")
            data = self._read_media(path, kind, f"{label}.path")
            source = f"path:{path.relative_to(self.media_root.resolve())}"
        else:
            assert item.data is not None
            data, source = item.data, "upload"
        sha = hashlib.sha256(data).hexdigest()
        return _Prepared(label, item.id or sha[:16], source, sha, item.metadata, data)

    def resolve_media_path(self, path: str, field_name: str) -> Path:
        """A file under the media root named by a client: every failure is the client's 4xx, and no
        server path appears in a message."""
        shown = repr(path[:80]) + ("..." if len(path) > 80 else "")
        if "\x00" in path:
            raise InputError(f"{field_name}: path {shown} contains a NUL byte")
        if len(path) > MAX_PATH_CHARS:
            raise InputError(f"{field_name}: path of {len(path)} characters is over the limit of {MAX_PATH_CHARS}")
        root = self.media_root.resolve()
        try:
            candidate = (root / path).resolve()
            if not candidate.is_relative_to(root):
                raise InputError(f"{field_name}: path {shown} is outside the media root")
            found = candidate.is_file()
        except (OSError, ValueError) as e:
            reason = getattr(e, "strerror", None) or type(e).__name__
            raise InputError(f"{field_name}: path {shown} cannot be used ({reason})") from None
        if not found:
            raise NotFoundError(f"{field_name}: no file {shown} under the media root")
        return candidate

    def _read_media(self, path: Path, kind: str, field_name: str) -> bytes:
        s = self.core.settings
        limit = s.max_video_bytes if kind == "video" else s.max_image_bytes
        try:
            size = path.stat().st_size
            if size > limit:
                raise MediaTooLargeError(f"{field_name}: the file has {size} bytes, over the limit of {limit} bytes")
            return path.read_bytes()
        except OSError as e:
            raise InputError(f"{field_name}: the file cannot be read ({e.strerror or type(e).__name__})") from None

    def _store_media(self, collection: Collection, prepared: list[_Prepared]) -> None:
        """Keep uploaded media (content-addressed) so the collection can be re-embedded later."""
        for p in prepared:
            if not p.source.startswith("upload"):
                continue
            assert isinstance(p.content, bytes)
            mime = sniff_image_type(p.content) or sniff_video_type(p.content) or ""
            target = collection.media_dir / f"{p.sha256}{EXTENSIONS.get(mime, '.bin')}"
            if target.exists():
                p.source = f"upload:{target.name}"
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(target, p.content)
            p.source = f"upload:{target.name}"

    def delete_item(self, name: str, external_id: str) -> None:
        collection = self.get(name)
        collection.store.delete(external_id)
        collection.sync()
        self.core.events.publish({"type": "collection", "name": name})

    # -- embedding -------------------------------------------------------------------------------

    async def _embed(self, kind: str, content: bytes | str, sha256: str, adapter: AdapterSetMeta | None,
                     field: str) -> np.ndarray:
        key = self.core.cache.key(adapter.ref if adapter else "none", sha256, kind)
        cached = await self.core.cache.get(key)
        if cached is not None:
            self.core.metrics.cache.labels(result="hit").inc()
            return np.frombuffer(cached, dtype=np.float32).copy()
        self.core.metrics.cache.labels(result="miss").inc()
        ref, timeout = (adapter.ref if adapter else None), self.core.timeout()
        if kind == "text":
            assert isinstance(content, str)
            vector = (await self.core.engine.embed_text(content, ref, timeout)).numpy()
        else:
            assert isinstance(content, bytes)
            visual = await self.core.media_input(kind, content, adapter, field)
            vector = (await self.core.engine.embed_visual(visual, ref, timeout)).numpy()
        vector = np.ascontiguousarray(vector, np.float32)
        self.core.cache.set(key, vector.tobytes())
        return vector

    def load_content(self, collection: Collection, item: Item) -> bytes | str:
        """The item's media bytes (or text), for re-ranking and re-indexing."""
        kind, _, rest = item.source.partition(":")
        if kind == "text":
            return rest
        if kind == "upload":
            return (collection.media_dir / rest).read_bytes()
        if kind == "path":
            field = f"item {item.external_id!r}"
            return self._read_media(self.resolve_media_path(rest, field), collection.meta.kind, field)
        raise NotFoundError(f"item {item.external_id!r} has no stored media ({item.source!r})")

    def _contents(self, collection: Collection, items: list[Item]) -> list[bytes | str]:
        return [self.load_content(collection, it) for it in items]

    # -- search ----------------------------------------------------------------------------------

    async def search(self, collection: Collection, query: np.ndarray, k: int) -> list[Hit]:
        return await run_in_threadpool(collection.search, query, k)

    # -- re-indexing -----------------------------------------------------------------------------

    def start_reindex(self, name: str, adapter: str) -> str:
        collection = self.get(name)
        meta = self.core.resolve_adapter(adapter, "retrieval") if adapter not in ("none", "bare") else None
        ref = meta.ref if meta else "none"
        current = collection.meta
        if ref == current.adapter_ref:
            raise ConflictError(f"collection {name!r} is already indexed with {ref}")
        running = self._reindex_tasks.get(name)
        if running is not None and not running.done():
            raise ConflictError(f"collection {name!r} is already re-indexing to {current.reindex_target}")
        collection.store.set_reindex_target(ref)
        self._reindex_tasks[name] = asyncio.get_running_loop().create_task(self._reindex(collection, meta, ref))
        return ref

    async def _reindex(self, collection: Collection, adapter: AdapterSetMeta | None, ref: str) -> None:
        """Embed every item with the new version under the next generation, then switch atomically.
        Queries keep using the current generation until the switch."""
        name = collection.meta.name
        generation = collection.meta.generation + 1
        try:
            while True:
                batch = await run_in_threadpool(collection.store.missing, generation, REINDEX_CHUNK)
                if not batch:
                    if await run_in_threadpool(collection.store.switch, generation, ref):
                        break
                    continue
                contents = await run_in_threadpool(self._contents, collection, batch)
                try:
                    with self.core.engine.admit(len(batch)):
                        vectors = await asyncio.gather(*(
                            self._embed(collection.meta.kind, c, it.sha256 or "", adapter, f"item {it.external_id!r}")
                            for c, it in zip(contents, batch, strict=True)))
                except OverloadedError as e:  # live traffic first: re-index when there is room
                    await asyncio.sleep(e.retry_after)
                    continue
                await run_in_threadpool(collection.store.put_vectors,
                                        {it.item_id: v for it, v in zip(batch, vectors, strict=True)}, generation)
            await run_in_threadpool(collection.sync)
            self.core.events.publish({"type": "collection", "name": name})
            log.info("collection %s re-indexed with %s", name, ref)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("re-indexing %s to %s failed", name, ref)
            collection.store.set_reindex_target(None)
