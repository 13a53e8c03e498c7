"""Collections: create, add, delete, search, re-index under a newer adapter version.

Each collection is bound to one exact adapter version (`name@version`, or `none` for the bare
backbone): items and queries are embedded by that version only. Media of uploaded items are kept
on the data volume so the collection can be re-embedded later; path items must lie under the media
root. Embeddings go through the batcher (so ingest batches with live traffic) and the embedding
cache (adapter version, media sha256).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from starlette.concurrency import run_in_threadpool

from uniadapter_serve.adapters.format import AdapterSetMeta
from uniadapter_serve.adapters.registry import NAME_RE
from uniadapter_serve.errors import ConflictError, InputError, MediaTooLargeError, NotFoundError, OverloadedError
from uniadapter_serve.service.collections.cleanup import (
    ORPHAN_GRACE_S,
    ServingLock,
    remove_orphan_media,
    remove_temp,
)
from uniadapter_serve.service.collections.collection import Collection, Hit
from uniadapter_serve.service.collections.index import FaissDevice, validate_factory
from uniadapter_serve.service.collections.ingest import IncomingItem, MediaFiles, Prepared
from uniadapter_serve.service.collections.store import (
    CollectionGone,
    CollectionMeta,
    GenerationChanged,
    Item,
    MomentSpec,
    NewItem,
    Span,
    Store,
    StoreBackend,
    StoreUnavailableError,
    Swept,
    moments_json,
)
from uniadapter_serve.service.decoding import VisionDecoder
from uniadapter_serve.service.engine import Engine
from uniadapter_serve.service.metrics import ServiceMetrics
from uniadapter_serve.service.redis_glue import EmbeddingCache, EventBus
from uniadapter_serve.service.resolver import AdapterResolver
from uniadapter_serve.service.settings import Settings
from uniadapter_serve.service.tasks import Deadline, EmbedJob, frames_for
from uniadapter_serve.service.texts import check_text

log = logging.getLogger(__name__)

KINDS = ("image", "video", "text")
REINDEX_CHUNK = 64
MOMENT_REINDEX_CHUNK = 4
"""videos of a moment collection re-embedded per chunk (each is many windows)"""
WATCH_EVERY_S = 5.0
"""How often collections deleted or made by other processes are noticed when no event says so (SQLite replicas
on one volume have no events without Redis): a deleted one's files are released within this."""


@dataclass(frozen=True)
class Added:
    uid: str
    """the identity of the collection they were committed to"""
    ids: list[str]
    """the external ids of the items added"""
    count: int
    """items in the collection right after"""


class CollectionManager:
    def __init__(self, backend: StoreBackend, media_root: Path, *, settings: Settings, engine: Engine,
                 adapters: AdapterResolver, decoder: VisionDecoder, cache: EmbeddingCache, events: EventBus,
                 metrics: ServiceMetrics, device: FaissDevice) -> None:
        self.backend = backend
        self.media_root = media_root
        self.files = MediaFiles(media_root, settings)
        self.settings = settings
        self.engine = engine
        self.adapters = adapters
        self.decoder = decoder
        self.cache = cache
        self.events = events
        self.metrics = metrics
        self.device = device
        self._collections: dict[str, Collection] = {}
        self._lock = threading.RLock()
        self._reindex_tasks: dict[str, asyncio.Task[None]] = {}
        self._epoch = 0
        """bumped (under the lock) whenever the set of open collections changes"""
        self._serving = ServingLock(backend.shared_root)
        alone = self._serving.alone()
        self.refresh()
        self.sweep(0.0 if alone else ORPHAN_GRACE_S)
        backend.listen(self.on_store_change)
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="uniadapter-collections-watch", daemon=True)
        self._watcher.start()

    def sweep(self, min_age_s: float) -> Swept:
        """Remove what crashes left (files older than `min_age_s`): media no committed item references, temp
        files, collection folders half made or half deleted."""
        swept = Swept()
        try:
            with self._lock:
                collections = list(self._collections.items())
            swept += self.backend.remove_leftovers({name for name, _ in collections}, min_age_s)
            for _, collection in collections:
                sources = [it.source for it in collection.store.all_items()]
                swept += remove_orphan_media(collection.media_dir, sources, min_age_s)
                swept.temp += remove_temp([collection.folder, collection.thumbs_dir], min_age_s)
        except (StoreUnavailableError, CollectionGone, OSError) as e:
            log.warning("clean-up of the collections' files stopped: %s", e)
        if swept.media or swept.temp or swept.folders:
            log.info("removed %d orphan media files, %d temp files and %d leftover folders", swept.media,
                     swept.temp, swept.folders)
        return swept

    def _watch(self) -> None:
        """Notice deletes and creates made by other processes even when no event says so."""
        while not self._stop.wait(WATCH_EVERY_S):
            try:
                self.on_store_change("")
            except Exception:  # never let the watcher die; the next round tries again
                log.exception("checking the collections failed")

    # -- the set of collections ----------------------------------------------------------------

    def _open(self, name: str, store: Store | None = None) -> Collection:
        b = self.backend
        return Collection(store or b.open(name), b.local_dir(name), b.media_dir(name), device=self.device)

    def refresh(self) -> None:
        """Match the open collections with the store's, by identity: open collections another replica created,
        forget deleted ones, and replace a handle whose name now belongs to another collection (deleted and
        created again). Nothing changes while the store cannot be reached."""
        for _ in range(5):
            epoch = self._epoch
            try:
                present = self.backend.identities()
            except StoreUnavailableError as e:
                log.warning("cannot list collections: %s", e)
                return
            with self._lock:
                if epoch != self._epoch:
                    continue  # the set changed here while we read the store's: that list may be older than it
                for name, collection in list(self._collections.items()):
                    if collection.gone or present.get(name) != collection.uid:
                        self._forget(name, collection)
                for name in sorted(set(present) - set(self._collections)):
                    try:
                        self._collections[name] = self._open(name)
                        self._epoch += 1
                    except CollectionGone:
                        continue  # deleted again meanwhile
                    except Exception as e:
                        log.error("cannot open collection %s: %s", name, e)
                return

    def _forget(self, name: str, collection: Collection) -> None:
        """Under the lock: drop a deleted collection's handle and release its files."""
        if self._collections.get(name) is collection:
            del self._collections[name]
            self._epoch += 1
        task = self._reindex_tasks.pop(name, None)
        if task is not None and not task.done():
            task.get_loop().call_soon_threadsafe(task.cancel)
        collection.discard()

    def on_store_change(self, name: str) -> None:
        """Another process changed collection `name` ("": maybe any): catch up now, not on the next read."""
        self.refresh()
        with self._lock:
            targets = [self._collections[name]] if name in self._collections else (
                list(self._collections.values()) if not name else [])
        for collection in targets:
            with contextlib.suppress(CollectionGone):
                collection.fresh()

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._collections)

    def get(self, name: str) -> Collection:
        """The collection named `name` now: caught up with its store, or, when the one this process had was
        deleted (here or by another replica), the one made since under its name."""
        with self._lock:
            found = self._collections.get(name)
        if found is not None and not found.gone:
            with contextlib.suppress(CollectionGone):
                found.fresh()
        if found is None or found.gone:
            self.refresh()
            with self._lock:
                found = self._collections.get(name)
        if found is None:
            raise NotFoundError(f"no collection named {name[:80]!r} (GET /collections lists them)")
        return found

    def all_stats(self) -> list[dict[str, Any]]:
        """Stats of every collection; one deleted meanwhile is left out (a listing never fails for one)."""
        self.refresh()
        out = []
        for name in self.names():
            try:
                out.append(self.get(name).stats())
            except NotFoundError:
                continue
        return out

    def create(self, name: str, kind: str, adapter: str | None, factory: str = "flat",
               moments: MomentSpec | None = None) -> Collection:
        if not NAME_RE.fullmatch(name):
            raise InputError(f"invalid collection name {name[:80]!r}: 1-64 ASCII letters, digits, '.', '_' or '-', "
                             "starting with a letter or digit")
        if kind not in KINDS:
            raise InputError(f"kind must be one of {KINDS}, got {kind!r}")
        if moments is not None:
            self.check_moments(kind, moments)
        meta = self.adapters.resolve(adapter, "retrieval")  # None: the default retrieval set
        dim = self.engine.embed_dim
        factory = validate_factory(factory, dim)
        self.refresh()  # a name deleted elsewhere is free, whatever handle this process still had
        with self._lock:
            if name in self._collections:
                raise ConflictError(f"collection {name!r} already exists")
            store = self.backend.create(name, kind, meta.ref if meta else "none", factory, dim, moments)
            collection = self._collections[name] = self._open(name, store)
            self._epoch += 1
        self.events.publish({"type": "collection", "name": name})
        return collection

    def check_moments(self, kind: str, spec: MomentSpec) -> None:
        """A moment spec a `kind` collection can use (a 4xx naming the field otherwise)."""
        s = self.settings
        if kind != "video":
            raise InputError(f"moments: only video collections index moments (kind is {kind!r})")
        for field, value in (("window_s", spec.window_s), ("stride_s", spec.stride_s)):
            if not math.isfinite(value) or value <= 0:
                raise InputError(f"moments.{field}: must be a positive number of seconds, got {value!r}")
        if spec.window_s < s.min_moment_stride_s:
            raise InputError(f"moments.window_s: {spec.window_s:g} s is under the shortest moment this server cuts "
                             f"({s.min_moment_stride_s:.4g} s: MAX_MOMENT_VIDEO_SECONDS / (MAX_MOMENTS_PER_VIDEO - 2))")
        if spec.window_s > s.max_moment_video_seconds:
            raise InputError(f"moments.window_s: {spec.window_s:g} s is longer than the longest video a moment "
                             f"collection takes (MAX_MOMENT_VIDEO_SECONDS, {s.max_moment_video_seconds:g} s)")
        if spec.stride_s < s.min_moment_stride_s:  # what the schema says too (MomentsIn.stride_s minimum)
            most = math.floor((s.max_moment_video_seconds - spec.window_s) / spec.stride_s) + 2  # counted, not planned
            raise InputError(f"moments.stride_s: {spec.stride_s:g} s is under {s.min_moment_stride_s:.4g} s: a video "
                             f"of {s.max_moment_video_seconds:g} s would have up to {most:g} moments, over "
                             f"MAX_MOMENTS_PER_VIDEO ({s.max_moments_per_video})")

    def drop(self, name: str) -> None:
        """Delete the collection: writes through any handle of it fail from now on (404), in every replica;
        its files and snapshots go, and the name is free at once."""
        collection = self.get(name)
        with self._lock:
            try:
                self.backend.drop(name, collection.uid)
            except CollectionGone:
                self._forget(name, collection)
                raise NotFoundError(f"no collection named {name[:80]!r} (deleted meanwhile)") from None
            self._forget(name, collection)
        self.events.publish({"type": "collection", "name": name})

    def close(self) -> None:
        self._stop.set()
        self._watcher.join(WATCH_EVERY_S + 5)
        for task in self._reindex_tasks.values():
            task.cancel()
        with self._lock:
            for collection in self._collections.values():
                try:
                    collection.close()
                except Exception:
                    log.exception("closing collection %s", collection.folder.name)
        self._serving.close()

    # -- items -----------------------------------------------------------------------------------

    def adapter_of(self, collection: Collection, meta: CollectionMeta | None = None) -> AdapterSetMeta | None:
        """The version the collection is indexed with (from `meta` when the caller just read it)."""
        ref = (meta or collection.meta).adapter_ref
        return None if ref == "none" else self.adapters.resolve(ref, "retrieval")

    async def add(self, name: str, items: list[IncomingItem], deadline: Deadline | None = None) -> Added:
        """Embed and add items, within the request's `deadline` (None: a request's time from now, for offline
        indexing and the demo); all or nothing. Acknowledged (returned) only once committed to this very
        collection: one deleted meanwhile answers 404 and keeps nothing."""
        deadline = deadline or Deadline.after(self.settings.request_timeout_s)
        collection = self.get(name)
        if collection.moments:  # a long video's windows: minutes, not a request's seconds
            deadline = Deadline.after(max(deadline.remaining(), self.settings.moment_add_timeout_s))
        with self.engine.admit(len(items)), _noting_gone(collection):
            prepared = await run_in_threadpool(self._prepare_all, collection, items)
            ids = await self._add_prepared(collection, prepared, deadline)
        try:
            count = await run_in_threadpool(collection.store.count)
        except (CollectionGone, StoreUnavailableError):  # committed before a delete / an outage: still added
            count = collection.index.ntotal
        return Added(collection.uid, ids, count)

    async def _add_prepared(self, collection: Collection, prepared: list[Prepared], deadline: Deadline) -> list[str]:
        name = collection.name
        for _ in range(3):
            meta = await run_in_threadpool(lambda: collection.meta)  # a store read: off the event loop
            adapter = self.adapter_of(collection, meta)
            if meta.moments is None:
                vectors = await asyncio.gather(*(self._embed(meta.kind, p.content, p.sha256, adapter, p.label,
                                                             deadline) for p in prepared))
                spans: list[tuple[Span, ...]] = [()] * len(prepared)
            else:
                cut = await asyncio.gather(*(self._embed_moments(p.content, p.sha256, adapter, p.label, deadline,
                                                                 spec=meta.moments) for p in prepared))
                spans, vectors = [c[0] for c in cut], [c[1] for c in cut]
            await run_in_threadpool(self.files.store, collection.media_dir, prepared, collection.name,
                                    lambda: collection.gone)
            news = [NewItem(p.external_id, p.source, p.sha256, p.metadata, v, m)
                    for p, v, m in zip(prepared, vectors, spans, strict=True)]
            try:
                await run_in_threadpool(collection.store.add, news, meta.generation)
                break
            except GenerationChanged:
                continue  # re-indexed under another version meanwhile: embed again
        else:
            raise ConflictError(f"collection {name!r} kept switching adapter versions; retry")
        await run_in_threadpool(self._after_write, collection)
        return [p.external_id for p in prepared]

    def _after_write(self, collection: Collection) -> None:
        """A write committed: index it here and tell the other replicas. A delete that came right after it
        does not make the write fail (it was acknowledged by the store first)."""
        with contextlib.suppress(CollectionGone):
            collection.sync()
        self.events.publish({"type": "collection", "name": collection.name})

    def _prepare_all(self, collection: Collection, items: list[IncomingItem]) -> list[Prepared]:
        meta = collection.meta
        long = meta.moments is not None
        out = [self.files.prepare(meta.kind, i, it, self._check_text, long=long) for i, it in enumerate(items)]
        taken = collection.store.existing([p.external_id for p in out])
        if taken:
            raise ConflictError(f"ids already in collection {collection.meta.name!r}: {sorted(taken)[:5]}")
        return out

    def _check_text(self, text: str, field: str) -> str:
        return check_text(text, field, self.settings.max_text_chars)

    def resolve_media_path(self, path: str, field_name: str) -> Path:
        """A file under the media root named by a client (every failure is the client's 4xx)."""
        return self.files.resolve(path, field_name)

    def delete_item(self, name: str, external_id: str) -> None:
        collection = self.get(name)
        with _noting_gone(collection):
            collection.store.delete(external_id)
        self._after_write(collection)

    # -- embedding -------------------------------------------------------------------------------

    async def _embed(self, kind: str, content: bytes | str, sha256: str, adapter: AdapterSetMeta | None,
                     field: str, deadline: Deadline) -> np.ndarray:
        key = self.cache.key(adapter.ref if adapter else "none", sha256, kind)
        cached = await self.cache.get(key)
        if cached is not None:
            self.metrics.cache.labels(result="hit").inc()
            return np.frombuffer(cached, dtype=np.float32).copy()
        self.metrics.cache.labels(result="miss").inc()
        ref = adapter.ref if adapter else None
        if kind == "text":
            assert isinstance(content, str)
            vector = (await self.engine.run(EmbedJob(query=content, ref=ref, deadline=deadline))).numpy()
        else:
            assert isinstance(content, bytes)
            # bulk: adds and re-indexing wait their turn for the decode budget up to the deadline, within
            # the bulk share, yielding to task routes' decodes
            visual = await self.decoder.media_input(kind, content, adapter, field, bulk=True, deadline=deadline)
            vector = (await self.engine.run(EmbedJob(query=visual, ref=ref, deadline=deadline))).numpy()
        vector = np.ascontiguousarray(vector, np.float32)
        self.cache.set(key, vector.tobytes())
        return vector

    async def _embed_moments(self, content: bytes | str, sha256: str, adapter: AdapterSetMeta | None, field: str,
                             deadline: Deadline, *, spec: MomentSpec | None = None,
                             spans: tuple[Span, ...] | None = None) -> tuple[tuple[Span, ...], np.ndarray]:
        """A video of a moment collection -> (its moments, their embeddings (n, D)): cut by `spec` (an add), or
        at the `spans` stored with it (a re-index); decoded in one streaming pass while earlier windows embed.
        Cached per (version, media, window and stride) as [n, spans..., vectors...] float32."""
        assert isinstance(content, bytes)
        ref = adapter.ref if adapter else None
        cut = f"{spec.window_s:g}/{spec.stride_s:g}" if spec is not None else moments_json(spans or ()) or ""
        key = self.cache.key(ref or "none", sha256, f"moments:{hashlib.sha256(cut.encode()).hexdigest()[:16]}")
        cached = await self.cache.get(key)
        if cached is not None:
            found = _unpack_moments(cached, self.engine.embed_dim)
            if found is not None:
                self.metrics.cache.labels(result="hit").inc()
                return found
        self.metrics.cache.labels(result="miss").inc()
        frames = frames_for(adapter, None, self.settings.num_frames)
        vectors: list[np.ndarray] = []
        async with self.decoder.moments(content, frames, field, deadline=deadline,
                                        spans=list(spans) if spans is not None else None,
                                        window_s=spec.window_s if spec else None,
                                        stride_s=spec.stride_s if spec else None) as moments:
            if len(moments.spans) > self.settings.max_moments_per_video:
                raise MediaTooLargeError(f"{field}: {len(moments.spans)} moments is over MAX_MOMENTS_PER_VIDEO "
                                         f"({self.settings.max_moments_per_video})")
            async for clips in moments.clips():
                embedded = await asyncio.gather(*(self.engine.run(EmbedJob(query=c, ref=ref, deadline=deadline))
                                                  for c in clips))
                vectors += [e.numpy() for e in embedded]
            found_spans = tuple((float(a), float(b)) for a, b in moments.spans)
        stacked = np.ascontiguousarray(np.stack(vectors), np.float32)
        self.cache.set(key, _pack_moments(found_spans, stacked))
        return found_spans, stacked

    def load_content(self, collection: Collection, item: Item) -> bytes | str:
        """The item's media bytes (or text), for re-ranking and re-indexing."""
        meta = collection.meta
        return self.files.load(collection.media_dir, meta.kind, item, long=meta.moments is not None)

    def _contents(self, collection: Collection, items: list[Item]) -> list[bytes | str]:
        return [self.load_content(collection, it) for it in items]

    # -- search ----------------------------------------------------------------------------------

    async def search(self, collection: Collection, query: np.ndarray, k: int) -> list[Hit]:
        return await run_in_threadpool(collection.search, query, k)

    # -- re-indexing -----------------------------------------------------------------------------

    def start_reindex(self, name: str, adapter: str) -> str:
        collection = self.get(name)
        meta = self.adapters.resolve(adapter, "retrieval") if adapter not in ("none", "bare") else None
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
        name, kind = collection.name, collection.kind
        chunk, chunk_s = ((MOMENT_REINDEX_CHUNK, self.settings.moment_add_timeout_s) if collection.moments
                          else (REINDEX_CHUNK, self.settings.request_timeout_s))
        try:
            generation = (await run_in_threadpool(lambda: collection.meta)).generation + 1  # a store read
            while True:
                batch = await run_in_threadpool(collection.store.missing, generation, chunk)
                if not batch:
                    if await run_in_threadpool(collection.store.switch, generation, ref):
                        break
                    continue
                contents = await run_in_threadpool(self._contents, collection, batch)
                deadline = Deadline.after(chunk_s)  # each chunk: a request's time (an add's, for moments)
                try:
                    with self.engine.admit(len(batch)):
                        vectors = await asyncio.gather(*(
                            self._embed_again(kind, c, it, adapter, deadline)
                            for c, it in zip(contents, batch, strict=True)))
                except OverloadedError as e:  # live traffic first: re-index when there is room
                    await asyncio.sleep(e.retry_after)
                    continue
                await run_in_threadpool(collection.store.put_vectors,
                                        {it.item_id: v for it, v in zip(batch, vectors, strict=True)}, generation)
            await run_in_threadpool(self._after_write, collection)
            log.info("collection %s re-indexed with %s", name, ref)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            if isinstance(e, CollectionGone) or _deleted(collection):  # its files went first: not a failure
                log.info("collection %s was deleted while re-indexing to %s", name, ref)
                return
            log.exception("re-indexing %s to %s failed", name, ref)
            with contextlib.suppress(Exception):
                collection.store.set_reindex_target(None)


    async def _embed_again(self, kind: str, content: bytes | str, item: Item, adapter: AdapterSetMeta | None,
                           deadline: Deadline) -> np.ndarray:
        """A stored item under another version: one embedding, or one per moment at its stored spans."""
        field = f"item {item.external_id!r}"
        if item.moments:
            return (await self._embed_moments(content, item.sha256 or "", adapter, field, deadline,
                                              spans=item.moments))[1]
        return await self._embed(kind, content, item.sha256 or "", adapter, field, deadline)


def _pack_moments(spans: tuple[Span, ...], vectors: np.ndarray) -> bytes:
    head = np.asarray([len(spans), *(t for span in spans for t in span)], np.float32)
    return head.tobytes() + np.ascontiguousarray(vectors, np.float32).tobytes()


def _unpack_moments(blob: bytes, dim: int) -> tuple[tuple[Span, ...], np.ndarray] | None:
    """A cached moment embedding; None when it is not one of `dim` (written by another model: embed again)."""
    values = np.frombuffer(blob, np.float32)
    if len(values) == 0:
        return None
    n = int(values[0])
    if n < 1 or len(values) != 1 + 2 * n + n * dim:
        return None
    spans = tuple((float(a), float(b)) for a, b in values[1:1 + 2 * n].reshape(n, 2))
    return spans, values[1 + 2 * n:].reshape(n, dim).copy()


@contextlib.contextmanager
def _noting_gone(collection: Collection) -> Iterator[None]:
    """A write that found its collection deleted: the next request looks the name up again."""
    try:
        yield
    except CollectionGone:
        collection.gone = True
        raise


def _deleted(collection: Collection) -> bool:
    """Whether the collection is known deleted (here or, as its store says, by another process)."""
    if collection.gone:
        return True
    try:
        collection.store.meta()
    except CollectionGone:
        return True
    except Exception:  # unreachable store: not known deleted
        return False
    return False
