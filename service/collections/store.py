"""The collection store: the truth about collections, whatever holds it.

One interface, two backends, and nothing above this module knows which it has:

- SQLite (`sqlite_store.py`, the embedded default): one file per collection on the data volume; replicas on
  one host share the volume.
- PostgreSQL (`postgres_store.py`, `UNIADAPTER_DATABASE_URL=postgresql://...`): replicas on many hosts share
  one database; changes are announced with LISTEN/NOTIFY.

A collection's store holds its definition (kind, adapter binding, index factory, dim, generation), its items,
their embeddings per generation, and an ordered op log (add / delete / switch) whose seqs never go back and
become visible in order, so every process brings its in-memory FAISS index up to date by replaying the ops
after the seq it has applied. Every write is one transaction, acknowledged after it commits.
"""

from __future__ import annotations

import abc
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from uniadapter_serve.errors import NotFoundError, ServerBusyError


@dataclass
class Swept:
    """What a clean-up removed (`StoreBackend.remove_leftovers`, `cleanup`)."""

    media: int = 0
    temp: int = 0
    folders: int = 0

    def __iadd__(self, other: Swept) -> Swept:
        self.media += other.media
        self.temp += other.temp
        self.folders += other.folders
        return self


@dataclass(frozen=True)
class MomentSpec:
    """How a video collection cuts each video into searchable moments: windows of `window_s` seconds every
    `stride_s` seconds (a video no longer than a window is one moment)."""

    window_s: float
    stride_s: float

    def to_json(self) -> str:
        return json.dumps({"window_s": self.window_s, "stride_s": self.stride_s})

    @classmethod
    def from_json(cls, text: str | None) -> MomentSpec | None:
        """A stored spec; None for collections without moments (or a row no reader can take back)."""
        if not text:
            return None
        try:
            value = json.loads(text)
            return cls(float(value["window_s"]), float(value["stride_s"]))
        except (ValueError, TypeError, KeyError):
            return None


Span = tuple[float, float]
"""(start_s, end_s) of a moment, in seconds from the video's first frame"""
MOMENT_SLOTS = 1 << 16
"""vector ids of a moment collection: item_id * MOMENT_SLOTS + the moment's index (at most this many per video)"""


@dataclass(frozen=True)
class CollectionMeta:
    name: str
    kind: str
    adapter_ref: str
    factory: str
    dim: int
    generation: int
    reindex_target: str | None
    created: float
    uid: str = ""
    """the collection's identity: a name deleted and created again gets a new one (snapshots, replicas and
    handles compare it, never the name)"""
    moments: MomentSpec | None = None
    """video collections indexing moments: how videos are cut (None: one embedding per item)"""


@dataclass(frozen=True)
class Item:
    item_id: int
    external_id: str
    source: str
    sha256: str | None
    metadata: dict[str, Any]
    created: float = 0.0
    """when the item was added (seconds since the epoch)"""
    moments: tuple[Span, ...] = ()
    """the item's moments in a moment collection, in order (each has one embedding per generation)"""


@dataclass(frozen=True)
class NewItem:
    external_id: str
    source: str
    sha256: str | None
    metadata: dict[str, Any]
    vector: np.ndarray
    """(dim,), or (len(moments), dim) in a moment collection"""
    moments: tuple[Span, ...] = ()


Op = tuple[int, str, int | None]
"""(seq, 'add' | 'delete' | 'switch', item_id)"""


class StoreUnavailableError(ServerBusyError):
    """The store cannot be reached (PostgreSQL down): writes answer 503, reads use what is in memory."""

    def __init__(self, message: str, retry_after: float = 2.0) -> None:
        super().__init__(message, retry_after)


class CollectionGone(NotFoundError):
    """This handle's collection was deleted (perhaps by another replica; the name may exist again as another
    collection): nothing is written through it any more."""

    def __init__(self, name: str) -> None:
        super().__init__(f"collection {name[:80]!r} was deleted")
        self.name = name


class GenerationChanged(Exception):
    """The collection switched adapter versions while an add was embedding; embed again."""


class Store(abc.ABC):
    """One collection's truth."""

    @abc.abstractmethod
    def meta(self) -> CollectionMeta: ...

    @abc.abstractmethod
    def set_reindex_target(self, ref: str | None) -> None: ...

    @abc.abstractmethod
    def add(self, items: Sequence[NewItem], generation: int) -> list[int]:
        """Insert items with their embeddings for `generation`, atomically; a duplicate external id (in the
        batch or the collection) rejects the whole batch (ConflictError); GenerationChanged if the
        collection is no longer at `generation`. -> item ids."""

    @abc.abstractmethod
    def delete(self, external_id: str) -> int: ...

    @abc.abstractmethod
    def items(self, item_ids: Sequence[int]) -> dict[int, Item]: ...

    @abc.abstractmethod
    def get(self, external_id: str) -> Item: ...

    @abc.abstractmethod
    def existing(self, external_ids: Sequence[str]) -> set[str]: ...

    @abc.abstractmethod
    def count(self) -> int: ...

    @abc.abstractmethod
    def last_seq(self) -> int: ...

    @abc.abstractmethod
    def ops_after(self, seq: int) -> list[Op]: ...

    @abc.abstractmethod
    def vectors(self, item_ids: Sequence[int], generation: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
        """-> (ids (n,), vectors (n, dim)) of the items that still exist."""

    @abc.abstractmethod
    def all_vectors(self, generation: int, dim: int) -> tuple[np.ndarray, np.ndarray]: ...

    @abc.abstractmethod
    def all_items(self) -> list[Item]: ...

    @abc.abstractmethod
    def state(self, generation: int, dim: int) -> tuple[int, list[Item], np.ndarray, np.ndarray]:
        """(last op seq, every item, ids, vectors of `generation`) read in one consistent snapshot: what a
        replica rebuilds its index from (reads made one by one could see a later write in some of them)."""

    @abc.abstractmethod
    def missing(self, generation: int, limit: int) -> list[Item]:
        """Items without an embedding for `generation` (what a re-index still has to embed)."""

    @abc.abstractmethod
    def put_vectors(self, vectors: dict[int, np.ndarray], generation: int) -> None: ...

    @abc.abstractmethod
    def switch(self, generation: int, adapter_ref: str) -> bool:
        """Make `generation` active if every item has an embedding for it; False if some are missing."""

    def media_folder(self) -> Path | None:
        """Where this collection's uploaded media are kept, when the store decides (else the backend's
        `media_dir(name)`)."""
        return None

    def close(self) -> None:  # noqa: B027 - optional for backends without per-collection resources
        """Release what this handle holds."""


class StoreBackend(abc.ABC):
    """Where collections live: lists, creates, opens and drops them."""

    kind: str
    local_root: Path
    """this process's folder for collections (snapshots; with SQLite, the collections themselves)"""
    shared_root: Path
    """the folder every process sharing these collections writes into (SQLite: the collections; PostgreSQL:
    the uploaded media): where they tell each other they are serving (see `cleanup.ServingLock`)"""

    @abc.abstractmethod
    def names(self) -> list[str]: ...

    @abc.abstractmethod
    def identities(self) -> dict[str, str]:
        """name -> uid of every collection (what a replica compares its open handles with)."""

    @abc.abstractmethod
    def create(self, name: str, kind: str, adapter_ref: str, factory: str, dim: int,
               moments: MomentSpec | None = None) -> Store:
        """ConflictError if the name is taken."""

    @abc.abstractmethod
    def open(self, name: str) -> Store:
        """NotFoundError if there is no such collection."""

    @abc.abstractmethod
    def drop(self, name: str, uid: str | None = None) -> None:
        """Delete the collection (only the incarnation `uid`, when given: NotFoundError if the name is now
        another collection's). Writers through any handle of it fail with CollectionGone from then on."""

    @abc.abstractmethod
    def local_dir(self, name: str) -> Path:
        """This process's folder for the collection (index snapshots)."""

    @abc.abstractmethod
    def media_dir(self, name: str) -> Path:
        """Where uploaded media of the collection are kept (every replica must read them)."""

    def remove_leftovers(self, live: set[str], min_age_s: float) -> Swept:
        """What crashes left of collections (not their items' media: the manager sweeps those), older than
        `min_age_s`; `live`: the names of the collections there are."""
        return Swept()

    def listen(self, on_change: Callable[[str], None]) -> None:  # noqa: B027 - a backend may announce nothing
        """Call `on_change(collection name)` when another process changed it."""

    def status(self) -> dict[str, Any]:
        return {"backend": self.kind, "ok": True}

    def close(self) -> None:  # noqa: B027
        """Stop listening and release connections."""


def read_metadata(text: str) -> dict[str, Any]:
    """A stored item's metadata; a row no JSON reader can take back (written by hand, or nested past any
    limit) reads as {} rather than breaking every read that includes it (the API then says why)."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return {}
    return value if isinstance(value, dict) else {}


def stack(ids: list[int], blobs: list[bytes], dim: int) -> tuple[np.ndarray, np.ndarray]:
    """float32 vector blobs, one per item -> (ids (n,), vectors (n, dim)). An item of a moment collection has
    one vector per moment in its blob: its id is repeated once per vector, in order (`vector_ids` numbers them)."""
    if not ids:
        return np.zeros(0, np.int64), np.zeros((0, dim), np.float32)
    vectors = np.frombuffer(b"".join(blobs), dtype=np.float32).reshape(-1, dim)
    counts = [len(b) // (4 * dim) for b in blobs]
    if len(vectors) == len(ids):
        return np.asarray(ids, np.int64), vectors
    return np.repeat(np.asarray(ids, np.int64), counts), vectors


def moment_vector_ids(item_ids: np.ndarray) -> np.ndarray:
    """Item ids as `stack` repeats them (each item's run contiguous) -> the vector id of each row:
    item_id * MOMENT_SLOTS + its index within the item."""
    if len(item_ids) == 0:
        return item_ids.astype(np.int64)
    item_ids = np.asarray(item_ids, np.int64)
    starts = np.flatnonzero(np.r_[True, item_ids[1:] != item_ids[:-1]])
    run_start = np.repeat(starts, np.diff(np.r_[starts, len(item_ids)]))
    return item_ids * MOMENT_SLOTS + (np.arange(len(item_ids)) - run_start)


def read_moments(text: str | None) -> tuple[Span, ...]:
    """An item's stored moments (JSON [[start, end], ...]); () for items without (or an unreadable row)."""
    if not text:
        return ()
    try:
        return tuple((float(a), float(b)) for a, b in json.loads(text))
    except (ValueError, TypeError):
        return ()


def moments_json(moments: Sequence[Span]) -> str | None:
    return json.dumps([[round(a, 6), round(b, 6)] for a, b in moments]) if moments else None


def vector_bytes(vector: np.ndarray) -> bytes:
    return np.ascontiguousarray(vector, np.float32).tobytes()
