from __future__ import annotations

import pytest
import torch
from transformers import BlipConfig

from uniadapter_serve.model.backbone import BlipBackbone
from uniadapter_serve.model.loading import fingerprint, load_config, random_backbone
from uniadapter_serve.model.testing import randomize_


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)


@pytest.fixture
def tiny_config() -> BlipConfig:
    return load_config("blip-tiny")


@pytest.fixture
def backbone(tiny_config: BlipConfig) -> BlipBackbone:
    """A tiny backbone with every component and every weight random (seeded), frozen."""
    model = random_backbone(tiny_config, seed=1)
    randomize_(model, seed=2)
    model.fingerprints = fingerprint(model.state_dict())
    model.requires_grad_(False)
    return model.eval()


@pytest.fixture(scope="session")
def pg_server():
    """One real PostgreSQL for the session (each test that uses it makes its own database)."""
    from support.postgres import PostgresServer

    server = PostgresServer()
    yield server
    server.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_backend(request, tmp_path):
    """A collection store backend of each kind, empty."""
    if request.param == "sqlite":
        from uniadapter_serve.service.collections.sqlite_backend import SqliteBackend

        backend = SqliteBackend(tmp_path / "collections")
    else:
        from uniadapter_serve.service.collections.postgres_store import PostgresBackend

        url = request.getfixturevalue("pg_server").database()
        backend = PostgresBackend(url, local_root=tmp_path / "collections", media_root=tmp_path / "media")
    yield backend
    backend.close()


@pytest.fixture(scope="session")
def demo_app(tmp_path_factory):
    """The shipped demo model served in-process (support.asgi): lifespan on, its sets and collections, no keys,
    no Redis, SQLite collections in a temporary data root."""
    from support.asgi import running_app

    with running_app(tmp_path_factory.mktemp("asgi-demo")) as service:
        yield service


@pytest.fixture(scope="session")
def tiny_app(tmp_path_factory):
    """tests/integration's session `server` in-process: blip-tiny, the test sets (`tiny_app.refs`), the read and
    admin keys and the same limits (support.asgi.SESSION_SETTINGS), its own temporary data root."""
    from support.asgi import SESSION_SETTINGS, running_app
    from support.keys import ADMIN_KEY, READ_KEY
    from support.server import publish_test_sets

    root = tmp_path_factory.mktemp("asgi-tiny")
    refs = publish_test_sets(root)
    with running_app(root, api_key=READ_KEY, admin_key=ADMIN_KEY, **SESSION_SETTINGS) as service:
        service.refs = refs
        yield service


@pytest.fixture(scope="session")
def tiny_client(tiny_app):
    """A client of `tiny_app` with the read key (as a Bearer token, like tests/integration's `client`)."""
    from support.keys import READ_KEY

    with tiny_app.client(headers={"Authorization": f"Bearer {READ_KEY}"}) as c:
        yield c


@pytest.fixture(scope="session")
def tiny_admin(tiny_app):
    """A client of `tiny_app` with the admin key (X-API-Key, like tests/integration's `admin`)."""
    from support.keys import ADMIN_KEY

    with tiny_app.client(ADMIN_KEY) as c:
        yield c
