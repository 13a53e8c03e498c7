"""Connection-level limits, below the ASGI app: open connections in total and per client address, and how
long a request's headers and body may take to arrive.

uvicorn keeps every connection it accepts for as long as the client likes (one that sends nothing is never
closed; a byte every few seconds keeps a request open for ever), so these live in a subclass of uvicorn's
HTTP protocol (`limited_protocol`, for `uvicorn.run(http=...)`). A connection over its client's cap is
answered 503 at once and closed, before it holds anything; when the server as a whole is full, the oldest
connection still sending its request headers makes room (503, closed): slow clients spread over many
addresses cannot lock everyone else out. A request too slow to arrive gets 408 and its connection closes.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from uvicorn.protocols.http.flow_control import FlowControl

from uniadapter_serve.service.metrics import CallbackMetric, ServiceMetrics

if TYPE_CHECKING:
    from uniadapter_serve.service.settings import Settings

log = logging.getLogger(__name__)

FILES_HEADROOM = 256
"""Open files the server needs besides its connections (models, stores, logs), and refused connections
lingering for their 503."""
READ_GRACE_S = 0.05
"""A read timeout that fires is confirmed this much later: after a stalled event loop, uvloop runs due timers
before it reads the sockets, so bytes that did arrive in time would otherwise not count."""
REFUSED_LINGER_S = 0.25
"""A refused connection is closed this long after its 503 at the latest (sooner when the client closes):
closing at once, with the client's request unread, would reset the connection and lose the 503."""


@dataclass(frozen=True)
class ReadLimits:
    max_connections: int = 0
    """0: no cap"""
    max_per_client: int = 0
    header_timeout_s: float = 0.0
    """0: none"""
    body_timeout_s: float = 0.0
    body_min_bytes: int = 0
    """bytes a body must bring in every `body_timeout_s` window"""


def client_key(client: tuple[str, int] | None) -> str:
    """The address connections are counted by: the IPv4 address, the /64 of an IPv6 one (one host gets a
    whole /64), '' for a Unix socket."""
    if client is None:
        return ""
    try:
        address = ipaddress.ip_address(client[0])
    except ValueError:
        return client[0]
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


class Evictable(Protocol):
    def evict(self, reason: str) -> None:
        """Answer 503 and close; the connection no longer counts."""


class ConnectionGate:
    """Counts open connections (in total and per client) for the protocol; read by /metrics. Event-loop only."""

    def __init__(self, limits: ReadLimits) -> None:
        self.limits = limits
        self.open = 0
        self.per_client: dict[str, int] = {}
        self.refused = {"total": 0, "per_client": 0, "evicted": 0}
        self.timeouts = {"headers": 0, "body": 0}
        self._sending_headers: dict[Evictable, None] = {}
        """connections waiting for a request's headers, oldest first (a dict keeps insertion order)"""

    @classmethod
    def from_settings(cls, settings: Settings) -> ConnectionGate:
        return cls(ReadLimits(
            max_connections=settings.max_connections, max_per_client=settings.max_connections_per_client,
            header_timeout_s=settings.header_timeout_s, body_timeout_s=settings.body_timeout_s,
            body_min_bytes=round(settings.body_min_rate_kbps * 1024 * settings.body_timeout_s)))

    def admit(self, key: str) -> str | None:
        """Count a new connection from `key`, or -> why it is refused (it is then not counted). When the
        server is full, the oldest connection still sending its headers is evicted to make room."""
        held = self.per_client.get(key, 0)
        if self.limits.max_per_client and held >= self.limits.max_per_client:
            self.refused["per_client"] += 1
            return (f"this client has {held} connections open, the limit per client "
                    "(UNIADAPTER_MAX_CONNECTIONS_PER_CLIENT)")
        if self.limits.max_connections and self.open >= self.limits.max_connections:
            if not self._sending_headers:
                self.refused["total"] += 1
                return f"the server has {self.open} connections open, its limit (UNIADAPTER_MAX_CONNECTIONS)"
            oldest = next(iter(self._sending_headers))
            self.sending_headers(oldest, False)
            self.refused["evicted"] += 1
            oldest.evict(f"the server is full ({self.open} connections, UNIADAPTER_MAX_CONNECTIONS) and this "
                         "connection had the oldest unfinished request headers")
        self.open += 1
        self.per_client[key] = held + 1
        return None

    def sending_headers(self, connection: Evictable, sending: bool) -> None:
        """Whether `connection` waits for a request's headers (evictable, oldest first) or not."""
        self._sending_headers.pop(connection, None)
        if sending:
            self._sending_headers[connection] = None

    def leave(self, key: str) -> None:
        self.open -= 1
        left = self.per_client.pop(key, 1) - 1
        if left > 0:
            self.per_client[key] = left

    def watch(self, metrics: ServiceMetrics) -> ConnectionGate:
        """Export the gate on `metrics`."""
        open_ = CallbackMetric("uniadapter_connections", "HTTP connections open now (scope): in total, from the "
                               "client with the most, and those still sending a request's headers.", ("scope",))
        open_.collect_from(lambda: [({"scope": "total"}, self.open),
                                    ({"scope": "busiest_client"}, max(self.per_client.values(), default=0)),
                                    ({"scope": "sending_headers"}, len(self._sending_headers))])
        refused = CallbackMetric("uniadapter_connections_refused", "Connections answered 503 and closed, by the cap "
                                 "they hit (reason: total, per_client; evicted: the oldest still sending its headers "
                                 "when the server was full).", ("reason",), kind="counter")
        refused.collect_from(lambda: [({"reason": k}, v) for k, v in self.refused.items()])
        late = CallbackMetric("uniadapter_request_read_timeouts", "Requests cut off (408, connection closed) because "
                              "their headers or body arrived too slowly (phase).", ("phase",), kind="counter")
        late.collect_from(lambda: [({"phase": k}, v) for k, v in self.timeouts.items()])
        for metric in (open_, refused, late):
            metrics.registry.register(metric)
        return self


class _WatchedFlow(FlowControl):
    """Remembers that reading was paused (the app not reading yet is not the client being slow)."""

    paused_since_mark = False

    def pause_reading(self) -> None:
        self.paused_since_mark = True
        super().pause_reading()


def _raw_response(status: str, detail: str, extra: bytes = b"") -> bytes:
    body = json.dumps({"error": "ServerBusyError" if status.startswith("503") else "RequestTimeout",
                       "detail": detail}).encode()
    return (f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n".encode()
            + b"x-content-type-options: nosniff\r\nconnection: close\r\n" + extra + b"\r\n" + body)


_HEADERS, _BODY, _APP = "headers", "body", "app"
"""a connection's phase: waiting for a request's headers, receiving its body, or neither (the app has the
request, or the connection is idle between requests: uvicorn's keep-alive timeout covers that)"""


class _LimitedProtocol(asyncio.Protocol):
    """Mixed in before uvicorn's H11Protocol or HttpToolsProtocol (both keep `self.cycle`, the request being
    parsed, with `more_body`; `self.flow`; `self.transport`; `self.client`; `self.loop`)."""

    gate: ClassVar[ConnectionGate]
    if TYPE_CHECKING:
        cycle: Any
        flow: FlowControl
        transport: asyncio.Transport
        client: tuple[str, int] | None
        loop: asyncio.AbstractEventLoop

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.flow = _WatchedFlow(self.transport)  # no request has the old one yet
        self._key = client_key(self.client)
        self._timer: asyncio.TimerHandle | None = None
        self._phase = _APP
        self._seen: Any = None
        self._window = 0
        refusal = self.gate.admit(self._key)
        self._admitted = refusal is None
        if refusal is not None:
            self._refuse(refusal)
        else:
            self._expect_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel()
        self.gate.sending_headers(self, False)
        if self._admitted:
            self._admitted = False
            self.gate.leave(self._key)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if not self._admitted:
            return  # refused: its 503 is written, the request is not read
        seen = self._seen
        if self._phase == _APP and (seen is None or not seen.more_body):
            self._expect_headers()  # these bytes start the next request (after keep-alive, or pipelined)
        elif self._phase == _BODY:
            self._window += len(data)
        super().data_received(data)
        cycle = self.cycle
        if cycle is not None and cycle is not seen:  # a request's headers are complete
            self._seen = cycle
            self._cancel()
            self.gate.sending_headers(self, False)
            self._phase = _APP
            if cycle.more_body and self.gate.limits.body_timeout_s > 0:
                self._phase = _BODY
                self._start_window()
        elif self._phase == _BODY and (cycle is None or not cycle.more_body):
            self._cancel()
            self._phase = _APP

    def _refuse(self, reason: str) -> None:
        self.transport.write(_raw_response("503 Service Unavailable", reason, b"retry-after: 1\r\n"))
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self._timer = self.loop.call_later(REFUSED_LINGER_S, self.transport.close)

    def evict(self, reason: str) -> None:
        if self._admitted:  # closed at once, no linger: its file descriptor is what the newcomer needs
            self._admitted = False
            self.gate.leave(self._key)
            self._cancel()
            self.transport.write(_raw_response("503 Service Unavailable", reason, b"retry-after: 1\r\n"))
            self.transport.close()

    def _expect_headers(self) -> None:
        self._phase = _HEADERS
        self.gate.sending_headers(self, True)
        if self._timer is None and self.gate.limits.header_timeout_s > 0:
            self._timer = self.loop.call_later(self.gate.limits.header_timeout_s, self._headers_late)

    def _headers_late(self, confirmed: bool = False) -> None:
        self._timer = None
        if self._phase != _HEADERS or self.transport.is_closing():
            return
        if not confirmed:
            self._timer = self.loop.call_later(READ_GRACE_S, self._headers_late, True)
            return
        self._time_out("headers", f"the request headers did not arrive within "
                                  f"{self.gate.limits.header_timeout_s:g} s (UNIADAPTER_HEADER_TIMEOUT_S)")

    def _start_window(self) -> None:
        self._window = 0
        if isinstance(self.flow, _WatchedFlow):
            self.flow.paused_since_mark = self.flow.read_paused
        self._timer = self.loop.call_later(self.gate.limits.body_timeout_s, self._check_body)

    def _check_body(self, confirmed: bool = False) -> None:
        self._timer = None
        cycle = self._seen
        if self._phase != _BODY or cycle is None or not cycle.more_body or self.transport.is_closing():
            return
        waiting_on_us = (self.flow.read_paused or getattr(self.flow, "paused_since_mark", False)
                         or getattr(cycle, "waiting_for_100_continue", False))
        if not waiting_on_us and self._window < self.gate.limits.body_min_bytes:
            if not confirmed:
                self._timer = self.loop.call_later(READ_GRACE_S, self._check_body, True)
                return
            limits = self.gate.limits
            self._time_out("body", f"the request body brought {self._window} bytes in {limits.body_timeout_s:g} s, "
                                   f"under the minimum of {limits.body_min_bytes} (UNIADAPTER_BODY_MIN_RATE_KBPS)")
            return
        self._start_window()

    def _time_out(self, phase: str, detail: str) -> None:
        self.gate.timeouts[phase] += 1
        cycle = self._seen if phase == "body" else None
        if cycle is None or not cycle.response_started:
            self.transport.write(_raw_response("408 Request Timeout", detail))
        self.transport.close()

    def _cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def raise_file_limit(max_connections: int) -> None:
    """Lift the soft limit on open files to the hard one (containers often start at 1,024, under the default
    MAX_CONNECTIONS plus the server's own files); warn when even the hard limit is too low."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    need = max_connections + FILES_HEADROOM
    if max_connections and soft != resource.RLIM_INFINITY and soft < need:
        log.warning("open-file limit %d is under MAX_CONNECTIONS (%d) + %d for the server's own files: connections "
                    "past it fail to be accepted; lower UNIADAPTER_MAX_CONNECTIONS or raise the limit (ulimit -n)",
                    soft, max_connections, FILES_HEADROOM)


def limited_protocol(gate: ConnectionGate) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol (httptools when installed, else h11) under `gate`'s caps and timeouts."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    return type("LimitedHTTPProtocol", (_LimitedProtocol, AutoHTTPProtocol), {"gate": gate})
