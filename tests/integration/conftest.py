from __future__ import annotations

import httpx
import pytest
from support.keys import ADMIN_KEY, READ_KEY
from support.server import publish_test_sets, start_server


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return root


@pytest.fixture(scope="session")
def refs(data_root):
    return publish_test_sets(data_root)


@pytest.fixture(scope="session")
def server(data_root, refs, tmp_path_factory):
    srv = start_server(data_root, tmp_path_factory.mktemp("logs"), api_key=READ_KEY, admin_key=ADMIN_KEY,
                       max_wait_ms=150, max_image_bytes=200_000, max_request_bytes=2_000_000,
                       max_image_pixels=1_000_000, max_text_chars=200, max_top_k=20, max_video_bytes=300_000,
                       max_video_seconds=30)
    yield srv
    srv.stop()


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {READ_KEY}"}, timeout=60) as c:
        yield c


@pytest.fixture
def admin(server):
    with httpx.Client(base_url=server.url, headers={"X-API-Key": ADMIN_KEY}, timeout=60) as c:
        yield c
