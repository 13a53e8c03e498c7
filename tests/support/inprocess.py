"""Run the real service (real uvicorn, real sockets) in a thread of the test process, for tests that must
reach the server's own objects: e.g. hold the batcher's stages (`Batcher.hold`) until every request of a
test is queued, so that whether requests meet in one batch never depends on scheduling."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import httpx
import uvicorn

from support.server import free_port
from support.waiting import until
from uniadapter_serve.service.app import create_app
from uniadapter_serve.service.batcher import Batcher
from uniadapter_serve.service.local_engine import LocalEngine
from uniadapter_serve.service.parts import Parts
from uniadapter_serve.service.settings import Settings


@dataclass
class InProcessServer:
    url: str
    server: uvicorn.Server
    thread: threading.Thread
    parts: Parts

    @property
    def batcher(self) -> Batcher:
        engine = self.parts.engine
        assert isinstance(engine, LocalEngine)
        return engine.batcher

    def stop(self, timeout: float = 30) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the in-process server did not stop"


def start_in_process(data_root: Path, **settings: object) -> InProcessServer:
    """The service for the 'blip-tiny' backbone on a free port, with `settings` (Settings field names); the
    process's UNIADAPTER_* variables are ignored, like `start_server` does."""
    port = free_port()
    config = Settings(_env_prefix="UNIADAPTER_IN_PROCESS_IGNORED_",  # type: ignore[call-arg]
                      **{"backbone": "blip-tiny", "data_root": data_root, "host": "127.0.0.1", "port": port,
                         "device": "cpu", "log_level": "warning", **settings})
    app = create_app(config)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)  # no signal handlers here
    thread.start()
    url = f"http://127.0.0.1:{port}"
    until(lambda: server.started, "the in-process server to start", 120, every=0.05,
          stop=lambda: None if thread.is_alive() else "it exited during start-up (see the log above)")
    assert httpx.get(f"{url}/readyz", timeout=10).status_code == 200
    return InProcessServer(url, server, thread, app.state.parts)
