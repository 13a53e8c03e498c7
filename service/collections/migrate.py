"""`uniadapter collections migrate --from DATA_ROOT --to postgresql://...`: every SQLite collection into
PostgreSQL, losslessly (items with their ids, sources, metadata, creation times and moments; embeddings of every
generation; the adapter binding and generation; uploaded media into the shared media root) and resumably
(items already copied are skipped, so an interrupted run continues where it stopped). Each collection is
checked at the end: the same number of items, and for a sample of them the same vector bytes.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

from tqdm import tqdm

from uniadapter_serve.errors import ConflictError, NotFoundError
from uniadapter_serve.fileio import atomic_write
from uniadapter_serve.service.collections.postgres_store import PostgresBackend, PostgresStore
from uniadapter_serve.service.collections.sqlite_backend import SqliteBackend
from uniadapter_serve.service.collections.sqlite_store import SqliteStore

log = logging.getLogger(__name__)


class MigrationError(ConflictError):
    """The target disagrees with the source (another collection under the name, or a copy that differs)."""


def migrate(data_root: Path, url: str, *, media_root: Path, batch_size: int = 500, sample: int = 64,
            progress: bool = True, max_batches: int | None = None) -> dict[str, Any]:
    """Copy every collection under DATA_ROOT/collections into the database at `url`; -> a report per collection.
    `max_batches` stops early (what an interruption does), for tests."""
    source = SqliteBackend(data_root / "collections")
    target = PostgresBackend(url, local_root=data_root / "collections", media_root=media_root)
    report: dict[str, Any] = {}
    batches = 0
    try:
        for name in source.names():
            src = source.open(name)
            assert isinstance(src, SqliteStore)
            meta = src.meta()
            try:
                dst = target.open(name)
                existing = dst.meta()
                if ((existing.kind, existing.factory, existing.dim, existing.moments)
                        != (meta.kind, meta.factory, meta.dim, meta.moments)):
                    raise MigrationError(f"collection {name!r} exists in the database with another kind, index, dim "
                                         "or moments")
            except NotFoundError:
                dst = target.create(name, meta.kind, meta.adapter_ref, meta.factory, meta.dim, meta.moments)
            assert isinstance(dst, PostgresStore)
            dst.set_state(meta)
            _copy_media(source.media_dir(name), dst.media_folder())
            items = src.all_items()
            present = dst.existing([it.external_id for it in items])
            todo = [it for it in items if it.external_id not in present]
            with tqdm(total=len(items), initial=len(items) - len(todo), unit="item", desc=name,
                      disable=not progress) as bar:
                for start in range(0, len(todo), batch_size):
                    if max_batches is not None and batches >= max_batches:
                        return report
                    chunk = todo[start:start + batch_size]
                    rows = src.export([it.item_id for it in chunk])
                    dst.import_items([(it, *rows[it.item_id]) for it in chunk if it.item_id in rows])
                    batches += 1
                    bar.update(len(chunk))
            report[name] = _verify(src, dst, items, sample)
            src.close()
    finally:
        target.close()
    return report


def _copy_media(source: Path, target: Path) -> None:
    if not source.is_dir():
        return
    target.mkdir(parents=True, exist_ok=True)
    for file in source.iterdir():
        if file.is_file() and not (target / file.name).exists():
            atomic_write(target / file.name, file.read_bytes())


def _verify(src: SqliteStore, dst: PostgresStore, items: list[Any], sample: int) -> dict[str, Any]:
    count = dst.count()
    if count != len(items):
        raise MigrationError(f"collection {src.meta().name!r}: {len(items)} items in SQLite, {count} in PostgreSQL")
    picked = random.Random(0).sample(items, min(sample, len(items)))
    rows = {it.external_id: dst.get(it.external_id) for it in picked}
    for it in picked:
        if rows[it.external_id].moments != it.moments:
            raise MigrationError(f"collection {src.meta().name!r}: the moments of item {it.external_id!r} differ")
    theirs = {rows[it.external_id].item_id: it for it in picked}
    ours = src.export([it.item_id for it in picked])
    copied = dst.embeddings_of(list(theirs))
    for new_id, it in theirs.items():
        if copied.get(new_id, {}) != ours[it.item_id][1]:
            raise MigrationError(f"collection {src.meta().name!r}: the vectors of item {it.external_id!r} differ")
    return {"items": count, "checked": len(picked), "generation": src.meta().generation}

