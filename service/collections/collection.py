"""One collection in this process: its store (the truth, SQLite or PostgreSQL) + a FAISS index and the item
rows it holds, kept in step by replaying the store's op log, so every process sharing the store sees each
other's writes. When the store cannot be reached, searches answer from what is in memory.

In a moment collection the index holds one vector per moment, under the vector id item_id * MOMENT_SLOTS +
the moment's index; a search maps hits back to (item, moment) and, by default, keeps each item's best moment."""

from __future__ import annotations

import contextlib
import heapq
import logging
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from uniadapter_serve.errors import CorruptMediaError, NotFoundError
from uniadapter_serve.service.collections.index import CPU, FaissDevice, VectorIndex
from uniadapter_serve.service.collections.store import (
    MOMENT_SLOTS,
    CollectionGone,
    CollectionMeta,
    Item,
    Span,
    Store,
    StoreUnavailableError,
    moment_vector_ids,
)

log = logging.getLogger(__name__)

SNAPSHOT_FILE = "index.snap"
THUMBS = "thumbs"
"""thumbnails cached in the collection's folder (service/collections/item_files.py)"""
SNAPSHOT_EVERY_OPS = 2000


@dataclass(frozen=True)
class Hit:
    item: Item
    score: float
    moment: int | None = None
    """the index of the moment that matched, in a moment collection"""

    @property
    def span(self) -> Span | None:
        """(start_s, end_s) of the moment that matched."""
        return None if self.moment is None else self.item.moments[self.moment]


class Collection:
    def __init__(self, store: Store, folder: Path, media_dir: Path, *, device: FaissDevice = CPU) -> None:
        self.store = store
        self.folder = folder
        """this process's folder: index snapshots (and, with SQLite, the store itself)"""
        self.media_dir = store.media_folder() or media_dir
        """uploaded media, content-addressed"""
        self.device = device
        self._meta = store.meta()
        self.name = self._meta.name
        self.uid = self._meta.uid
        """this collection's identity; another made later under the same name has another"""
        self.kind = self._meta.kind
        """image or video (fixed for the collection's life)"""
        self.gone = False
        """set once the store said the collection was deleted: the manager forgets this handle"""
        self._items: dict[int, Item] = {}
        """the rows of the indexed items, so hits are answered without the store"""
        self.moments = self._meta.moments is not None
        """one vector per moment (fixed for the collection's life)"""
        self._sync_lock = threading.Lock()
        self.index = self._open_index(self._meta)
        self._snapshot_seq = self.index.seq
        self.unavailable_since: float | None = None
        self.sync()

    @property
    def thumbs_dir(self) -> Path:
        """This replica's cache of the items' thumbnails."""
        return self.folder / THUMBS

    @property
    def meta(self) -> CollectionMeta:
        """From the store; the last one seen while it cannot be reached."""
        with contextlib.suppress(StoreUnavailableError), self._noting_gone():
            self._meta = self.store.meta()
        return self._meta

    @contextlib.contextmanager
    def _noting_gone(self) -> Iterator[None]:
        try:
            yield
        except CollectionGone:
            self.gone = True
            raise

    def _open_index(self, meta: CollectionMeta) -> VectorIndex:
        path = self.folder / SNAPSHOT_FILE
        if path.is_file():
            try:
                index = VectorIndex.load(path, meta.dim, meta.factory, device=self.device)
                if (index.owner == _owner(meta) and index.generation == meta.generation
                        and index.seq <= self.store.last_seq()):
                    self._items = {it.item_id: it for it in self.store.all_items()}
                    return index
                log.info("snapshot of %s is not this collection's or stale (owner %r, generation %d, seq %d): "
                         "rebuilding", meta.name, index.owner, index.generation, index.seq)
            except (CorruptMediaError, OSError, ValueError, KeyError, RuntimeError) as e:
                log.warning("unreadable snapshot %s (%s): rebuilding from the store", path, e)
        index = VectorIndex(meta.dim, meta.factory, device=self.device)
        index.generation, index.seq, index.owner = meta.generation, -1, _owner(meta)  # -1: rebuild on first sync
        return index

    def sync(self) -> None:
        """Apply the store's ops this process has not seen (cheap when there are none); CollectionGone once the
        collection was deleted."""
        with self._sync_lock, self._noting_gone():
            if self.store.last_seq() == self.index.seq:
                return
            meta = self._meta = self.store.meta()
            ops = self.store.ops_after(max(self.index.seq, 0))
            if self.index.seq < 0 or meta.generation != self.index.generation or any(o == "switch" for _, o, _ in ops):
                self._rebuild(meta)
                ops = []  # the rebuild read its own seq with the data
            else:
                deleted = {i for _, o, i in ops if o == "delete" and i is not None}
                added = [i for _, o, i in ops if o == "add" and i is not None and i not in deleted]
                self.index.remove(self._vector_ids_of(sorted(deleted)))
                for item_id in deleted:
                    self._items.pop(item_id, None)
                ids, vectors = self.store.vectors(added, meta.generation, meta.dim)
                self._items.update(self.store.items(added))
                self.index.add(self._vector_ids(ids), vectors)
                if self.index.needs_compaction:  # deletions an index cannot remove: rebuild from the store
                    log.info("compacting the index of %s (%d tombstones)", meta.name, self.index.tombstones)
                    self._rebuild(meta)
            if ops:  # the seq of the last op applied (the log may have grown since last_seq was read)
                self.index.seq = ops[-1][0]
            seq = self.index.seq
        if seq - self._snapshot_seq >= SNAPSHOT_EVERY_OPS:
            try:
                self.snapshot()
            except Exception:  # an optimisation: the store holds the data, and a request must not fail for it
                log.exception("snapshot of %s failed; the next start replays the op log instead", self.name)

    def _rebuild(self, meta: CollectionMeta) -> None:
        """The index and item rows from one consistent snapshot of the store, at the seq it reflects."""
        seq, items, ids, vectors = self.store.state(meta.generation, meta.dim)
        self.index.rebuild(self._vector_ids(ids), vectors)
        self.index.generation, self.index.seq, self.index.owner = meta.generation, seq, _owner(meta)
        self._items = {it.item_id: it for it in items}

    def _vector_ids(self, item_ids: np.ndarray) -> np.ndarray:
        """The store's ids of vectors (one per item; in a moment collection, repeated per moment) -> index ids."""
        return moment_vector_ids(item_ids) if self.moments else item_ids

    def _vector_ids_of(self, item_ids: list[int]) -> np.ndarray:
        """Every index id of these items (those this process holds: the others were never indexed here)."""
        if not self.moments:
            return np.asarray(item_ids, np.int64)
        return np.asarray([i * MOMENT_SLOTS + m for i in item_ids if i in self._items
                           for m in range(len(self._items[i].moments))], np.int64)

    def snapshot(self) -> None:
        if self.gone:  # its folder is gone with it: never make it again
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        self.index.save(self.folder / SNAPSHOT_FILE)
        self._snapshot_seq = self.index.seq

    def fresh(self) -> bool:
        """Bring the index up to date; False (and serve what is in memory) when the store is unreachable."""
        try:
            self.sync()
        except StoreUnavailableError as e:
            if self.unavailable_since is None:
                self.unavailable_since = time.monotonic()
                log.warning("collection %s: the store is unavailable (%s); searching what is in memory",
                            self.name, e)
            return False
        self.unavailable_since = None
        return True

    def search(self, query: np.ndarray, k: int, keep: Callable[[Item], bool] | None = None, *,
               group_by_item: bool = True) -> list[Hit]:
        """(D,) L2-normalised query -> up to k hits, best first; with `keep`, only among the items it accepts
        (applied inside the index search, so k hits come back whenever k items pass). In a moment collection a
        hit is a moment: with `group_by_item` only each item's best one (k items), else every moment (k moments)."""
        self.fresh()
        items = self._items
        q = query[None].astype(np.float32)
        allowed = None if keep is None else [i for i, it in list(items.items()) if keep(it)]
        if not self.moments:
            if allowed is None:
                scores, ids = self.index.search(q, k)
            else:
                scores, ids = self.index.search_allowed(q, k, np.asarray(allowed, np.int64))
            return [Hit(items[int(i)], float(s)) for s, i in zip(scores[0], ids[0], strict=False)
                    if int(i) in items]
        vectors = self._vector_ids_of(allowed) if allowed is not None else None
        available = self.index.ntotal if vectors is None else len(vectors)
        fetch = k if not group_by_item else min(available, 4 * k)
        while True:
            if vectors is None:
                scores, ids = self.index.search(q, max(1, fetch))
            else:
                scores, ids = self.index.search_allowed(q, max(1, fetch), vectors)
            hits = self._moment_hits(scores[0], ids[0], k, group_by_item)
            if len(hits) >= k or fetch >= available:
                return hits
            fetch = min(available, fetch * 4)

    def _moment_hits(self, scores: np.ndarray, ids: np.ndarray, k: int, group_by_item: bool) -> list[Hit]:
        items, hits, seen = self._items, [], set()
        for s, vid in zip(scores.tolist(), ids.tolist(), strict=False):
            item_id, moment = divmod(int(vid), MOMENT_SLOTS)
            item = items.get(item_id)
            if vid < 0 or item is None or moment >= len(item.moments) or (group_by_item and item_id in seen):
                continue
            seen.add(item_id)
            hits.append(Hit(item, float(s), moment))
            if len(hits) == k:
                break
        return hits

    def page(self, after: int, limit: int) -> tuple[list[Item], int | None]:
        """Indexed items in the order they were added, those with an item id above `after` -> (up to `limit`
        items, the cursor of the next page or None at the end)."""
        self.fresh()
        items = self._items
        ids = heapq.nsmallest(limit + 1, (i for i in list(items) if i > after))
        rows = [items[i] for i in ids[:limit] if i in items]
        return rows, (ids[limit - 1] if len(ids) > limit else None)

    def find(self, external_id: str) -> Item:
        """One item by its external id (NotFoundError); from memory while the store cannot be reached."""
        self.fresh()  # a collection deleted by another replica answers 404, not its old items
        try:
            return self.store.get(external_id)
        except StoreUnavailableError:
            for it in list(self._items.values()):
                if it.external_id == external_id:
                    return it
            raise NotFoundError(f"no item {external_id[:80]!r} in collection {self.name!r}") from None

    def stats(self) -> dict[str, Any]:
        fresh = self.fresh()
        meta = self.meta
        try:
            count = self.store.count()
        except StoreUnavailableError:
            count = len(self._items)
        return {"name": meta.name, "uid": self.uid, "kind": meta.kind, "adapter": meta.adapter_ref,
                "index": meta.factory, "dim": meta.dim, "items": count,
                "indexed": len(self._items) if self.moments else self.index.ntotal,
                "moments": None if meta.moments is None else {"window_s": meta.moments.window_s,
                                                              "stride_s": meta.moments.stride_s,
                                                              "indexed": self.index.ntotal},
                "generation": meta.generation,
                "reindex_target": meta.reindex_target, "exact_fallback": self.index.exact_fallback,
                "store_available": fresh}

    def close(self) -> None:
        """Snapshot (when it still exists) and release the store's connections and files."""
        try:
            self.fresh()
            self.snapshot()
        except CollectionGone:
            pass
        finally:
            self.store.close()

    def discard(self) -> None:
        """Forget a deleted collection: release its files, and remove what this process derived from it (its
        snapshot, when it is this collection's and not a later one's under the name; thumbnails)."""
        self.gone = True
        self.store.close()
        snapshot = self.folder / SNAPSHOT_FILE
        owner = VectorIndex.snapshot_owner(snapshot)
        if owner is not None and owner.split("/", 1)[0] == self.uid:
            snapshot.unlink(missing_ok=True)
        shutil.rmtree(self.thumbs_dir, ignore_errors=True)  # a cache: one made later re-makes its own
        with contextlib.suppress(OSError):  # empty now (PostgreSQL: this replica's folder of the collection)
            self.folder.rmdir()


def _owner(meta: CollectionMeta) -> str:
    """What an index of this collection at this generation is made of: the collection's uid and adapter version."""
    return f"{meta.uid}/{meta.adapter_ref}"
