"""The service in the test process with no server at all: `create_app(Settings(...))` driven over ASGI, its
lifespan run for real (the backbone, the batcher, collections), requests sent by plain `httpx.Client`s.

One event loop runs in a thread of its own for the app's whole life, like uvicorn's: the lifespan, every
request and the app's background tasks share it, so any number of clients (read key, admin key, none) and any
number of test threads may call the same app at once. Nothing is bound to a socket, so this is for the routes'
contracts; what needs a real server (sockets, signals, uvicorn's limits, several processes) stays with
`support.server.start_server`.

The app's internals are reached through `server_objects` alone (the app's state is being redesigned: keep
every test's reach into it behind that one function)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator, Mapping, MutableMapping
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI

from uniadapter_serve.service.app import create_app
from uniadapter_serve.service.settings import Settings

SESSION_SETTINGS: dict[str, object] = {
    "backbone": "blip-tiny", "max_wait_ms": 150, "max_image_bytes": 200_000, "max_request_bytes": 2_000_000,
    "max_image_pixels": 1_000_000, "max_text_chars": 200, "max_top_k": 20, "max_video_bytes": 300_000,
    "max_video_seconds": 30}
"""the limits of tests/integration/conftest.py's session `server` (its keys: support.keys), for its in-process twin"""
STARTUP_S = 120.0


class _LoopTransport(httpx.BaseTransport):
    """A sync transport that runs each request on the app's loop through `httpx.ASGITransport`."""

    def __init__(self, app: FastAPI, loop: asyncio.AbstractEventLoop) -> None:
        self._asgi = httpx.ASGITransport(app=app, client=("127.0.0.1", 50000))
        self._loop = loop

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        request.read()  # a sync body; its ByteStream iterates both ways
        timeout = request.extensions.get("timeout", {}).get("read")
        future = asyncio.run_coroutine_threadsafe(self._send(request), self._loop)
        try:
            return future.result(timeout)
        except FutureTimeout:
            future.cancel()
            raise httpx.ReadTimeout(f"no answer in {timeout} s", request=request) from None

    async def _send(self, request: httpx.Request) -> httpx.Response:
        response = await self._asgi.handle_async_request(request)
        content = await response.aread()
        return httpx.Response(response.status_code, headers=response.headers, content=content, request=request)


class AsgiService:
    """One app with its lifespan running; `client()` makes clients for it (close them, or use `with`)."""

    def __init__(self, app: FastAPI, settings: Settings) -> None:
        self.app, self.settings = app, settings
        self.data_root = settings.data_root
        self.url = f"http://127.0.0.1:{settings.port}"
        """the base URL of its clients: a Host its allowed_hosts accept by default, with the port it would bind
        (nothing is bound: requests never leave the process)"""
        self.refs: dict[str, str] = {}
        """the adapter sets its fixture published before the start: name -> name@version"""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="asgi-app", daemon=True)
        self._lifespan: asyncio.Future[Any] | None = None
        self._to_app: asyncio.Queue[MutableMapping[str, Any]] | None = None
        self._from_app: asyncio.Queue[MutableMapping[str, Any]] | None = None
        self._clients: list[httpx.Client] = []

    def client(self, key: str | None = None, *, timeout: float = 60, **kwargs: Any) -> httpx.Client:
        """A client of the app, sending `key` as X-API-Key when given."""
        headers = {"X-API-Key": key} if key else {}
        headers.update(kwargs.pop("headers", {}))
        client = httpx.Client(transport=_LoopTransport(self.app, self._loop), base_url=self.url, headers=headers,
                              timeout=timeout, **kwargs)
        self._clients.append(client)
        return client

    def start(self) -> AsgiService:
        self._thread.start()
        self._call(self._startup(), STARTUP_S)
        return self

    def stop(self, timeout: float = 60) -> None:
        for client in self._clients:
            client.close()
        try:
            self._call(self._shutdown(), timeout)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout)
            assert not self._thread.is_alive(), "the app's event loop did not stop"
            self._loop.close()

    def _call(self, coroutine: Any, timeout: float) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    async def _startup(self) -> None:
        """The ASGI lifespan protocol, as a server speaks it: startup, then (in `_shutdown`) shutdown."""
        self._to_app, self._from_app = asyncio.Queue(), asyncio.Queue()
        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": {}}
        self._lifespan = asyncio.ensure_future(self.app(scope, self._to_app.get, self._from_app.put))
        await self._to_app.put({"type": "lifespan.startup"})
        await self._expect("lifespan.startup.complete")

    async def _shutdown(self) -> None:
        assert self._to_app is not None and self._lifespan is not None
        await self._to_app.put({"type": "lifespan.shutdown"})
        await self._expect("lifespan.shutdown.complete")
        await self._lifespan

    async def _expect(self, wanted: str) -> None:
        assert self._from_app is not None and self._lifespan is not None
        got: asyncio.Future[Any] = asyncio.ensure_future(self._from_app.get())
        await asyncio.wait([got, self._lifespan], return_when=asyncio.FIRST_COMPLETED)
        if not got.done():
            got.cancel()
            self._lifespan.result()  # raises what the lifespan raised
            raise AssertionError(f"the app's lifespan ended without sending {wanted}")
        message = got.result()
        assert message["type"] == wanted, f"the app's lifespan sent {message} instead of {wanted}"


def settings_for(data_root: Path, **settings: object) -> Settings:
    """Settings for a test app on `data_root` (adapters, media, collections under it), the process's UNIADAPTER_*
    variables ignored like `start_server` does; by default the shipped demo model, on the CPU, no Redis."""
    values: dict[str, Any] = {"backbone": "demo", "data_root": data_root, "device": "cpu", "log_level": "warning",
                              **settings}
    return Settings(_env_prefix="UNIADAPTER_ASGI_TESTS_IGNORED_", **values)


@contextmanager
def running_app(data_root: Path, **settings: object) -> Iterator[AsgiService]:
    """The app of `settings_for(data_root, **settings)`, its lifespan started; shut down on exit."""
    config = settings_for(data_root, **settings)
    service = AsgiService(create_app(config), config).start()
    try:
        yield service
    finally:
        service.stop()


def server_objects(service: AsgiService) -> Any:
    """THE one reach into the app's internals (the `parts.Parts` on app.state): tests that must touch server
    objects (the registry, the engine) go through here, so a redesign of app.state changes this line only."""
    return service.app.state.parts


def openapi_validator(schema: Mapping[str, Any], path: str, method: str = "post",
                      status: str = "200") -> Any:
    """A jsonschema validator for the JSON body of `method path`'s `status` answer in the app's own OpenAPI
    document (3.1: JSON Schema 2020-12, references resolved within the document)."""
    from jsonschema import Draft202012Validator

    content = schema["paths"][path][method]["responses"][status]["content"]["application/json"]["schema"]
    return Draft202012Validator({**content, "components": schema.get("components", {})})
