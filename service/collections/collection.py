"""One collection on the data volume: SQLite store (truth) + FAISS index (kept in step by replaying
the store's op log), so several processes sharing the volume see each other's writes."""

from __future__ import annotations

import logging
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from uniadapter_serve.errors import CorruptMediaError
from uniadapter_serve.service.collections.faiss_device import CPU, FaissDevice
from uniadapter_serve.service.collections.index import VectorIndex
from uniadapter_serve.service.collections.store import CollectionMeta, Item, Store

log = logging.getLogger(__name__)

STORE_FILE = "items.sqlite"
SNAPSHOT_FILE = "index.snap"
SNAPSHOT_EVERY_OPS = 2000


@dataclass(frozen=True)
class Hit:
    item: Item
    score: float


class Collection:
    def __init__(self, folder: Path, *, device: FaissDevice = CPU) -> None:
        self.folder = folder
        self.device = device
        self.store = Store(folder / STORE_FILE)
        meta = self.store.meta()
        self.index = self._open_index(meta)
        self._sync_lock = threading.Lock()
        self._snapshot_seq = self.index.seq
        self.sync()

    @classmethod
    def create(cls, folder: Path, *, name: str, kind: str, adapter_ref: str, factory: str, dim: int,
               device: FaissDevice = CPU) -> Collection:
        folder.mkdir(parents=True, exist_ok=False)
        try:
            Store(folder / STORE_FILE).init_meta(name, kind, adapter_ref, factory, dim)
            return cls(folder, device=device)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise

    @property
    def meta(self) -> CollectionMeta:
        return self.store.meta()

    @property
    def media_dir(self) -> Path:
        return self.folder / "media"

    def _open_index(self, meta: CollectionMeta) -> VectorIndex:
        path = self.folder / SNAPSHOT_FILE
        if path.is_file():
            try:
                index = VectorIndex.load(path, meta.dim, meta.factory, device=self.device)
                if index.generation == meta.generation and index.seq <= self.store.last_seq():
                    return index
                log.info("snapshot of %s is stale (generation %d, seq %d): rebuilding", meta.name, index.generation,
                         index.seq)
            except (CorruptMediaError, OSError, ValueError, KeyError, RuntimeError) as e:
                log.warning("unreadable snapshot %s (%s): rebuilding from the store", path, e)
        index = VectorIndex(meta.dim, meta.factory, device=self.device)
        index.generation, index.seq = meta.generation, -1  # -1: rebuild on first sync
        return index

    def sync(self) -> None:
        """Apply the store's ops this process has not seen (cheap when there are none)."""
        with self._sync_lock:
            last = self.store.last_seq()
            if last == self.index.seq:
                return
            meta = self.store.meta()
            ops = self.store.ops_after(max(self.index.seq, 0))
            if self.index.seq < 0 or meta.generation != self.index.generation or any(o == "switch" for _, o, _ in ops):
                ids, vectors = self.store.all_vectors(meta.generation, meta.dim)
                self.index.rebuild(ids, vectors)
                self.index.generation = meta.generation
            else:
                deleted = {i for _, o, i in ops if o == "delete" and i is not None}
                added = [i for _, o, i in ops if o == "add" and i is not None and i not in deleted]
                self.index.remove(np.asarray(sorted(deleted), np.int64))
                ids, vectors = self.store.vectors(added, meta.generation, meta.dim)
                self.index.add(ids, vectors)
            if self.index.needs_compaction:  # deletions an index cannot remove: rebuild from the store
                log.info("compacting the index of %s (%d tombstones)", meta.name, self.index.tombstones)
                ids, vectors = self.store.all_vectors(meta.generation, meta.dim)
                self.index.rebuild(ids, vectors)
            self.index.seq = last
        if last - self._snapshot_seq >= SNAPSHOT_EVERY_OPS:
            try:
                self.snapshot()
            except Exception:  # an optimisation: the store holds the data, and a request must not fail for it
                log.exception("snapshot of %s failed; the next start replays the op log instead", self.folder.name)

    def snapshot(self) -> None:
        self.index.save(self.folder / SNAPSHOT_FILE)
        self._snapshot_seq = self.index.seq

    def search(self, query: np.ndarray, k: int) -> list[Hit]:
        """(D,) L2-normalised query -> up to k hits, best first."""
        self.sync()
        scores, ids = self.index.search(query[None].astype(np.float32), k)
        found = [int(i) for i in ids[0] if i >= 0]
        items = self.store.items(found)
        return [Hit(items[int(i)], float(s)) for s, i in zip(scores[0], ids[0], strict=False)
                if int(i) in items]

    def stats(self) -> dict[str, Any]:
        self.sync()
        meta = self.meta
        return {"name": meta.name, "kind": meta.kind, "adapter": meta.adapter_ref, "index": meta.factory,
                "dim": meta.dim, "items": self.store.count(), "indexed": self.index.ntotal,
                "generation": meta.generation, "reindex_target": meta.reindex_target,
                "exact_fallback": self.index.exact_fallback}

    def close(self) -> None:
        try:
            self.sync()
            self.snapshot()
        finally:
            self.store.close()
