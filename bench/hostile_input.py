"""Hostile input, measured side by side in one run:

1. decode memory: peak RSS growth of the server while N clients send maximum-size, highly compressible
   images at once (a few KB of PNG that decode to UNIADAPTER_MAX_IMAGE_PIXELS pixels), with the decode
   budget (the default, 100 Mpix) and with it lifted (a budget no upload reaches); printed as a ratio,
   with the resident size once the burst is over (freed decode memory returned to the OS or not);
2. Redis hung: p99 latency of `POST /vqa` while a second client adds collection items (cache reads and
   writes, change events), with Redis healthy and with it stopped by SIGSTOP (interleaved rounds, one
   server); printed as a ratio (target <= 1.1x).

Parts 3-6 (bench/hostile_floods.py): a flood against a server with its limits (the defaults) and one
without (body budget, read timeouts and connection caps off; the decode budget lifted for part 6), each
measured side by side: peak RSS growth, the server's open fds, and the p50 of a small /vqa during the
flood next to the same server idle (targets: RSS growth <= 500 MB, p50 <= 3x idle):

3. bodies: concurrent 61 MB JSON bodies (each refused 413 once parsed: its image is over MAX_IMAGE_BYTES);
4. slow connections: connections sending a byte every 10 s from another loopback address (127.0.0.2),
   each opened again when the server cuts it off (3,000 in the issue; 1,000 by default on a small box);
5. SDP sessions and ffconcat scripts posted to /videoqa (415 before any decoder thread is held);
6. bulk add: admin adds of many large (highly compressible) images at once.

Run from the repository root (needs redis-server for part 2):

    .venv/bin/python bench/hostile_input.py
    .venv/bin/python bench/hostile_input.py --clients 16 --side 6000 --rounds 6
    .venv/bin/python bench/hostile_input.py --only floods             # parts 3-6
    .venv/bin/python bench/hostile_input.py --only slow --slow 3000
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import hostile_floods as floods
import httpx
from benchkit import HOST, free_port, percentile, stop_process, wait_ready
from PIL import Image, ImageDraw


@contextmanager
def serve(root: Path, **settings: object) -> Iterator[tuple[str, int]]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("UNIADAPTER_")}
    env.update({"UNIADAPTER_DATA_ROOT": str(root), "UNIADAPTER_PORT": str(port), "UNIADAPTER_HOST": HOST,
                "UNIADAPTER_DEVICE": "cpu", "UNIADAPTER_DEMO_CONTENT": "false", "UNIADAPTER_LOG_LEVEL": "warning"})
    env.update({f"UNIADAPTER_{k.upper()}": str(v) for k, v in settings.items()})
    root.mkdir(parents=True, exist_ok=True)
    log = root / f"server-{port}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "uniadapter_serve.service.cli", "serve"], env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_ready(proc, f"http://{HOST}:{port}", log)
        yield f"http://{HOST}:{port}", proc.pid
    finally:
        stop_process(proc)


def compressible_png(side: int) -> bytes:
    image = Image.new("RGB", (side, side), (200, 40, 40))
    ImageDraw.Draw(image).ellipse((side // 4, side // 4, 3 * side // 4, 3 * side // 4), fill=(30, 60, 220))
    buf = io.BytesIO()
    image.save(buf, "PNG", optimize=True)
    return buf.getvalue()


def burst(url: str, pid: int, png: bytes, clients: int) -> tuple[float, float, float, list[int]]:
    """-> (peak RSS growth MB, idle RSS growth MB after the burst, wall s, status codes)."""
    body = {"image": base64.b64encode(png).decode(), "question": "what colour is the circle?", "adapter": "none"}
    with httpx.Client(base_url=url, timeout=300) as c:
        c.post("/vqa", json={**body, "image": base64.b64encode(compressible_png(64)).decode()})  # warm up
        base = floods.status_kb(pid, "VmRSS")
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current size
        started = time.monotonic()
        with ThreadPoolExecutor(clients) as pool:
            codes = list(pool.map(lambda _: c.post("/vqa", json=body).status_code, range(clients)))
        wall = time.monotonic() - started
        time.sleep(2.0)  # let the server settle (a trim runs at most once a second)
        idle = floods.status_kb(pid, "VmRSS")
    return (floods.status_kb(pid, "VmHWM") - base) / 1024, (idle - base) / 1024, wall, codes


def decode_memory(args: argparse.Namespace, work: Path) -> None:
    png = compressible_png(args.side)
    pixels = args.side * args.side
    print(f"\n== decode memory: {args.clients} clients at once, each a {len(png) / 1024:.0f} KB PNG of "
          f"{args.side}x{args.side} = {pixels / 1e6:.1f} Mpix ==")
    rows = {}
    for label, budget in (("budget 100 Mpix", 100.0), ("no budget", 1e9)):
        root = work / label.replace(" ", "-")
        with serve(root, backbone=args.backbone, max_image_pixels=max(pixels, 40_000_000),
                   max_image_bytes=64 * 1024 * 1024, decode_budget_mpix=budget, decode_wait_s=300,
                   torch_threads=args.threads) as (url, pid):
            peak, idle, wall, codes = burst(url, pid, png, args.clients)
        rows[label] = peak
        print(f"{label:>16}: peak RSS +{peak:7.0f} MB   idle after +{idle:6.0f} MB   burst {wall:5.1f} s   "
              f"codes {sorted(set(codes))}")
    ratio = rows["budget 100 Mpix"] / max(rows["no budget"], 1.0)
    print(f"peak RSS growth, budget / no budget: {ratio:.2f}x")


def vqa_p99(url: str, png: str, n: int) -> float:
    times = []
    with httpx.Client(base_url=url, timeout=60) as c:
        for i in range(n):
            started = time.monotonic()
            r = c.post("/vqa", json={"image": png, "question": f"what colour is it {i}?"})
            times.append(time.monotonic() - started)
            assert r.status_code == 200, r.text
    return percentile(times, 99)


def redis_hung(args: argparse.Namespace, work: Path) -> None:
    binary = shutil.which("redis-server")
    if binary is None:
        print("\n== redis hung: skipped (no redis-server) ==")
        return
    port = free_port()
    redis = subprocess.Popen([binary, "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print(f"\n== redis hung: /vqa p99 over {args.requests} requests while items are added, {args.rounds} rounds ==")
    try:
        time.sleep(0.5)
        png = base64.b64encode(compressible_png(64)).decode()
        with serve(work / "redis", backbone=args.backbone, redis_url=f"redis://{HOST}:{port}/0",
                   torch_threads=args.threads) as (url, _):
            assert httpx.post(f"{url}/collections", json={"name": "c", "kind": "image", "adapter": "none"}
                              ).status_code == 201
            stop = threading.Event()

            def add_items() -> None:
                with httpx.Client(base_url=url, timeout=60) as c:
                    i = 0
                    while not stop.is_set():
                        item = compressible_png(32 + i % 200)
                        c.post("/collections/c/items", json={"items": [{"image": base64.b64encode(item).decode()}]})
                        i += 1

            adder = threading.Thread(target=add_items, daemon=True)
            adder.start()
            healthy, hung = [], []
            try:
                for _ in range(args.rounds):
                    healthy.append(vqa_p99(url, png, args.requests))
                    redis.send_signal(signal.SIGSTOP)
                    try:
                        hung.append(vqa_p99(url, png, args.requests))
                    finally:
                        redis.send_signal(signal.SIGCONT)
            finally:
                stop.set()
                adder.join(30)
        h, s = sorted(healthy)[len(healthy) // 2], sorted(hung)[len(hung) // 2]
        print(f"p99 healthy {h * 1000:.1f} ms, hung {s * 1000:.1f} ms (medians of {args.rounds} rounds): "
              f"hung / healthy {s / h:.2f}x (target <= 1.1x)")
    finally:
        redis.send_signal(signal.SIGCONT)
        redis.terminate()
        redis.wait(10)


def flood_parts(args: argparse.Namespace, work: Path) -> None:
    base = {"backbone": args.backbone, "torch_threads": args.threads}
    limited, unlimited = dict(base), {**base, **floods.NO_LIMITS}
    seconds = args.flood_seconds
    if args.only in (None, "floods", "bodies"):
        flood = floods.big_bodies(args.body_clients, args.body_mb)
        floods.compare(f"bodies: {args.body_clients} clients posting {args.body_mb:g} MB JSON bodies", [
            floods.measure(serve, work, "limits", limited, seconds, flood),
            floods.measure(serve, work, "no limits", unlimited, seconds, flood)])
    if args.only in (None, "floods", "slow"):
        flood = floods.slow_connections(args.slow, args.slow_every, args.slow_sources)
        floods.compare(f"slow connections: {args.slow} sending a byte every {args.slow_every:g} s", [
            floods.measure(serve, work, "limits", limited, seconds, flood),
            floods.measure(serve, work, "no limits", {**base, **floods.NO_CONNECTION_LIMITS}, seconds, flood)])
    if args.only in (None, "floods", "demux"):
        flood = floods.demuxer_programs(args.demux_clients, "README.md")
        floods.compare(f"SDP / ffconcat uploads to /videoqa from {args.demux_clients} clients (refused 415 by "
                       "the container check, which no setting turns off: one row)",
                       [floods.measure(serve, work, "limits", limited, seconds, flood)])
    if args.only in (None, "floods", "bulk"):
        flood = floods.bulk_add(args.bulk_items, args.bulk_side, args.bulk_requests)
        lifted = {**unlimited, "decode_budget_mpix": 1e9, "decode_bulk_share": 1.0}
        floods.compare("bulk add of large images (no limits: decode budget lifted too)", [
            floods.measure(serve, work, "limits", limited, 600, flood),
            floods.measure(serve, work, "no limits", lifted, 600, flood)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="demo")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--side", type=int, default=6300, help="image side (6300^2 = 39.7 Mpix)")
    parser.add_argument("--requests", type=int, default=100, help="/vqa requests per p99 sample")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server")
    parser.add_argument("--flood-seconds", type=float, default=30.0, help="parts 3-5: how long each flood lasts")
    parser.add_argument("--body-clients", type=int, default=16)
    parser.add_argument("--body-mb", type=float, default=61.0)
    parser.add_argument("--slow", type=int, default=1000, help="slow connections (the issue saw 3,000)")
    parser.add_argument("--slow-every", type=float, default=10.0, help="seconds between a slow client's bytes")
    parser.add_argument("--slow-sources", type=int, default=1, help="loopback addresses the slow clients use")
    parser.add_argument("--demux-clients", type=int, default=45)
    parser.add_argument("--bulk-items", type=int, default=16, help="images per bulk add")
    parser.add_argument("--bulk-side", type=int, default=4000, help="side of each bulk image (4000^2 = 16 Mpix)")
    parser.add_argument("--bulk-requests", type=int, default=2, help="bulk adds at once")
    parser.add_argument("--only", choices=("memory", "redis", "floods", "bodies", "slow", "demux", "bulk"),
                        help="one part (floods: parts 3-6)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-hostile-") as tmp:
        if args.only in (None, "memory"):
            decode_memory(args, Path(tmp))
        if args.only in (None, "redis"):
            redis_hung(args, Path(tmp))
        if args.only not in ("memory", "redis"):
            flood_parts(args, Path(tmp))


if __name__ == "__main__":
    main()
