"""Video benchmarks: decode + sample cost vs clip length, and /videoqa throughput under concurrency.

1. Decode + sample. Real H.264/MP4 clips (25 fps, 320x240, keyframe every 2 s, a moving square over a
   colour-shifting, scrolling background so the encoder does real work) of 10 s, 60 s and 600 s are
   encoded once with PyAV and cached in a temp folder (the encode time is printed on its own). Then
   `uniadapter_serve.model.media.video.decode_clip(..., num_frames=8, size=64)` is timed on each clip,
   next to a naive baseline that decodes every frame (`container.decode(stream)`, no conversion).
   Measurements are interleaved (round-robin over clips and methods) and the median is reported,
   with frames decoded and the time growth against the length growth (vs the shortest clip).

2. Moments of a long video. A 10-minute 854x480 H.264/MP4 (25 fps, keyframe every 2 s; cached like the
   clips) is cut into windows of 8 s every 4 s, 8 frames each, at 96 px (the demo's size) and 384 px
   (BLIP-base's). Timed: `video_duration` (header read), `MomentDecoder` (one pass over the file) and,
   side by side in the same run, the naive way: `decode_clip(span=...)` per window, each opening the
   container. Printed per size: wall and CPU seconds (the process's, FFmpeg's threads included),
   windows/s, frames decoded vs the file's frames, peak RSS above the start of the run (sampled every
   2 ms from /proc) and the frames the decoder held at model size; the naive / one-pass ratios.
   Then `ingest_http`: the same video added to a moment collection of a running service (demo backbone,
   bare backbone, multipart upload): ingest wall time, server CPU, moments stored; skipped, with a printed
   line, when the service does not take moment collections yet.

3. VideoQA throughput. The service runs as a subprocess (demo backbone, CPU, 127.0.0.1) with a
   published videoqa adapter set; `POST /videoqa` with a 4 s 160x120 clip is sent N times at
   concurrency 1 and 8, split over interleaved rounds. Printed: req/s (median over rounds),
   p50 / p95 latency (all rounds pooled), errors, server CPU (cores busy, CPU ms per request), the
   mean batch size per stage from `/metrics` deltas, and the 8-client / 1-client ratio.

Run from the repository root (about 5-10 minutes on two cores; the first run also encodes the clips, the
10-minute 480p one in a few minutes):

    .venv/bin/python bench/video.py
    .venv/bin/python bench/video.py --lengths 10,60 --requests 30 --skip-service
    .venv/bin/python bench/video.py --skip-decode --skip-service  # moments only
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gc
import io
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import av
import httpx
import numpy as np
from benchkit import HOST, free_port, percentile, stop_process, wait_ready

from uniadapter_serve.model.media.video import MomentDecoder, decode_clip, video_duration

FPS = 25
GOP = 50
CLIP_W, CLIP_H = 320, 240
QA_SECONDS, QA_W, QA_H = 4, 160, 120
NUM_FRAMES = 8
SAMPLE_SIZE = 64
LONG_SECONDS, LONG_W, LONG_H = 600, 854, 480
MOMENT_WINDOW_S, MOMENT_STRIDE_S = 8.0, 4.0
MOMENT_SIZES = (96, 384)
"""the demo model's image size, BLIP-base's"""
MOMENT_CHUNK = 16
MOMENT_COLLECTION = "bench-moments"
REQUEST_TIMEOUT_S = 60.0
SCENARIO_TIME_LIMIT_S = 120.0
ADAPTER = "vqa-video"
ANSWERS = ["red", "green", "blue", "left", "right", "up", "down"]
QUESTION = "which way does the square move?"
STAGES = ("vision", "text", "itm", "answer")
METRIC_RE = re.compile(r"^(\w+)(?:\{([^}]*)\})?\s+(\S+)$")
LABEL_RE = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


# -- clip generation -----------------------------------------------------------------------------

def pattern_frame(i: int, width: int, height: int, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Frame i: scrolling colour-shifting gradient with a stripe texture, and a square moving right."""
    t = i / FPS
    frame = np.empty((height, width, 3), dtype=np.uint8)
    frame[..., 0] = (xs + 3 * i) % 256
    frame[..., 1] = (ys + 2 * i) % 256
    frame[..., 2] = ((xs + ys) // 2 + int(60 * np.sin(t / 3.0)) + 128 + ((xs // 8 + i) % 4) * 16) % 256
    side = max(8, height // 6)
    x0 = int((i * 2) % max(1, width - side))
    y0 = int((height - side) / 2 * (1 + np.sin(t / 2.0))) % max(1, height - side)
    frame[y0:y0 + side, x0:x0 + side] = (255, 255, 255) if (i // FPS) % 2 == 0 else (250, 30, 30)
    return frame


def encode_clip(out: io.BytesIO | Path, seconds: float, width: int, height: int, preset: str) -> None:
    """Encode a pattern clip as H.264 in MP4 (yuv420p, gop_size GOP) into `out`."""
    yy, xx = np.mgrid[0:height, 0:width]
    xs, ys = xx.astype(np.int32), yy.astype(np.int32)
    target = str(out) if isinstance(out, Path) else out
    with av.open(target, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.gop_size = GOP
        stream.codec_context.options = {"preset": preset}
        for i in range(round(seconds * FPS)):
            frame = av.VideoFrame.from_ndarray(pattern_frame(i, width, height, xs, ys), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


@dataclass
class Encoded:
    data: bytes
    encode_s: float | None
    """seconds the encode took (None: unknown)"""
    cached: bool


def cached_clip(cache_dir: Path, seconds: int, preset: str, width: int = CLIP_W, height: int = CLIP_H) -> Encoded:
    """The clip, encoded now or read from the cache (with the encode time recorded when it was made)."""
    path = cache_dir / f"clip_{seconds}s_{width}x{height}_{FPS}fps_gop{GOP}_{preset}_v1.mp4"
    timing = path.with_suffix(".encode_s")
    if path.exists() and path.stat().st_size > 0:
        try:
            recorded: float | None = float(timing.read_text())
        except (OSError, ValueError):
            recorded = None
        return Encoded(path.read_bytes(), recorded, cached=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.part")
    started = time.perf_counter()
    encode_clip(partial, seconds, width, height, preset)
    elapsed = time.perf_counter() - started
    partial.replace(path)
    timing.write_text(f"{elapsed:.3f}")
    return Encoded(path.read_bytes(), elapsed, cached=False)


def qa_clip(preset: str) -> bytes:
    buffer = io.BytesIO()
    encode_clip(buffer, QA_SECONDS, QA_W, QA_H, preset)
    return buffer.getvalue()


# -- part 1: decode + sample vs clip length --------------------------------------------------------

def time_sampled(data: bytes) -> tuple[float, int, list[float]]:
    """Seconds for decode_clip, frames decoded, sampled timestamps."""
    started = time.perf_counter()
    clip = decode_clip(data, num_frames=NUM_FRAMES, size=SAMPLE_SIZE, max_bytes=10**10, max_seconds=10**6,
                       max_pixels=10**8)
    return time.perf_counter() - started, clip.decoded, clip.timestamps


def time_naive(data: bytes) -> tuple[float, int]:
    """Seconds to decode every frame (same threading as decode_clip, no conversion), frames decoded."""
    started = time.perf_counter()
    count = 0
    with av.open(io.BytesIO(data), mode="r") as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for _ in container.decode(stream):
            count += 1
    return time.perf_counter() - started, count


def time_sampled_at(data: bytes, size: int) -> tuple[float, int]:
    """decode_clip at the server's settings (server default limits) -> seconds, frames decoded."""
    t0 = time.perf_counter()
    clip = decode_clip(data, num_frames=NUM_FRAMES, size=size, max_bytes=50 * 2**20, max_seconds=600.0,
                       max_pixels=1920 * 1080)
    return time.perf_counter() - t0, clip.decoded


@dataclass
class DecodeRow:
    seconds: int
    size_bytes: int
    sampled: list[float] = field(default_factory=list)
    naive: list[float] = field(default_factory=list)
    decoded: int = 0
    total_frames: int = 0
    timestamps: list[float] = field(default_factory=list)


def bench_decode(clips: dict[int, bytes], repeats: int, naive: bool) -> list[DecodeRow]:
    rows = {s: DecodeRow(s, len(d)) for s, d in clips.items()}
    for d in clips.values():  # warm-up: imports, codec init, page cache
        time_sampled(d)
    for _ in range(repeats):
        for s, d in clips.items():
            row = rows[s]
            elapsed, row.decoded, row.timestamps = time_sampled(d)
            row.sampled.append(elapsed)
            if naive:
                elapsed, row.total_frames = time_naive(d)
                row.naive.append(elapsed)
    return list(rows.values())


def print_decode(rows: Sequence[DecodeRow], encoded: dict[int, Encoded], repeats: int) -> None:
    print(f"\n1. decode + sample ({NUM_FRAMES} frames at {SAMPLE_SIZE}x{SAMPLE_SIZE}) vs clip length: "
          f"H.264/MP4 {CLIP_W}x{CLIP_H} {FPS} fps, keyframe every {GOP} frames; median of {repeats}, interleaved")
    for row in rows:
        e = encoded[row.seconds]
        took = "unknown" if e.encode_s is None else f"{e.encode_s:.1f} s"
        print(f"  encode {row.seconds:>4} s clip: {took}{' (earlier run, read from cache)' if e.cached else ''}, "
              f"{row.size_bytes / 1e6:.2f} MB")
    base = rows[0]
    b_s = statistics.median(base.sampled)
    b_n = statistics.median(base.naive) if base.naive else float("nan")
    print(f"\n  {'length':>7}{'sample ms':>11}{'decoded':>9}{'time x':>8}{'length x':>9}"
          f"{'naive ms':>11}{'frames':>8}{'naive x':>9}{'saving':>9}")
    for row in rows:
        s_ms = statistics.median(row.sampled) * 1e3
        n_ms = statistics.median(row.naive) * 1e3 if row.naive else float("nan")
        print(f"  {row.seconds:>5} s{s_ms:>11.1f}{row.decoded:>9}{s_ms / (b_s * 1e3):>7.1f}x"
              f"{row.seconds / base.seconds:>8.0f}x{n_ms:>11.1f}{row.total_frames:>8}"
              f"{n_ms / (b_n * 1e3):>8.1f}x{n_ms / s_ms:>8.1f}x")
    print("  time x / length x / naive x: vs the shortest clip; saving: naive ms / sample ms.")
    last = rows[-1]
    print(f"  sampled timestamps ({last.seconds} s clip): {', '.join(f'{t:.2f}' for t in last.timestamps)}")


# -- part 2: moments of a long video -----------------------------------------------------------------------

def rss_bytes() -> int:
    """This process's resident set size now (Linux /proc)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextmanager
def peak_rss() -> Iterator[dict[str, int]]:
    """Sample RSS every 2 ms while the block runs -> {'before', 'peak'} (bytes). getrusage's ru_maxrss is the
    process's high-water mark since it started, which an earlier, bigger run would hide."""
    out = {"before": rss_bytes(), "peak": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            out["peak"] = max(out["peak"], rss_bytes())
            stop.wait(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield out
    finally:
        stop.set()
        sampler.join()
        out["peak"] = max(out["peak"], rss_bytes())


@dataclass
class MomentRun:
    method: str
    size: int
    wall_s: float = 0.0
    cpu_s: float = 0.0
    windows: int = 0
    decoded: int = 0
    frames: int = 0
    rss_delta: int = 0
    held: int = 0
    """distinct model-size frames held at once (MomentDecoder.peak_held); naive: one window's"""


def run_one_pass(data: bytes, size: int) -> MomentRun:
    run = MomentRun("one pass", size)
    gc.collect()
    with peak_rss() as rss:
        wall, cpu = time.perf_counter(), time.process_time()
        with MomentDecoder(data, num_frames=NUM_FRAMES, size=size, window_s=MOMENT_WINDOW_S,
                           stride_s=MOMENT_STRIDE_S, max_bytes=10**10, max_seconds=10**5, max_pixels=10**8) as decoder:
            for chunk in decoder.chunks(MOMENT_CHUNK):  # (n, T, 3, S, S) uint8: what an ingest embeds
                run.windows += chunk.shape[0]
                del chunk  # embedded and dropped before the next is made, as an ingest does
            run.wall_s, run.cpu_s = time.perf_counter() - wall, time.process_time() - cpu
            run.decoded, run.frames, run.held = decoder.decoded, decoder.packets, decoder.peak_held
    run.rss_delta = rss["peak"] - rss["before"]
    return run


def run_naive_windows(data: bytes, size: int, spans: list[tuple[float, float]], frames: int) -> MomentRun:
    run = MomentRun("decode_clip per window", size, frames=frames, held=NUM_FRAMES)
    gc.collect()
    with peak_rss() as rss:
        wall, cpu = time.perf_counter(), time.process_time()
        for span in spans:  # each window opens the container, seeks and decodes on its own
            clip = decode_clip(data, num_frames=NUM_FRAMES, size=size, span=span, normalised=False,
                               max_bytes=10**10, max_seconds=10**5, max_pixels=10**8)
            run.windows += 1
            run.decoded += clip.decoded
        run.wall_s, run.cpu_s = time.perf_counter() - wall, time.process_time() - cpu
    run.rss_delta = rss["peak"] - rss["before"]
    return run


def bench_moments(data: bytes, repeats: int, naive: bool) -> tuple[list[float], list[MomentRun]]:
    durations = []
    for _ in range(max(5, repeats)):
        t0 = time.perf_counter()
        duration = video_duration(data, max_bytes=10**10, max_pixels=10**8)
        durations.append(time.perf_counter() - t0)
    with MomentDecoder(data, num_frames=NUM_FRAMES, size=MOMENT_SIZES[0], window_s=MOMENT_WINDOW_S,
                       stride_s=MOMENT_STRIDE_S, max_bytes=10**10, max_seconds=10**5, max_pixels=10**8) as planned:
        spans, frames = planned.spans, planned.packets
    assert abs(duration - planned.duration_s) < 1e-6
    runs = []
    for r in range(repeats):  # sizes and methods interleaved, the order flipped each round
        for size in MOMENT_SIZES if r % 2 == 0 else MOMENT_SIZES[::-1]:
            pair = [lambda s=size: run_one_pass(data, s)]
            if naive:
                pair.append(lambda s=size: run_naive_windows(data, s, spans, frames))
            for run in pair if r % 2 == 0 else pair[::-1]:
                runs.append(run())
    return durations, runs


def print_moments(data: bytes, encoded: Encoded, durations: list[float], runs: Sequence[MomentRun],
                  repeats: int) -> None:
    took = "unknown" if encoded.encode_s is None else f"{encoded.encode_s:.0f} s"
    print(f"\n2. moments of a {LONG_SECONDS // 60}-minute video: H.264/MP4 {LONG_W}x{LONG_H} {FPS} fps, keyframe every "
          f"{GOP} frames, {len(data) / 1e6:.1f} MB (encode {took}{', read from cache' if encoded.cached else ''}); "
          f"windows of {MOMENT_WINDOW_S:g} s every {MOMENT_STRIDE_S:g} s, {NUM_FRAMES} frames each; "
          f"{repeats} round(s), interleaved")
    print(f"  video_duration (header): {statistics.median(durations) * 1e3:.2f} ms median of {len(durations)}")
    print(f"\n  {'size':>5}  {'method':<24}{'wall s':>8}{'CPU s':>8}{'win/s':>8}{'decoded':>9}{'of frames':>10}"
          f"{'RSS +MB':>9}{'held':>6}{'held MB':>9}")
    for size in MOMENT_SIZES:
        for method in ("one pass", "decode_clip per window"):
            mine = [r for r in runs if r.size == size and r.method == method]
            if not mine:
                continue
            wall = statistics.median(r.wall_s for r in mine)
            cpu = statistics.median(r.cpu_s for r in mine)
            rss = max(r.rss_delta for r in mine) / 2**20
            r0 = mine[0]
            held_mb = r0.held * 3 * size * size / 2**20
            print(f"  {size:>5}  {method:<24}{wall:>8.1f}{cpu:>8.1f}{r0.windows / wall:>8.1f}{r0.decoded:>9}"
                  f"{r0.decoded / r0.frames:>9.0%} {rss:>8.1f}{r0.held:>6}{held_mb:>9.1f}")
        one = [r for r in runs if r.size == size and r.method == "one pass"]
        naive = [r for r in runs if r.size == size and r.method != "one pass"]
        if one and naive:
            w = statistics.median(r.wall_s for r in naive) / statistics.median(r.wall_s for r in one)
            c = statistics.median(r.cpu_s for r in naive) / statistics.median(r.cpu_s for r in one)
            print(f"  {size:>5}  naive / one pass: wall {w:.2f}x, CPU {c:.2f}x, frames decoded "
                  f"{naive[0].decoded / one[0].decoded:.2f}x")
    print("  CPU s: the process's (FFmpeg's decoder threads included); RSS +MB: peak RSS above the run's start "
          "(max over rounds);\n  held: distinct model-size frames the decoder kept at once (naive: one window's); "
          f"one pass hands out chunks of {MOMENT_CHUNK} windows.")


@dataclass
class Ingest:
    wall_s: float
    server_cpu_s: float
    size_bytes: int
    stats: dict[str, object]
    """GET /collections/{name} after the add"""


def ingest_http(data: bytes, data_root: Path, max_wait_ms: float) -> Ingest | None:
    """Add the long video to a moment collection of a running service (demo backbone, bare backbone adapter,
    one multipart upload) and time it; None (and a printed line) when the service does not take moment
    collections yet."""
    env = {"UNIADAPTER_MAX_REQUEST_BYTES": str(max(64 * 2**20, 2 * len(data))),
           "UNIADAPTER_MAX_MOMENT_VIDEO_BYTES": str(max(512 * 2**20, 2 * len(data))),
           "UNIADAPTER_BODY_BUDGET_MB": str(max(96, 8 * len(data) // 2**20)),
           "UNIADAPTER_REQUEST_TIMEOUT_S": "1800"}
    with running_server(data_root, max_wait_ms, env) as (url, pid), httpx.Client(base_url=url, timeout=1800) as c:
        r = c.post("/collections", json={"name": MOMENT_COLLECTION, "kind": "video", "adapter": "none",
                                         "moments": {"window_s": MOMENT_WINDOW_S, "stride_s": MOMENT_STRIDE_S}})
        if r.status_code != 201:
            print(f"\n  ingest over HTTP skipped: the service does not create a moment collection yet "
                  f"(POST /collections -> {r.status_code}: {r.text[:200]})")
            return None
        cpu = process_cpu_seconds(pid)
        t0 = time.perf_counter()
        r = c.post(f"/collections/{MOMENT_COLLECTION}/items",
                   files={"files": ("long.mp4", data, "video/mp4")}, data={"ids": "long"})
        wall = time.perf_counter() - t0
        server_cpu = process_cpu_seconds(pid) - cpu
        if r.status_code != 201:
            print(f"\n  ingest over HTTP skipped: POST items -> {r.status_code}: {r.text[:300]}")
            return None
        stats: dict[str, object] = c.get(f"/collections/{MOMENT_COLLECTION}").json()
    return Ingest(wall, server_cpu, len(data), stats)


def print_ingest(result: Ingest | None) -> None:
    if result is None:
        return
    print(f"\n  ingest over HTTP (demo backbone, bare backbone, one multipart upload of {result.size_bytes / 1e6:.1f} "
          f"MB): {result.wall_s:.1f} s wall, server CPU {result.server_cpu_s:.1f} s "
          f"({result.server_cpu_s / result.wall_s:.2f} cores), {LONG_SECONDS / result.wall_s:.1f}x real time")
    print(f"  collection after the add: {json.dumps(result.stats)[:400]}")

# -- part 3: /videoqa under concurrency ------------------------------------------------------------

def publish_set(data_root: Path) -> int:
    """Publish the videoqa set for the demo backbone; -> the backbone's image size."""
    from uniadapter_serve.adapters.format import BackboneInfo
    from uniadapter_serve.adapters.registry import AdapterRegistry
    from uniadapter_serve.model.backbone import vision_config
    from uniadapter_serve.model.loading import load_backbone
    from uniadapter_serve.model.testing import random_adapter
    from uniadapter_serve.model.uniadapter import UniAdapterConfig

    backbone = load_backbone("demo")
    module = random_adapter(backbone, UniAdapterConfig.for_task("videoqa", bottleneck=64, num_frames=NUM_FRAMES),
                            seed=1, std=0.02)
    AdapterRegistry(data_root / "adapters").publish(module, ADAPTER, BackboneInfo.of(backbone),
                                                    answer_list=ANSWERS)
    return int(vision_config(backbone.config).image_size)  # type: ignore[arg-type]














@contextmanager
def running_server(data_root: Path, max_wait_ms: float,
                   extra_env: dict[str, str] | None = None) -> Iterator[tuple[str, int]]:
    """Start the service, wait for /readyz, yield (base url, pid); always stop it."""
    port = free_port()
    env = dict(os.environ)
    env.update({"UNIADAPTER_BACKBONE": "demo", "UNIADAPTER_DATA_ROOT": str(data_root),
                "UNIADAPTER_PORT": str(port), "UNIADAPTER_HOST": HOST, "UNIADAPTER_DEVICE": "cpu",
                "UNIADAPTER_MAX_WAIT_MS": f"{max_wait_ms:g}", "UNIADAPTER_LOG_LEVEL": "warning",
                **(extra_env or {})})
    log_path = data_root / "server.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "uniadapter_serve.service.cli", "serve"], env=env,
                                stdout=log_file, stderr=subprocess.STDOUT)
        try:
            url = f"http://{HOST}:{port}"
            wait_ready(proc, url, log_path)
            yield url, proc.pid
        finally:
            stop_process(proc)


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of one process (Linux /proc), or nan."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


def parse_metrics(text: str) -> dict[tuple[str, str], float]:
    """(metric name, stage label) -> value, for lines with a `stage` label."""
    out: dict[tuple[str, str], float] = {}
    for line in text.splitlines():
        m = METRIC_RE.match(line.strip())
        if m is None or line.startswith("#"):
            continue
        stage = dict(LABEL_RE.findall(m.group(2) or "")).get("stage")
        if stage is None:
            continue
        try:
            out[(m.group(1), stage)] = out.get((m.group(1), stage), 0.0) + float(m.group(3))
        except ValueError:
            continue
    return out


async def scrape(client: httpx.AsyncClient) -> dict[tuple[str, str], float]:
    r = await client.get("/metrics")
    r.raise_for_status()
    return parse_metrics(r.text)





@dataclass
class Scenario:
    concurrency: int
    throughputs: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    requests: int = 0
    elapsed: float = 0.0
    server_cpu: float = 0.0
    batch_sum: dict[str, float] = field(default_factory=dict)
    batch_count: dict[str, float] = field(default_factory=dict)

    def add_batches(self, before: dict[tuple[str, str], float], after: dict[tuple[str, str], float]) -> None:
        for (name, stage), value in after.items():
            d = value - before.get((name, stage), 0.0)
            if name == "uniadapter_batch_size_sum":
                self.batch_sum[stage] = self.batch_sum.get(stage, 0.0) + d
            elif name == "uniadapter_batch_size_count":
                self.batch_count[stage] = self.batch_count.get(stage, 0.0) + d

    def mean_batches(self) -> str:
        means = {s: self.batch_sum.get(s, 0.0) / n for s, n in self.batch_count.items() if n > 0}
        order = [s for s in STAGES if s in means] + sorted(set(means) - set(STAGES))
        return " ".join(f"{s}={means[s]:.2f}" for s in order) or "-"


async def run_round(client: httpx.AsyncClient, body: bytes, sc: Scenario, requests: int, pid: int) -> None:
    """`sc.concurrency` workers send back to back until `requests` were sent (or the time limit)."""
    issued = 0
    deadline = time.monotonic() + SCENARIO_TIME_LIMIT_S
    ok: list[float] = []

    async def worker() -> None:
        nonlocal issued
        while issued < requests and time.monotonic() < deadline:
            issued += 1
            started = time.perf_counter()
            try:
                r = await client.post("/videoqa", content=body, headers={"content-type": "application/json"})
            except httpx.HTTPError as e:
                sc.errors[type(e).__name__] = sc.errors.get(type(e).__name__, 0) + 1
                continue
            if r.status_code == 200:
                ok.append(time.perf_counter() - started)
            else:
                sc.errors[f"HTTP {r.status_code}"] = sc.errors.get(f"HTTP {r.status_code}", 0) + 1

    before, cpu_before = await scrape(client), process_cpu_seconds(pid)
    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(sc.concurrency)))
    elapsed = time.perf_counter() - started
    sc.server_cpu += process_cpu_seconds(pid) - cpu_before
    sc.add_batches(before, await scrape(client))
    sc.throughputs.append(len(ok) / elapsed if elapsed > 0 else 0.0)
    sc.latencies.extend(ok)
    sc.requests += issued
    sc.elapsed += elapsed


async def bench_service(url: str, pid: int, body: bytes, args: argparse.Namespace) -> list[Scenario]:
    scenarios = [Scenario(c) for c in args.concurrency]
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=REQUEST_TIMEOUT_S) as client:
        warm = Scenario(1)
        await run_round(client, body, warm, args.warmup, pid)
        if warm.errors:
            raise RuntimeError(f"warm-up failed: {warm.errors}")
        rounds = max(1, min(args.rounds, args.requests))
        for r in range(rounds):
            share = args.requests // rounds + (1 if r < args.requests % rounds else 0)
            for sc in scenarios:
                await run_round(client, body, sc, share, pid)
    return scenarios


def print_service(scenarios: Sequence[Scenario], clip_bytes: int, decode_ms: float, decoded: int,
                  args: argparse.Namespace) -> None:
    print(f"\n3. POST /videoqa, demo backbone on cpu, max_wait_ms {args.max_wait_ms:g}: {QA_SECONDS} s {FPS} fps "
          f"{QA_W}x{QA_H} H.264 clip ({clip_bytes / 1e3:.0f} kB), {args.requests} requests per scenario "
          f"in {args.rounds} interleaved rounds")
    print(f"  the same clip decoded + sampled in this process: {decode_ms:.1f} ms median, {decoded} frames decoded")
    cores = float(os.cpu_count() or 1)
    print(f"\n  {'clients':>7}{'requests':>9}{'errors':>7}{'req/s':>8}{'p50 ms':>9}{'p95 ms':>9}"
          f"{'srv cores':>10}{'srv CPU ms/req':>15}   mean batch size per stage")
    for sc in scenarios:
        done = len(sc.latencies)
        print(f"  {sc.concurrency:>7}{sc.requests:>9}{sum(sc.errors.values()):>7}"
              f"{statistics.median(sc.throughputs):>8.1f}{percentile(sc.latencies, 50) * 1e3:>9.1f}"
              f"{percentile(sc.latencies, 95) * 1e3:>9.1f}{sc.server_cpu / sc.elapsed:>10.2f}"
              f"{sc.server_cpu / max(1, done) * 1e3:>15.1f}   {sc.mean_batches()}")
    print(f"  req/s: median over rounds; p50/p95: all rounds pooled; srv cores: server CPU s / wall s "
          f"(machine has {cores:g}).")
    for sc in scenarios:
        if sc.errors:
            print(f"  errors at {sc.concurrency} clients: {sc.errors}")
    base = next((s for s in scenarios if s.concurrency == 1), None)
    for sc in scenarios:
        if base is not None and sc is not base:
            b, t = statistics.median(base.throughputs), statistics.median(sc.throughputs)
            print(f"  ratio {sc.concurrency} clients / 1 client: {t:.1f} / {b:.1f} req/s = {t / b:.2f}x")
    for sc in scenarios:
        print(f"  req/s per round at {sc.concurrency} clients: {', '.join(f'{x:.1f}' for x in sc.throughputs)}")


# -- main ----------------------------------------------------------------------------------------

def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int_list, default=[10, 60, 600], help="clip lengths in seconds")
    p.add_argument("--repeats", type=int, default=5, help="timed decodes per clip and method")
    p.add_argument("--no-naive", action="store_true", help="skip the decode-every-frame baseline")
    p.add_argument("--preset", default="veryfast", help="x264 preset for the generated clips")
    p.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "uniadapter-bench-video")
    p.add_argument("--requests", type=int, default=60, help="/videoqa requests per scenario (split over rounds)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the concurrency scenarios")
    p.add_argument("--concurrency", type=int_list, default=[1, 8], help="client counts (1 is the baseline)")
    p.add_argument("--warmup", type=int, default=5, help="/videoqa requests before timing")
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--moment-rounds", type=int, default=1, help="rounds of the moment measurements")
    p.add_argument("--no-naive-moments", action="store_true", help="skip decode_clip per window")
    p.add_argument("--skip-decode", action="store_true")
    p.add_argument("--skip-moments", action="store_true")
    p.add_argument("--skip-ingest", action="store_true", help="skip the moment ingest over HTTP")
    p.add_argument("--skip-service", action="store_true")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    print(f"video benchmarks: python {sys.version.split()[0]}, PyAV {av.__version__}, cpu_count {os.cpu_count()}, "
          f"load average {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if not args.skip_decode:
        encoded = {seconds: cached_clip(args.cache_dir, seconds, args.preset) for seconds in sorted(args.lengths)}
        rows = bench_decode({s: e.data for s, e in encoded.items()}, args.repeats, naive=not args.no_naive)
        print_decode(rows, encoded, args.repeats)
        print(f"  clips cached in {args.cache_dir}")
    if not args.skip_moments:
        long = cached_clip(args.cache_dir, LONG_SECONDS, args.preset, LONG_W, LONG_H)
        durations, runs = bench_moments(long.data, args.moment_rounds, naive=not args.no_naive_moments)
        print_moments(long.data, long, durations, runs, args.moment_rounds)
        if not args.skip_ingest:
            with tempfile.TemporaryDirectory(prefix="uniadapter-bench-moments-") as tmp:
                print_ingest(ingest_http(long.data, Path(tmp), args.max_wait_ms))
    if not args.skip_service:
        body_clip = qa_clip(args.preset)
        body = json.dumps({"video": base64.b64encode(body_clip).decode("ascii"), "question": QUESTION,
                           "adapter": ADAPTER}).encode()
        with tempfile.TemporaryDirectory(prefix="uniadapter-bench-video-") as tmp:
            data_root = Path(tmp)
            image_size = publish_set(data_root)
            times = [time_sampled_at(body_clip, image_size) for _ in range(max(3, args.repeats))]
            decode_ms, decoded = statistics.median(t for t, _ in times) * 1e3, times[0][1]
            with running_server(data_root, args.max_wait_ms) as (url, pid):
                scenarios = asyncio.run(bench_service(url, pid, body, args))
        print_service(scenarios, len(body_clip), decode_ms, decoded, args)
    print(f"\nwall time {time.perf_counter() - started:.1f} s; load average now "
          f"{', '.join(f'{x:.2f}' for x in os.getloadavg())} (other processes share the cores)")


if __name__ == "__main__":
    main()
