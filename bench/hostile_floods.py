"""The floods of bench/hostile_input.py parts 3-6: what they cost the server (peak RSS growth, open file
descriptors) and a small /vqa meanwhile (p50, next to the same server idle), with the limits and without.

Every flood runs for a bounded time and count, against 127.0.0.1 only. The server is the caller's `serve`
context manager (a subprocess; settings as keyword arguments).
"""

from __future__ import annotations

import base64
import io
import multiprocessing
import os
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

import httpx
from benchkit import HOST, percentile
from PIL import Image

Serve = Callable[..., AbstractContextManager[tuple[str, int]]]
Flood = Callable[[str, Event], str]
"""(server url, stop) -> a line saying what the flood did; runs until `stop` is set or its own end"""
NO_CONNECTION_LIMITS = {"header_timeout_s": 0, "body_timeout_s": 0, "max_connections": 0,
                        "max_connections_per_client": 0}
NO_LIMITS = {**NO_CONNECTION_LIMITS, "body_budget_mb": 1e6}


def small_png() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 40, 40)).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def status_kb(pid: int, field_name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise KeyError(field_name)


@dataclass
class Probe:
    """Samples the server's open fds while a flood runs; peak RSS from VmHWM (reset at the start)."""

    pid: int
    base_kb: int = 0
    fds_before: int = 0
    fds_peak: int = 0
    fd_samples: list[int] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    @contextmanager
    def watching(self) -> Iterator[Probe]:
        self.base_kb = status_kb(self.pid, "VmRSS")
        Path(f"/proc/{self.pid}/clear_refs").write_text("5")  # peak (VmHWM) := current size
        self.fds_before = self.fds_peak = self.fds()

        def sample() -> None:
            while not self._stop.wait(0.2):
                self.fd_samples.append(self.fds())
                self.fds_peak = max(self.fds_peak, self.fd_samples[-1])

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            yield self
        finally:
            self._stop.set()
            sampler.join(5)

    @property
    def rss_growth_mb(self) -> float:
        return (status_kb(self.pid, "VmHWM") - self.base_kb) / 1024


def vqa_latencies(url: str, png: str, seconds: float, at_most: int = 3000,
                  until: Callable[[], bool] = lambda: False) -> tuple[list[float], list[int]]:
    """Small /vqa calls one after another (one keep-alive connection) for `seconds` (or `until()`):
    (latencies, codes)."""
    times: list[float] = []
    codes: list[int] = []
    deadline = time.monotonic() + seconds
    with httpx.Client(base_url=url, timeout=60) as c:
        while time.monotonic() < deadline and len(times) < at_most and not until():
            started = time.monotonic()
            try:
                codes.append(c.post("/vqa", json={"image": png, "question": "what colour is it?",
                                                  "adapter": "none"}).status_code)
            except httpx.TransportError:
                codes.append(0)
            times.append(time.monotonic() - started)
    return times, codes


@dataclass
class Row:
    label: str
    rss_mb: float
    fds_before: int
    fds_peak: int
    fds_median: float
    idle_ms: float
    p50_ms: float
    vqa_codes: list[int]
    flood: str

    def show(self) -> str:
        bad = sum(c != 200 for c in self.vqa_codes)
        return (f"{self.label:>10}: peak RSS +{self.rss_mb:6.0f} MB   fds {self.fds_before} -> "
                f"{self.fds_median:5.0f} (peak {self.fds_peak:5d})   "
                f"/vqa p50 {self.p50_ms:7.1f} ms (idle {self.idle_ms:5.1f}, {self.p50_ms / self.idle_ms:5.2f}x; "
                f"{bad}/{len(self.vqa_codes)} not 200)   {self.flood}")


def _run_flood(flood: Flood, url: str, stop: Event, out: Connection) -> None:
    out.send(flood(url, stop))


def measure(serve: Serve, root: Path, label: str, settings: dict[str, Any], seconds: float, flood: Flood) -> Row:
    """One server: idle /vqa p50, then `flood(url, stop)` in a child process (the attacker's threads must not
    share this process's GIL with the /vqa timing) while /vqa is timed, for `seconds` or until the flood ends."""
    png = small_png()
    context = multiprocessing.get_context("fork")  # the flood is a closure
    with serve(root / label.replace(" ", "-"), **settings) as (url, pid):
        vqa_latencies(url, png, 2.0, at_most=10)  # warm up
        idle = percentile(vqa_latencies(url, png, 5.0, at_most=60)[0], 50)
        stop = context.Event()
        receiver, sender = context.Pipe(duplex=False)
        with Probe(pid).watching() as probe:
            attacker = context.Process(target=_run_flood, args=(flood, url, stop, sender), daemon=True)
            attacker.start()
            time.sleep(1.0)  # let the flood build up before timing
            times, codes = vqa_latencies(url, png, seconds, until=lambda: not attacker.is_alive())
            stop.set()
            summary = receiver.recv() if receiver.poll(120) else "(flood did not finish)"
            attacker.join(10)
            if attacker.is_alive():
                attacker.kill()
        return Row(label, probe.rss_growth_mb, probe.fds_before, probe.fds_peak,
                   percentile(probe.fd_samples, 50), idle * 1000,
                   percentile(times, 50) * 1000, codes, summary)


def compare(title: str, rows: list[Row]) -> None:
    print(f"\n== {title} ==")
    for row in rows:
        print(row.show())
    if len(rows) == 2:
        with_, without = rows
        print(f"with / without limits: peak RSS growth {with_.rss_mb / max(without.rss_mb, 1.0):.2f}x, "
              f"fds {with_.fds_median / max(without.fds_median, 1):.2f}x (median; peak "
              f"{with_.fds_peak / max(without.fds_peak, 1):.2f}x), "
              f"/vqa p50 {with_.p50_ms / without.p50_ms:.2f}x "
              f"(targets: RSS growth <= 500 MB, p50 <= 3x idle)")


def _codes(codes: list[int]) -> str:
    return ", ".join(f"{c}: {codes.count(c)}" for c in sorted(set(codes)))


# -- 3. big bodies ---------------------------------------------------------------------------------

def big_bodies(clients: int, megabytes: float) -> Flood:
    """`clients` threads, each posting a JSON body of `megabytes` MB (base64 text of an 'image' far over
    MAX_IMAGE_BYTES, so each is refused 413 once read and parsed), again while the flood lasts."""
    chars = int(megabytes * 1e6) // 4 * 4
    body = b'{"question": "what?", "adapter": "none", "image": "' + b"A" * chars + b'"}'

    def flood(url: str, stop: Event) -> str:
        codes: list[int] = []

        def post(_: int) -> None:
            with httpx.Client(base_url=url, timeout=120) as c:
                for _ in range(20):
                    if stop.is_set():
                        return
                    try:
                        codes.append(c.post("/vqa", content=body, headers={"content-type": "application/json"})
                                     .status_code)
                    except httpx.TransportError:
                        codes.append(0)

        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(post, range(clients)))
        return f"{len(codes)} bodies of {len(body) / 1e6:.0f} MB ({_codes(codes)})"

    return flood


# -- 4. slow connections ---------------------------------------------------------------------------

def slow_connections(count: int, every_s: float, sources: int) -> Flood:
    """`count` connections from `sources` loopback addresses (127.0.0.2...), each sending one byte of a
    request every `every_s` seconds; a connection the server closes is opened again when its next byte
    would have been due."""
    request = (b"POST /vqa HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               b"Content-Length: 4096\r\n\r\n" + b" " * 4096)

    def flood(url: str, stop: Event) -> str:
        port = int(url.rsplit(":", 1)[1])
        selector = selectors.DefaultSelector()
        slots: list[dict[str, Any]] = [{"sock": None, "sent": 0, "due": 0.0} for _ in range(count)]
        opened = cut = failed = 0

        def close(slot: dict[str, Any], now: float) -> None:
            selector.unregister(slot["sock"])
            slot["sock"].close()
            slot.update(sock=None, due=now + every_s)

        while not stop.is_set() and opened < 50 * count:
            now = time.monotonic()
            for i, slot in enumerate(slots):
                if slot["due"] > now:
                    continue
                if slot["sock"] is None:
                    sock = socket.socket()
                    try:
                        sock.bind((f"127.0.0.{2 + i % sources}", 0))
                        sock.settimeout(2.0)
                        sock.connect((HOST, port))
                    except OSError:
                        sock.close()
                        failed += 1
                        slot["due"] = now + every_s
                        continue
                    sock.setblocking(False)
                    selector.register(sock, selectors.EVENT_READ, slot)
                    slot.update(sock=sock, sent=0)
                    opened += 1
                try:
                    slot["sock"].send(request[slot["sent"]:slot["sent"] + 1])
                    slot["sent"] = min(slot["sent"] + 1, len(request) - 1)
                    slot["due"] = now + every_s
                except OSError:
                    cut += 1
                    close(slot, now)
            for key, _ in selector.select(timeout=0.2):  # the server answered (408, 503) or closed
                slot = key.data
                try:
                    data = slot["sock"].recv(65536)
                except OSError:
                    data = b""
                if not data:
                    cut += 1
                    close(slot, time.monotonic())
        still = sum(s["sock"] is not None for s in slots)
        for slot in slots:
            if slot["sock"] is not None:
                slot["sock"].close()
        return (f"{count} slow connections from {sources} address(es): {opened} opened, {cut} cut off by the "
                f"server, {failed} connects failed, {still} open at the end")

    return flood


# -- 5. media that is not a container ----------------------------------------------------------------

def demuxer_programs(clients: int, server_file: str) -> Flood:
    """`clients` threads posting SDP sessions (FFmpeg would wait for RTP) and ffconcat scripts naming a
    server-side file to /videoqa, again while the flood lasts."""
    sdp = (b"v=0\r\no=- 0 0 IN IP4 127.0.0.1\r\ns=x\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
           b"m=video 5004 RTP/AVP 96\r\na=rtpmap:96 H264/90000\r\n")
    ffconcat = f"ffconcat version 1.0\nfile '{server_file}'\n".encode()

    def flood(url: str, stop: Event) -> str:
        codes: list[int] = []
        walls: list[float] = []

        def post(i: int) -> None:
            video = base64.b64encode(sdp if i % 2 else ffconcat).decode()
            with httpx.Client(base_url=url, timeout=120) as c:
                for _ in range(2000):
                    if stop.is_set():
                        return
                    started = time.monotonic()
                    codes.append(c.post("/videoqa", json={"video": video, "question": "what?", "adapter": "none"})
                                 .status_code)
                    walls.append(time.monotonic() - started)

        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(post, range(clients)))
        return (f"{len(codes)} SDP/ffconcat uploads ({_codes(codes)}), slowest answer "
                f"{max(walls, default=0) * 1000:.0f} ms")

    return flood


# -- 6. bulk add of large images ---------------------------------------------------------------------

def bulk_add(items: int, side: int, requests: int) -> Flood:
    """`requests` admin adds at once, each of `items` highly compressible PNGs of side x side pixels."""
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (30, 60, 220)).save(buf, "PNG", optimize=True)
    png = base64.b64encode(buf.getvalue()).decode()

    def flood(url: str, stop: Event) -> str:
        with httpx.Client(base_url=url, timeout=600) as c:
            c.post("/collections", json={"name": "bulk", "kind": "image", "adapter": "none"})

            def add(r: int) -> tuple[int, float]:
                started = time.monotonic()
                body = {"items": [{"id": f"r{r}-{i}", "image": png} for i in range(items)]}
                return c.post("/collections/bulk/items", json=body).status_code, time.monotonic() - started

            with ThreadPoolExecutor(requests) as pool:
                results = list(pool.map(add, range(requests)))
        return (f"{requests} adds of {items} x {side * side / 1e6:.0f} Mpix PNG: codes "
                f"{_codes([c for c, _ in results])}, slowest {max(w for _, w in results):.1f} s")

    return flood
