"""Helpers shared by the benchmarks: running the service as a subprocess (service_load.py, video.py), and
interleaved sampling with its spread (adapter_overhead.py, hot_swap.py)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import httpx

HOST = "127.0.0.1"
READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 20.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no server log)"


def wait_ready(proc: subprocess.Popen[bytes], base_url: str, log_path: Path) -> dict[str, object]:
    """Poll GET /readyz until 200 (or the process exits, or READY_TIMEOUT_S passes); -> its JSON."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    with httpx.Client(base_url=base_url, timeout=5.0) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{tail(log_path)}")
            try:
                r = client.get("/readyz", params={"verbose": "true"})  # benchmarks run without keys
                if r.status_code == 200:
                    body: dict[str, object] = r.json()
                    return body
            except httpx.TransportError:
                pass
            time.sleep(0.5)
    raise RuntimeError(f"server not ready after {READY_TIMEOUT_S:.0f} s:\n{tail(log_path)}")


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM (the server drains), then kill if it does not exit in time."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=STOP_TIMEOUT_S)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]); nan when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100.0 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def rotating_rounds(samplers: Sequence[Callable[[], float]], rounds: int) -> list[list[float]]:
    """One sample per sampler per round, samplers interleaved and their order rotated each round, so
    drift of a noisy machine falls on every variant alike (compare variants by paired ratios)."""
    samples: list[list[float]] = [[] for _ in samplers]
    for r in range(rounds):
        for k in range(len(samplers)):
            i = (k + r) % len(samplers)
            samples[i].append(samplers[i]())
    return samples


def half_iqr(values: Sequence[float]) -> float:
    """Half the interquartile range: the spread printed beside a median (0 below 4 samples)."""
    if len(values) < 4:
        return 0.0
    q1, _, q3 = statistics.quantiles(values, n=4)
    return (q3 - q1) / 2


class RawHttp:
    """A lean HTTP/1.1 keep-alive client for load generation: one connection, requests of pre-encoded bytes, the
    response read by Content-Length. A load generator on the same machine takes CPU from the server it drives;
    httpx spends ~1 ms of Python per request, this a few tens of microseconds, so on a 2-core machine the server
    gets the cores. Only what this project's JSON routes answer is understood (Content-Length bodies, no chunked
    transfer); a server closing the connection is reconnected to on the next request."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    @staticmethod
    def request(host: str, port: int, path: str, body: bytes, content_type: str = "application/json") -> bytes:
        """The bytes of one POST, built once and sent as often as wanted."""
        head = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n")
        return head.encode("ascii") + body

    async def send(self, request: bytes) -> tuple[int, bytes]:
        """(status, body) of one request; OSError / asyncio.IncompleteReadError when the connection fails."""
        if self._writer is None or self._writer.is_closing():
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        assert self._reader is not None
        self._writer.write(request)
        head = await self._reader.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        length, close = 0, False
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                raise ValueError("RawHttp reads Content-Length bodies only")
            elif name == b"connection" and value.strip().lower() == b"close":
                close = True
        body = await self._reader.readexactly(length)
        if close:
            await self.close()
        return status, body

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError):
                await self._writer.wait_closed()
            self._writer = self._reader = None
