"""The one door to a collection store backend, chosen by the settings."""

from __future__ import annotations

from uniadapter_serve.service.collections.store import StoreBackend
from uniadapter_serve.service.settings import Settings


def open_backend(settings: Settings) -> StoreBackend:
    """PostgreSQL when `database_url` is set, else SQLite files under DATA_ROOT/collections."""
    local = settings.data_root / "collections"
    if settings.database_url:
        from uniadapter_serve.service.collections.postgres_store import PostgresBackend

        return PostgresBackend(settings.database_url.get_secret_value(), local_root=local,
                               media_root=settings.media_dir)
    from uniadapter_serve.service.collections.sqlite_backend import SqliteBackend

    return SqliteBackend(local)
