"""Collections in SQLite files on the data volume, the embedded default: `DATA_ROOT/collections/NAME/` holds a
collection's store (`items.sqlite`, see `sqlite_store.py`), its uploaded media and this host's snapshots.
Replicas on one host share the folders."""

from __future__ import annotations

import fcntl
import os
import shutil
import sqlite3
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from uniadapter_serve.errors import ConflictError, NotFoundError
from uniadapter_serve.service.collections.cleanup import remove_temp
from uniadapter_serve.service.collections.sqlite_store import (
    CREATING_PREFIX,
    STORE_FILE,
    TRASH_PREFIX,
    SqliteStore,
)
from uniadapter_serve.service.collections.store import CollectionGone, MomentSpec, Store, StoreBackend, Swept


class SqliteBackend(StoreBackend):
    """Collections as folders under `root` (DATA_ROOT/collections): `NAME/items.sqlite`, `NAME/media/`.

    A collection is made in a hidden folder and renamed into place whole, and deleted by marking its file
    first (every open handle, in any process, then refuses writes) and then renaming it away; creates and
    drops take a lock file, so a drop never removes a collection created under its name meanwhile."""

    kind = "sqlite"

    def __init__(self, root: Path) -> None:
        self.root = self.local_root = self.shared_root = root
        root.mkdir(parents=True, exist_ok=True)

    @contextmanager
    def _names_lock(self) -> Iterator[None]:
        """Creates and drops, one at a time across the processes sharing `root`."""
        with (self.root / ".lock").open("a+b") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def names(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and (p / STORE_FILE).is_file()
                      and not p.name.startswith("."))

    def identities(self) -> dict[str, str]:
        out = {}
        for name in self.names():
            uid = _identity(self.root / name / STORE_FILE)
            if uid is not None:
                out[name] = uid
        return out

    def create(self, name: str, kind: str, adapter_ref: str, factory: str, dim: int,
               moments: MomentSpec | None = None) -> Store:
        folder = self.root / name
        staging = self.root / f"{CREATING_PREFIX}{name}-{uuid.uuid4().hex[:12]}"
        try:
            (staging / "media").mkdir(parents=True)
            store = SqliteStore(staging / STORE_FILE, create=True)
            try:
                store.init_meta(name, kind, adapter_ref, factory, dim, moments)
            finally:
                store.close()
            with self._names_lock():
                if folder.exists():
                    if _identity(folder / STORE_FILE) is not None:
                        raise ConflictError(f"collection {name!r} already exists")
                    self._discard(folder)  # left by a crash or a writer of a deleted collection: not a collection
                os.rename(staging, folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return SqliteStore(folder / STORE_FILE)

    def open(self, name: str) -> Store:
        path = self.root / name / STORE_FILE
        if not path.is_file():
            raise NotFoundError(f"no collection named {name!r}")
        return SqliteStore(path)

    def drop(self, name: str, uid: str | None = None) -> None:
        folder = self.root / name
        with self._names_lock():
            try:
                store = SqliteStore(folder / STORE_FILE)
            except NotFoundError:
                raise NotFoundError(f"no collection named {name!r}") from None
            try:
                if uid is not None and store.meta().uid != uid:
                    raise CollectionGone(name)  # the name is another collection's now
                store.mark_deleted()
            finally:
                store.close()
            self._discard(folder)

    def _discard(self, folder: Path) -> None:
        """Rename away, then remove (a crash in between leaves a trash folder that start-up removes)."""
        trash = self.root / f"{TRASH_PREFIX}{folder.name}-{uuid.uuid4().hex[:12]}"
        os.replace(folder, trash)
        shutil.rmtree(trash, ignore_errors=True)

    def remove_leftovers(self, live: set[str], min_age_s: float) -> Swept:
        """Deletes that did not finish (at once: renamed away, nobody uses them), collections half made, and
        folders of no collection (left by a writer of a deleted one), older than `min_age_s`."""
        swept = Swept()
        now = time.time()
        with self._names_lock():
            for path in self.root.iterdir():
                if not path.is_dir():
                    continue
                young = now - path.stat().st_mtime < min_age_s
                if path.name.startswith(TRASH_PREFIX):
                    shutil.rmtree(path, ignore_errors=True)
                elif path.name.startswith(CREATING_PREFIX):
                    if young:
                        continue
                    shutil.rmtree(path, ignore_errors=True)
                elif path.name not in live and not young and _identity(path / STORE_FILE) is None:
                    self._discard(path)
                else:
                    continue
                swept.folders += 1
        swept.temp += remove_temp([self.root], min_age_s, now)
        return swept

    def local_dir(self, name: str) -> Path:
        return self.root / name

    def media_dir(self, name: str) -> Path:
        return self.root / name / "media"


def _identity(path: Path) -> str | None:
    """The uid of the live collection stored at `path`, or None (no file, not a store, marked deleted)."""
    if not path.is_file():
        return None
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    except sqlite3.Error:
        return None
    try:
        row = db.execute("SELECT uid, deleted FROM meta").fetchone()
    except sqlite3.OperationalError:  # made before identities (no uid column yet): the upgrade adds it
        db.close()
        try:
            store = SqliteStore(path)
        except (NotFoundError, sqlite3.Error):
            return None
        try:
            return store.meta().uid
        except CollectionGone:
            return None
        finally:
            store.close()
    except sqlite3.Error:
        return None
    finally:
        db.close()
    return None if row is None or row[1] or not row[0] else str(row[0])
