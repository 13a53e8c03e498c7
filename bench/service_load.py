"""Load test of the HTTP service: throughput and latency under concurrent clients vs one at a time.

Starts the service (`python -m uniadapter_serve.service.cli serve`) as a subprocess on
127.0.0.1 with a fresh data root holding two VQA sets and two retrieval sets for the served
backbone, then, for `POST /vqa` and text-query `POST /retrieve`, sends requests from C client
coroutines (C = 1, 8, 32; each sends back to back until the scenario's requests are done) and
prints per scenario:

- requests, errors (non-200 or transport failures, counted separately), throughput (req/s),
  client-side latency p50 / p95 (ms);
- where the time goes: `GET /metrics` is scraped before and after every scenario, and the
  deltas of `uniadapter_batch_size` (`_sum` / `_count` per `stage`) give the mean batch size
  per stage; `uniadapter_mixed_batches_total` deltas give the batches that mixed adapter sets.

Concurrency 1 (one request at a time, sequential) is the baseline: for each route the
ratio throughput(32 clients) / throughput(one at a time) is printed against the CPU target
(>= 3x) and the DESIGN target (>= 4x), with ok or MISSED. Requests alternate between the two
sets of their task, so batches mix sets. The load generator runs on the same machine as the
server and shares its CPU cores, which depresses the ratio on a small machine.

Run from the repository root:

    .venv/bin/python bench/service_load.py
    .venv/bin/python bench/service_load.py --backbone blip-tiny --vqa-requests 100 --max-wait-ms 10

The defaults take under a minute on two quiet cores. Every scenario stops after `--time-limit`
seconds (30 by default) even if its requests are not all done, so a loaded machine cannot stretch
a run much past 4 minutes. The srv / gen / other columns show how much of the machine the
server, this load generator and other processes used during each scenario: a large "other"
share means the numbers of that scenario are not worth comparing.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch
from benchkit import HOST, free_port, percentile, stop_process, wait_ready
from PIL import Image, ImageDraw

CONCURRENCY = (1, 8, 32)
RATIO_CONCURRENCY = 32
RATIO_TARGET_CPU = 3.0
RATIO_TARGET_DESIGN = 4.0
STAGES = ("vision", "text", "itm", "answer")
REQUEST_TIMEOUT_S = 60.0
WARMUP_TIME_LIMIT_S = 10.0
FOREIGN_CPU_WARN = 0.10
"""Other processes using more than this share of the machine during a scenario skew its numbers."""
IMAGE_SIZE = 64
VQA_SETS = ("vqa-a", "vqa-b")
RETRIEVAL_SETS = ("ret-a", "ret-b")
ANSWERS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black", "circle", "square",
           "triangle", "yes", "no", "one", "two", "three"]
METRIC_RE = re.compile(r'^(\w+)(?:\{([^}]*)\})?\s+(\S+)$')
LABEL_RE = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')

MetricKey = tuple[str, tuple[tuple[str, str], ...]]


# -- request bodies ------------------------------------------------------------------------------

def circle_png(fill: tuple[int, int, int], background: tuple[int, int, int], radius: int = 20) -> bytes:
    """A 64x64 PNG: a coloured circle on a plain background."""
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), background)
    c = IMAGE_SIZE // 2
    ImageDraw.Draw(image).ellipse((c - radius, c - radius, c + radius, c + radius), fill=fill)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


COLOURS = [((220, 30, 30), (240, 240, 240)), ((30, 160, 40), (20, 20, 60)),
           ((40, 60, 220), (250, 230, 200)), ((230, 210, 20), (60, 60, 60))]


def vqa_bodies() -> list[bytes]:
    """One JSON body per set (requests alternate between them), pre-encoded so the client spends
    no CPU on serialisation while timing."""
    image = b64(circle_png(*COLOURS[0]))
    return [json.dumps({"image": image, "question": "what colour is the circle?", "adapter": name}).encode()
            for name in VQA_SETS]


COLLECTION = "bench-images"


def collection_bodies() -> list[bytes]:
    """Text queries against a collection (the collection is bound to one set, so no `adapter`)."""
    queries = ["a red circle", "a blue circle on the left", "a large green circle", "a small yellow circle"]
    return [json.dumps({"query_text": q, "collection": COLLECTION, "top_k": 5}).encode() for q in queries]


async def fill_collection(base_url: str, n: int = 64) -> None:
    """Create the collection (bound to the first retrieval set) and add `n` generated images."""
    async with httpx.AsyncClient(base_url=base_url, timeout=REQUEST_TIMEOUT_S) as client:
        r = await client.post("/collections", json={"name": COLLECTION, "kind": "image",
                                                    "adapter": RETRIEVAL_SETS[0]})
        r.raise_for_status()
        items = [{"id": f"img{i}", "image": b64(circle_png(COLOURS[i % len(COLOURS)][0],
                                                           COLOURS[(i // len(COLOURS)) % len(COLOURS)][1],
                                                           radius=8 + i % 20))} for i in range(n)]
        for start in range(0, n, 16):
            r = await client.post(f"/collections/{COLLECTION}/items", json={"items": items[start:start + 16]})
            r.raise_for_status()


def retrieve_bodies() -> list[bytes]:
    images = [b64(circle_png(fill, bg)) for fill, bg in COLOURS]
    return [json.dumps({"query_text": "a red circle", "candidate_images": images, "top_k": 2,
                        "adapter": name}).encode() for name in RETRIEVAL_SETS]


# -- adapter sets and the server process -------------------------------------------------------

def publish_sets(data_root: Path, backbone_name: str) -> None:
    """Two VQA and two retrieval sets for the backbone the server will load (same seeded weights)."""
    from uniadapter_serve.adapters.format import BackboneInfo
    from uniadapter_serve.adapters.registry import AdapterRegistry
    from uniadapter_serve.model.loading import load_backbone
    from uniadapter_serve.model.testing import random_adapter
    from uniadapter_serve.model.uniadapter import UniAdapterConfig

    backbone = load_backbone(backbone_name)
    registry = AdapterRegistry(data_root / "adapters")
    info = BackboneInfo.of(backbone)
    for seed, name in enumerate(VQA_SETS, start=1):
        module = random_adapter(backbone, UniAdapterConfig.for_task("vqa", bottleneck=64), seed=seed)
        registry.publish(module, name, info, answer_list=ANSWERS)
    for seed, name in enumerate(RETRIEVAL_SETS, start=3):
        module = random_adapter(backbone, UniAdapterConfig.for_task("retrieval", bottleneck=64), seed=seed)
        registry.publish(module, name, info)





def server_env(args: argparse.Namespace, data_root: Path, port: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "UNIADAPTER_BACKBONE": args.backbone, "UNIADAPTER_PORT": str(port), "UNIADAPTER_HOST": HOST,
        "UNIADAPTER_DATA_ROOT": str(data_root), "UNIADAPTER_DEVICE": args.device, "UNIADAPTER_DTYPE": args.dtype,
        "UNIADAPTER_MAX_WAIT_MS": str(args.max_wait_ms), "UNIADAPTER_MAX_BATCH_SIZE": str(args.max_batch_size),
        "UNIADAPTER_MAX_QUEUE": str(args.max_queue), "UNIADAPTER_LOG_LEVEL": args.server_log_level,
        "PYTHONUNBUFFERED": "1",
    })
    if args.server_threads > 0:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.server_threads)
    return env











@dataclass
class Server:
    url: str
    pid: int
    ready: dict[str, object]


@contextmanager
def running_server(args: argparse.Namespace, data_root: Path) -> Iterator[Server]:
    """Start the service, wait for /readyz, yield it; always stop it (SIGTERM, then kill)."""
    port = free_port()
    log_path = data_root / "server.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "uniadapter_serve.service.cli", "serve"],
                                env=server_env(args, data_root, port), stdout=log_file, stderr=subprocess.STDOUT)
        try:
            base_url = f"http://{HOST}:{port}"
            yield Server(base_url, proc.pid, wait_ready(proc, base_url, log_path))
        finally:
            stop_process(proc)


# -- CPU accounting ------------------------------------------------------------------------------

def machine_busy_seconds() -> float | None:
    """CPU seconds all processes used since boot (Linux /proc/stat, minus idle and iowait), or None."""
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        return (sum(values) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def process_cpu_seconds(pid: int) -> float | None:
    """utime + stime of one process (Linux /proc/PID/stat), or None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


@dataclass
class CpuSnapshot:
    machine: float | None
    server: float | None
    client: float

    @classmethod
    def take(cls, server_pid: int) -> CpuSnapshot:
        return cls(machine_busy_seconds(), process_cpu_seconds(server_pid), own_cpu_seconds())


@dataclass
class CpuShare:
    """Share of the machine's cores used by the server, this load generator and everything else."""

    server: float | None
    client: float
    other: float | None

    @classmethod
    def between(cls, a: CpuSnapshot, b: CpuSnapshot, wall: float) -> CpuShare:
        cores = float(os.cpu_count() or 1) * max(wall, 1e-9)
        server = None if a.server is None or b.server is None else (b.server - a.server) / cores
        client = (b.client - a.client) / cores
        other = None
        if a.machine is not None and b.machine is not None and server is not None:
            other = max(0.0, (b.machine - a.machine) / cores - server - client)
        return cls(server, client, other)

    def describe(self) -> str:
        def pct(x: float | None) -> str:
            return "n/a" if x is None else f"{x:.0%}"

        return f"{pct(self.server):>5} {pct(self.client):>5} {pct(self.other):>5}"


# -- metrics -------------------------------------------------------------------------------------

def parse_metrics(text: str) -> dict[MetricKey, float]:
    values: dict[MetricKey, float] = {}
    for line in text.splitlines():
        m = METRIC_RE.match(line.strip())
        if m is None or line.startswith("#"):
            continue
        labels = tuple(sorted(LABEL_RE.findall(m.group(2) or "")))
        try:
            values[(m.group(1), labels)] = float(m.group(3))
        except ValueError:
            continue
    return values


async def scrape(client: httpx.AsyncClient) -> dict[MetricKey, float]:
    r = await client.get("/metrics")
    r.raise_for_status()
    return parse_metrics(r.text)


def per_stage(values: dict[MetricKey, float], name: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for (metric, labels), v in values.items():
        stage = dict(labels).get("stage")
        if metric == name and stage is not None:
            out[stage] = out.get(stage, 0.0) + v
    return out


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items()}


@dataclass
class BatchStats:
    mean_size: dict[str, float]
    batches: dict[str, int]
    mixed: int

    @classmethod
    def between(cls, before: dict[MetricKey, float], after: dict[MetricKey, float]) -> BatchStats:
        sums = delta(per_stage(after, "uniadapter_batch_size_sum"), per_stage(before, "uniadapter_batch_size_sum"))
        counts = delta(per_stage(after, "uniadapter_batch_size_count"),
                       per_stage(before, "uniadapter_batch_size_count"))
        mixed = delta(per_stage(after, "uniadapter_mixed_batches_total"),
                      per_stage(before, "uniadapter_mixed_batches_total"))
        mean = {s: sums.get(s, 0.0) / n for s, n in counts.items() if n > 0}
        return cls(mean, {s: int(n) for s, n in counts.items() if n > 0}, int(sum(mixed.values())))

    def describe(self) -> str:
        order = [s for s in STAGES if s in self.mean_size] + sorted(set(self.mean_size) - set(STAGES))
        return " ".join(f"{s}={self.mean_size[s]:.1f}" for s in order) or "-"


# -- load ----------------------------------------------------------------------------------------

@dataclass
class ScenarioResult:
    route: str
    concurrency: int
    requested: int
    latencies: list[float] = field(default_factory=list)
    """Seconds, successful (200) requests only."""
    errors: Counter[str] = field(default_factory=Counter)
    elapsed: float = 0.0
    batches: BatchStats | None = None
    cpu: CpuShare | None = None

    @property
    def done(self) -> int:
        return len(self.latencies) + sum(self.errors.values())

    @property
    def throughput(self) -> float:
        return len(self.latencies) / self.elapsed if self.elapsed > 0 else 0.0





async def one_request(client: httpx.AsyncClient, route: str, body: bytes, result: ScenarioResult) -> None:
    started = time.perf_counter()
    try:
        r = await client.post(route, content=body, headers={"content-type": "application/json"})
    except httpx.HTTPError as e:
        result.errors[type(e).__name__] += 1
        return
    if r.status_code == 200:
        result.latencies.append(time.perf_counter() - started)
    else:
        result.errors[f"HTTP {r.status_code}"] += 1


async def run_load(client: httpx.AsyncClient, route: str, bodies: Sequence[bytes], concurrency: int,
                   requests: int, time_limit: float) -> ScenarioResult:
    """`concurrency` workers send back to back until `requests` were sent or `time_limit` passed."""
    result = ScenarioResult(route, concurrency, requests)
    issued = 0
    deadline = time.monotonic() + time_limit

    async def worker() -> None:
        nonlocal issued
        while issued < requests and time.monotonic() < deadline:
            body = bodies[issued % len(bodies)]
            issued += 1
            await one_request(client, route, body, result)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    result.elapsed = time.perf_counter() - started
    return result


async def scenario(client: httpx.AsyncClient, server_pid: int, route: str, bodies: Sequence[bytes],
                   concurrency: int, requests: int, time_limit: float) -> ScenarioResult:
    before = await scrape(client)
    cpu_before = CpuSnapshot.take(server_pid)
    result = await run_load(client, route, bodies, concurrency, requests, time_limit)
    result.cpu = CpuShare.between(cpu_before, CpuSnapshot.take(server_pid), result.elapsed)
    result.batches = BatchStats.between(before, await scrape(client))
    return result


@dataclass
class RoutePlan:
    route: str
    bodies: list[bytes]
    requests: int
    sequential_requests: int


async def run_all(server: Server, plans: Sequence[RoutePlan], args: argparse.Namespace) -> list[ScenarioResult]:
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    results: list[ScenarioResult] = []
    async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=REQUEST_TIMEOUT_S) as client:
        for plan in plans:
            warm = await run_load(client, plan.route, plan.bodies, 1, args.warmup, WARMUP_TIME_LIMIT_S)
            if warm.errors:
                print(f"  warmup {plan.route}: errors {dict(warm.errors)}")
            for c in args.concurrency:
                n = plan.sequential_requests if c == 1 else plan.requests
                result = await scenario(client, server.pid, plan.route, plan.bodies, c, n, args.time_limit)
                print(f"  done {plan.route:<9} c={c:<3} {result.done:>4} requests in {result.elapsed:6.1f} s",
                      flush=True)
                results.append(result)
    return results


# -- printing ------------------------------------------------------------------------------------

def print_header(args: argparse.Namespace, ready: dict[str, object]) -> None:
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print("service load: throughput and latency under concurrent clients vs one at a time")
    print(f"  torch {torch.__version__} (server reports {ready.get('torch')}), python {platform.python_version()}, "
          f"cpu_count {os.cpu_count()} (usable {affinity}), torch threads here {torch.get_num_threads()}")
    print(f"  backbone {args.backbone} on cpu, max_wait_ms {args.max_wait_ms}, max_batch_size {args.max_batch_size}, "
          f"max_queue {args.max_queue}, server log level {args.server_log_level}, "
          f"server torch threads {args.server_threads or 'default'}")
    print(f"  requests per scenario: /vqa {args.vqa_requests}, /retrieve {args.retrieve_requests} "
          f"(one at a time: {args.sequential_vqa_requests} / {args.sequential_retrieve_requests}), "
          f"warmup {args.warmup} per route, time limit {args.time_limit:.0f} s per scenario")
    print("  /vqa: one 64x64 PNG + question, rank mode; /retrieve: text query + 4 inline 64x64 PNGs, top_k 2;")
    print("  requests alternate between two adapter sets per task, so batches may mix sets.")
    print("  note: the load generator shares the machine's CPU cores with the server, which depresses the ratio.")


def print_table(results: Sequence[ScenarioResult]) -> None:
    print(f"\n{'route':<10}{'conc':>5}{'requests':>9}{'errors':>7}{'req/s':>9}{'p50 ms':>9}{'p95 ms':>9}"
          f"{'mixed':>7} {'srv':>5} {'gen':>5} {'other':>5}   mean batch size per stage")
    for r in results:
        b = r.batches
        print(f"{r.route:<10}{r.concurrency:>5}{r.done:>9}{sum(r.errors.values()):>7}{r.throughput:>9.1f}"
              f"{percentile(r.latencies, 50) * 1e3:>9.1f}{percentile(r.latencies, 95) * 1e3:>9.1f}"
              f"{(b.mixed if b else 0):>7} {r.cpu.describe() if r.cpu else '-':>17}   {b.describe() if b else '-'}")
    print("  mixed: batches carrying more than one adapter set; srv / gen / other: share of all CPU cores used by "
          "the server,\n  this load generator and other processes during the scenario; mean batch size from "
          "/metrics deltas.")
    for r in results:
        if r.errors:
            print(f"  errors {r.route} c={r.concurrency}: {dict(r.errors)}")
        if r.cpu is not None and r.cpu.other is not None and r.cpu.other > FOREIGN_CPU_WARN:
            print(f"  warning {r.route} c={r.concurrency}: other processes used {r.cpu.other:.0%} of the CPUs; "
                  "its numbers are skewed")
        if r.done < r.requested:
            print(f"  note {r.route} c={r.concurrency}: stopped by the time limit after {r.done}/{r.requested}")


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def print_ratios(results: Sequence[ScenarioResult]) -> None:
    print(f"\nthroughput ratio: {RATIO_CONCURRENCY} clients / one at a time (same server)")
    for route in dict.fromkeys(r.route for r in results):
        base = next((r for r in results if r.route == route and r.concurrency == 1), None)
        top = next((r for r in results if r.route == route and r.concurrency == RATIO_CONCURRENCY), None)
        if base is None or top is None or base.throughput <= 0:
            print(f"  {route:<10} n/a (needs concurrency 1 and {RATIO_CONCURRENCY})")
            continue
        ratio = top.throughput / base.throughput
        print(f"  {route:<10} {top.throughput:7.1f} / {base.throughput:6.1f} req/s = {ratio:5.2f}x   "
              f"target CPU >= {RATIO_TARGET_CPU:g}x {verdict(ratio >= RATIO_TARGET_CPU):<7} "
              f"DESIGN >= {RATIO_TARGET_DESIGN:g}x {verdict(ratio >= RATIO_TARGET_DESIGN)}")


# -- main ----------------------------------------------------------------------------------------

def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="demo", choices=["demo", "blip-tiny", "blip-base"])
    p.add_argument("--device", default="cpu", help="the server's UNIADAPTER_DEVICE (cpu, cuda, cuda:N)")
    p.add_argument("--dtype", default="auto", help="the server's UNIADAPTER_DTYPE (auto, float16, bfloat16, ...)")
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--max-queue", type=int, default=4096)
    p.add_argument("--vqa-requests", type=int, default=400, help="per concurrent scenario")
    p.add_argument("--retrieve-requests", type=int, default=300, help="per concurrent scenario")
    p.add_argument("--sequential-vqa-requests", type=int, default=150, help="one-at-a-time baseline")
    p.add_argument("--sequential-retrieve-requests", type=int, default=150, help="one-at-a-time baseline")
    p.add_argument("--warmup", type=int, default=10, help="requests per route before timing")
    p.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=list(CONCURRENCY),
                   help="comma-separated client counts; 1 is the baseline (default 1,8,32)")
    p.add_argument("--time-limit", type=float, default=30.0, help="seconds per scenario at most")
    p.add_argument("--server-threads", type=int, default=0,
                   help="OMP_NUM_THREADS for the server (torch intra-op threads); 0: torch's default")
    p.add_argument("--server-log-level", default="warning",
                   help="server log level (warning: no per-request access log lines)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if 1 not in args.concurrency:
        args.concurrency = [1, *args.concurrency]
    started = time.perf_counter()
    # "route#label": the fragment only names the scenario in the table; it is never sent
    plans = [RoutePlan("/vqa", vqa_bodies(), args.vqa_requests, args.sequential_vqa_requests),
             RoutePlan("/retrieve", retrieve_bodies(), args.retrieve_requests, args.sequential_retrieve_requests),
             RoutePlan("/retrieve#collection", collection_bodies(), args.retrieve_requests,
                       args.sequential_retrieve_requests)]
    with tempfile.TemporaryDirectory(prefix="uniadapter-load-") as tmp:
        data_root = Path(tmp)
        publish_sets(data_root, args.backbone)
        with running_server(args, data_root) as server:
            print_header(args, server.ready)
            print(f"  server ready at {server.url} after {time.perf_counter() - started:.1f} s")
            asyncio.run(fill_collection(server.url))
            results = asyncio.run(run_all(server, plans, args))
    print_table(results)
    print_ratios(results)
    print(f"\nwall time {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
