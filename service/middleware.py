"""ASGI middleware: request-body size limit (before anything is buffered), the body budget (bytes of
bodies in flight across requests) and per-route metrics."""

from __future__ import annotations

import json
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from uniadapter_serve.service import timing
from uniadapter_serve.service.body_budget import FREE_BYTES, BodyBudget, ClientGoneError
from uniadapter_serve.service.metrics import ServiceMetrics


def declared_length(scope: Scope) -> int | None:
    """The request's Content-Length, or None (chunked, or not a number)."""
    value = dict(scope.get("headers") or []).get(b"content-length")
    if value is None or not value.isdigit():
        return None
    return int(value) if len(value) <= 18 else 10**18  # int() of 4,300+ digits raises; over any limit anyway


class BodyLimitMiddleware:
    """413 as soon as Content-Length, or the bytes actually received, pass `max_bytes`."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = declared_length(scope)
        if length is not None and length > self.max_bytes:
            await _reject(send, self.max_bytes, length)
            return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _TooLarge(received)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge as e:
            if not started:
                await _reject(send, self.max_bytes, e.received)


class _TooLarge(Exception):
    def __init__(self, received: int) -> None:
        super().__init__(received)
        self.received = received


async def _reject(send: Send, limit: int, size: int) -> None:
    body = json.dumps({"error": "MediaTooLargeError",
                       "detail": f"request body of {size} bytes is over the limit of {limit} bytes"}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class BodyBudgetMiddleware:
    """Charges request bodies to the shared `BodyBudget` as the route reads them: a body over `FREE_BYTES`
    is charged its Content-Length before its first byte is handed over (a chunked one as it arrives), and
    gives it back when the request is done. A route that never reads its body (refused by the key check,
    or by BodyLimitMiddleware's 413 by Content-Length) is never charged and never waits."""

    def __init__(self, app: ASGIApp, budget: BodyBudget, wait_s: float) -> None:
        self.app = app
        self.budget = budget
        self.wait_s = wait_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = declared_length(scope)
        held = received = 0
        complete = False

        async def budgeted_receive() -> Message:
            nonlocal held, received, complete
            if not complete and held == 0 and declared is not None and declared > FREE_BYTES:
                held = await self.budget.acquire(declared, self.wait_s)
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if declared is None and received > FREE_BYTES:  # chunked: charge what arrived beyond the charge
                    held += await self.budget.acquire(received - held, self.wait_s)
                complete = not message.get("more_body", False)
            elif message["type"] == "http.disconnect" and not complete:
                raise ClientGoneError()
            return message

        try:
            await self.app(scope, budgeted_receive, send)
        finally:
            if held:
                self.budget.release(held)


PROBES = frozenset({"/metrics", "/healthz", "/readyz"})


class MetricsMiddleware:
    """Counts requests and observes latency per route template (not per raw path); times each request's
    phases (see `timing`) into a `Server-Timing` header and `uniadapter_request_phase_seconds`."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        status = {"code": 500}

        probe = scope.get("path") in PROBES

        async def tracking_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                if not probe:
                    value = request_timing.header(time.monotonic() - started)
                    message = {**message, "headers": [*message.get("headers", []),
                                                      (b"server-timing", value.encode())]}
            await send(message)

        if not probe:
            self.metrics.in_flight.inc()
        with timing.request_scope() as request_timing:
            try:
                await self.app(scope, receive, tracking_send)
            finally:
                if not probe:
                    self.metrics.in_flight.dec()
                route: Any = scope.get("route")
                path = getattr(route, "path", None) or "unmatched"
                if path != "/metrics":
                    self.metrics.requests.labels(route=path, status=str(status["code"])).inc()
                    self.metrics.latency.labels(route=path).observe(time.monotonic() - started)
                    for phase, seconds in request_timing.durations().items():
                        self.metrics.request_phase.labels(route=path, phase=phase).observe(seconds)
