"""One collection's FAISS index: inner product over L2-normalised embeddings, ids = item ids.

`flat` (default) is `IDMap2,Flat` (exact). Any other FAISS factory string (`IVF1024,Flat`,
`HNSW32,Flat`, `IVF4096,PQ32`) is wrapped in IDMap2; an index that needs training serves exactly
from a flat index until enough vectors arrived, then trains on all of them and takes over.
Indexes that cannot remove ids (HNSW, GPU flat) keep tombstones that searches filter out; past
`COMPACT_AT` of them (or a tenth of the index) the collection rebuilds the index without them.
FAISS is not thread-safe for add + search: one lock guards every call, and calls on a GPU index all
run on the device's one FAISS thread. Snapshots always serialise a CPU copy.

The device (`FaissDevice`): the CPU, or one GPU (chosen by `faiss_device.choose`) with its worker. FAISS asks
for one `StandardGpuResources` per CPU thread, so every call on a GPU index runs on one worker thread, which
owns the resources (created there, on first use): searches from the threadpool, syncs from request handlers
and event listeners, and snapshots all queue on it.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from queue import SimpleQueue
from typing import Any, TypeVar

import faiss
import numpy as np

from uniadapter_serve.errors import ConfigError, CorruptMediaError
from uniadapter_serve.fileio import atomic_write

log = logging.getLogger(__name__)

T = TypeVar("T")

SNAPSHOT_MAGIC = b"UAIDX001"
MIN_TRAIN_PER_LIST = 39
COMPACT_AT = 1024
"""Tombstones that make an index due for a rebuild (also at a tenth of the index, when that is more)."""
GPU_MAX_K = 2048
"""FAISS GPU searches return at most this many neighbours."""
FILTER_MAX_FETCH = 16384
"""A filtered search on an index that takes no id selector over-fetches up to this many neighbours."""


class GpuWorker:
    """One thread that runs every FAISS call on GPU indexes and owns their `StandardGpuResources`."""

    def __init__(self, gpu: int) -> None:
        self.gpu = gpu
        self._jobs: SimpleQueue[tuple[Callable[[], Any], Future[Any]] | None] = SimpleQueue()
        self._resources: Any = None
        self.thread = threading.Thread(target=self._loop, name=f"uniadapter-faiss-gpu{gpu}", daemon=True)
        self.thread.start()

    @property
    def resources(self) -> Any:
        """The GPU resources; only valid on the worker thread (created there on first use)."""
        assert threading.current_thread() is self.thread, "GPU resources used off the FAISS worker thread"
        if self._resources is None:
            self._resources = faiss.StandardGpuResources()
        return self._resources

    def run(self, fn: Callable[[], T]) -> T:
        if threading.current_thread() is self.thread:
            return fn()  # already on the worker (a call made from inside another)
        future: Future[T] = Future()
        self._jobs.put((fn, future))
        return future.result()

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fn, future = job
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as e:
                    future.set_exception(e)

    def close(self) -> None:
        self._jobs.put(None)
        self.thread.join(10)


@dataclass
class FaissDevice:
    """CPU (gpu None) or one GPU with its worker; `warning` says why a GPU was not used."""

    gpu: int | None = None
    warning: str | None = None
    worker: GpuWorker | None = field(default=None, repr=False)

    @property
    def on_gpu(self) -> bool:
        return self.gpu is not None

    def run(self, fn: Callable[[], T]) -> T:
        """Run a FAISS call where it must run: on the GPU worker, or right here for the CPU."""
        return self.worker.run(fn) if self.worker is not None else fn()

    def to_gpu(self, index: Any) -> Any:
        """A GPU copy of a CPU index (call inside `run`)."""
        assert self.worker is not None and self.gpu is not None
        return faiss.index_cpu_to_gpu(self.worker.resources, self.gpu, index)

    def to_cpu(self, index: Any) -> Any:
        """A CPU copy of a GPU index (call inside `run`)."""
        return faiss.index_gpu_to_cpu(index)

    def close(self) -> None:
        if self.worker is not None:
            self.worker.close()


CPU = FaissDevice()


def validate_factory(factory: str, dim: int) -> str:
    """Check a factory string by building it; returns the normalised string."""
    if factory.lower() == "flat":
        return "flat"
    if "idmap" in factory.lower():
        raise ConfigError(f"index factory {factory!r}: leave out IDMap, ids are handled by the collection")
    try:
        faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise ConfigError(f"invalid FAISS index factory {factory!r}: {str(e).splitlines()[-1]}") from e
    return factory


def default_search_params(index: Any) -> None:
    """Search settings that keep recall@10 >= 0.95 on embedding-like data (bench/faiss_search.py:
    IVF4000 at 1 M vectors: nprobe 32 -> 0.985, 64 -> 0.996; HNSW32: efSearch 128 -> 0.985)."""
    try:
        ivf = faiss.extract_index_ivf(index)
        ivf.nprobe = min(ivf.nlist, max(16, ivf.nlist // 64))
        return
    except RuntimeError:
        pass
    inner = faiss.downcast_index(index.index) if hasattr(index, "index") else faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexHNSW):
        inner.hnsw.efSearch = max(inner.hnsw.efSearch, 128)


def _train_size(factory: str) -> int:
    m = re.search(r"IVF(\d+)", factory)
    lists = int(m.group(1)) if m else 256
    return MIN_TRAIN_PER_LIST * lists


class VectorIndex:
    def __init__(self, dim: int, factory: str = "flat", *, device: FaissDevice = CPU) -> None:
        self.dim = dim
        self.factory = validate_factory(factory, dim)
        self.device = device
        self._lock = threading.RLock()
        self._on_gpu = False
        """the current index is a GPU index (only flat indexes go to the GPU)"""
        self._index = self._new(self.factory)
        self._fallback = not self._index.is_trained
        if self._fallback:
            self._index = self._new("flat")  # exact until there is enough data to train
        self._tombstones: set[int] = set()
        self.seq = 0
        """Highest op seq of the store that this index reflects."""
        self.generation = 0
        self.owner = ""
        """what the index was built from: the collection's uid and adapter version (a snapshot is used only by
        the same collection, never by another that has its name or another version's vectors)"""

    @property
    def gpu(self) -> bool:
        return self._on_gpu

    def _run(self, fn: Any) -> Any:
        """A FAISS call on the current index: on the GPU's FAISS thread when it lives there."""
        return self.device.run(fn) if self._on_gpu else fn()

    def _new(self, factory: str) -> Any:
        """A new empty index (sets `_on_gpu`): flat indexes go to the GPU when the device has one."""
        if factory == "flat":
            index = faiss.index_factory(self.dim, "IDMap2,Flat", faiss.METRIC_INNER_PRODUCT)
            if self.device.on_gpu:
                # GPU flat search; removals there become tombstones (GpuIndexFlat cannot remove ids)
                self._on_gpu = True
                return self.device.run(lambda: self.device.to_gpu(index))
            self._on_gpu = False
            return index
        index = faiss.index_factory(self.dim, factory, faiss.METRIC_INNER_PRODUCT)
        try:
            faiss.extract_index_ivf(index)  # IVF stores ids itself (IDMap over IVF would break remove_ids)
        except RuntimeError:
            index = faiss.index_factory(self.dim, f"IDMap2,{factory}", faiss.METRIC_INNER_PRODUCT)
        default_search_params(index)
        self._on_gpu = False
        return index

    @property
    def exact_fallback(self) -> bool:
        """True while a factory that needs training is served by a flat index."""
        return self.factory != "flat" and self._fallback

    @property
    def ntotal(self) -> int:
        with self._lock:
            return int(self._index.ntotal) - len(self._tombstones)

    @property
    def tombstones(self) -> int:
        with self._lock:
            return len(self._tombstones)

    @property
    def needs_compaction(self) -> bool:
        with self._lock:
            return len(self._tombstones) > max(COMPACT_AT, int(self._index.ntotal) // 10)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if len(ids) == 0:
            return
        with self._lock:
            self._tombstones.difference_update(int(i) for i in ids)
            x, xids = np.ascontiguousarray(vectors, np.float32), np.asarray(ids, np.int64)
            index = self._index
            self._run(lambda: index.add_with_ids(x, xids))
            self._maybe_train()

    def remove(self, ids: np.ndarray) -> None:
        if len(ids) == 0:
            return
        with self._lock:
            xids, index = np.asarray(ids, np.int64), self._index
            try:
                self._run(lambda: index.remove_ids(xids))
            except RuntimeError:  # e.g. HNSW or a GPU flat index: cannot remove, filter at search time instead
                self._tombstones.update(int(i) for i in ids)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(Q, D) -> scores, ids (Q, k); missing results have id -1."""
        with self._lock:
            fetch = min(int(self._index.ntotal), k + len(self._tombstones))
            if self._on_gpu:
                fetch = min(fetch, GPU_MAX_K)
            if fetch == 0:
                return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
            x, index = np.ascontiguousarray(queries, np.float32), self._index
            scores, ids = self._run(lambda: index.search(x, fetch))
            tombstones = set(self._tombstones)
        if tombstones:
            keep = [[j for j in range(fetch) if ids[q, j] not in tombstones][:k] for q in range(len(queries))]
            width = max((len(r) for r in keep), default=0)
            out_s = np.full((len(queries), width), -np.inf, np.float32)
            out_i = np.full((len(queries), width), -1, np.int64)
            for q, cols in enumerate(keep):
                out_s[q, : len(cols)] = scores[q, cols]
                out_i[q, : len(cols)] = ids[q, cols]
            return out_s, out_i
        return scores[:, :k], ids[:, :k]

    def search_allowed(self, query: np.ndarray, k: int, allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(1, D) -> scores, ids (1, <= k) among the `allowed` ids only. On a CPU flat index (the default) FAISS
        skips every other id inside the search (an id selector): exact, and k hits whenever k are allowed.
        Other indexes (IVF, HNSW, GPU) over-fetch, doubling up to FILTER_MAX_FETCH neighbours, and keep the
        allowed ones: past that bound a very selective filter may return fewer than k."""
        if len(allowed) == 0 or k == 0:
            return np.zeros((1, 0), np.float32), np.zeros((1, 0), np.int64)
        with self._lock:
            flat_cpu = not self._on_gpu and (self.factory == "flat" or self._fallback)
            if flat_cpu:
                keep = np.asarray([i for i in allowed.tolist() if i not in self._tombstones], np.int64)
                n = min(k, len(keep))
                if n == 0:
                    return np.zeros((1, 0), np.float32), np.zeros((1, 0), np.int64)
                selector = faiss.IDSelectorBatch(keep)
                params = faiss.SearchParameters()
                params.sel = selector  # `selector` stays referenced until the search returns
                scores, ids = self._index.search(np.ascontiguousarray(query, np.float32), n, params=params)
                found = ids[0] >= 0
                return scores[:, found], ids[:, found]
            total = int(self._index.ntotal)
        wanted = set(allowed.tolist())
        fetch = min(total, max(4 * k, 64))
        bound = min(total, GPU_MAX_K if self._on_gpu else FILTER_MAX_FETCH)
        while True:
            scores, ids = self.search(query, fetch)
            cols = [j for j in range(ids.shape[1]) if int(ids[0, j]) in wanted][:k]
            if len(cols) >= k or fetch >= bound:
                return scores[:, cols], ids[:, cols]
            fetch = min(bound, fetch * 2)

    def set_search_params(self, **params: Any) -> None:
        """e.g. nprobe=32 (IVF) or efSearch=128 (HNSW)."""
        with self._lock:
            ps = faiss.ParameterSpace()
            for name, value in params.items():
                ps.set_index_parameter(self._index, name, value)

    def rebuild(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Replace the contents (after a generation switch, or to drop tombstones)."""
        with self._lock:
            index = self._new(self.factory)
            fallback = False
            x, xids = np.ascontiguousarray(vectors, np.float32), np.asarray(ids, np.int64)
            if not index.is_trained:
                if len(ids) >= _train_size(self.factory):
                    index.train(x)
                else:
                    index, fallback = self._new("flat"), True
            if len(ids):
                self._run(lambda: index.add_with_ids(x, xids))
            self._index, self._tombstones, self._fallback = index, set(), fallback

    def _maybe_train(self) -> None:
        if not self.exact_fallback or self._index.ntotal < _train_size(self.factory):
            return
        host = self._host_copy()
        flat = faiss.downcast_index(host.index)
        vectors = flat.reconstruct_n(0, flat.ntotal)
        ids = faiss.vector_to_array(host.id_map).astype(np.int64)
        live = np.array([i not in self._tombstones for i in ids], dtype=bool)
        log.info("training %s on %d vectors", self.factory, int(live.sum()))
        self.rebuild(ids[live], vectors[live])

    def _host_copy(self) -> Any:
        """The current index as a CPU index (a copy when it lives on the GPU)."""
        if not self._on_gpu:
            return self._index
        index = self._index
        return self.device.run(lambda: self.device.to_cpu(index))

    # -- snapshots ---------------------------------------------------------------------------------

    def save(self, path: Path) -> None:
        """Atomic snapshot: header (seq, generation, tombstones) + the serialised CPU copy of the index."""
        with self._lock:
            blob = faiss.serialize_index(self._host_copy()).tobytes()
            header = json.dumps({"seq": self.seq, "generation": self.generation, "owner": self.owner,
                                 "factory": self.factory,
                                 "dim": self.dim, "tombstones": sorted(self._tombstones),
                                 "fallback": self._fallback}).encode()
        atomic_write(path, SNAPSHOT_MAGIC + len(header).to_bytes(8, "little") + header + blob)

    @staticmethod
    def snapshot_owner(path: Path) -> str | None:
        """What the snapshot at `path` was built from (`owner`), reading its header only; None if unreadable."""
        try:
            with path.open("rb") as f:
                head = f.read(16)
                if not head.startswith(SNAPSHOT_MAGIC) or len(head) < 16:
                    return None
                header = json.loads(f.read(int.from_bytes(head[8:16], "little")))
            return str(header.get("owner", ""))
        except (OSError, ValueError, AttributeError):
            return None

    @classmethod
    def load(cls, path: Path, dim: int, factory: str, *, device: FaissDevice = CPU) -> VectorIndex:
        data = path.read_bytes()
        if not data.startswith(SNAPSHOT_MAGIC):
            raise CorruptMediaError(f"{path} is not an index snapshot")
        n = int.from_bytes(data[8:16], "little")
        header = json.loads(data[16:16 + n])
        if header["dim"] != dim or header["factory"] != validate_factory(factory, dim):
            raise CorruptMediaError(f"{path} was built for another dim/factory")
        index = cls(dim, factory, device=device)
        loaded = faiss.deserialize_index(np.frombuffer(data[16 + n:], dtype=np.uint8))
        fallback = bool(header["fallback"])
        flat = factory == "flat" or fallback
        if device.on_gpu and flat:
            loaded = device.run(lambda: device.to_gpu(loaded))
        index._index, index._on_gpu = loaded, device.on_gpu and flat
        if not index._on_gpu:
            default_search_params(loaded)  # search parameters are not part of the serialised index
        index._tombstones = set(header["tombstones"])
        index._fallback = fallback
        index.seq, index.generation = int(header["seq"]), int(header["generation"])
        index.owner = str(header.get("owner", ""))  # snapshots from before identities: none (rebuilt)
        return index
