"""This service against the server a user would write instead: FastAPI around transformers'
`BlipForQuestionAnswering` (one model, each request alone in FastAPI's thread pool, `model.generate`), on
the same weights and the same torch thread count.

Both servers run as subprocesses on 127.0.0.1. For each thread count (`--threads 1,2`) both are started with
that many torch intra-op threads, then driven with `POST /vqa` (generate mode, greedy) by C concurrent clients
(`--clients 1,4,32`), in interleaved rounds whose order rotates (machine drift falls on both alike): each
round gives every variant `--seconds` of back-to-back requests. Variants: the plain server in `--dtype` (on a CPU
by default float32: transformers loads the checkpoint's dtype), the plain server in bfloat16
(`from_pretrained(..., dtype=torch.bfloat16)`, the `torch_dtype` of older transformers; `--no-bf16-peer` drops
it, and it is not run twice where `--dtype bfloat16`), this service on the bare backbone, and (on the demo model)
this service with its VQA set (`--split-peer`: also the service with SPLIT_BATCHES=false; `--fp32-peer`: also the
service with DTYPE=float32, and the --dtype service's throughput over it; `--processes N`: also the
service with PROCESSES=N, N server processes on one port splitting the threads, the kernel sharing the
connections out among them). The load generator is
this process: one keep-alive connection per client through `benchkit.RawHttp`, each request's bytes built once
(`--client httpx` drives through httpx instead, which spends ~1 ms of this process's CPU per request: on a 2-core
machine that CPU is taken from the servers, and its share is printed beside theirs). Printed per thread
count and C: throughput, p50 latency and the server's CPU use (a share of the machine) of each, the paired
ratios of each service variant to each plain one and of plain-bf16 to plain (median over rounds, with the
spread), the dtype the service chose (`/readyz?verbose=true`: under DTYPE=auto on a CPU, timed at start), and at
the end each server's resident memory (RSS now and peak).

Both decode their answers greedily with a KV cache; the answers are compared too (the plain server keeps
transformers' [CLS] at the question's start where BLIP puts [ENC], so they may differ on real weights).

    .venv/bin/python bench/peer.py                              # the demo model
    .venv/bin/python bench/peer.py --backbone blip-base --clients 1,4 --seconds 8   # random BLIP-base weights
    .venv/bin/python bench/peer.py --device cuda --dtype bfloat16 --backbone blip-base   # the GPU machine

`plain` runs the plain server itself (what the benchmark starts): `python bench/peer.py plain --folder F --port P`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from benchkit import HOST, RawHttp, free_port, half_iqr, percentile, stop_process, wait_ready
from PIL import Image, ImageDraw
from pydantic import BaseModel

QUESTION = "what colour is the circle?"


# -- the plain server ------------------------------------------------------------------------------------------

class PlainBody(BaseModel):
    image: str
    question: str
    max_answer_length: int = 10


def plain_server(folder: Path, port: int, threads: int, device: str, dtype: str) -> None:
    import torch
    import uvicorn
    from fastapi import FastAPI
    from transformers import AutoTokenizer, BlipForQuestionAnswering, BlipImageProcessorPil

    torch.set_num_threads(threads)
    torch_dtype = {"auto": None, "float32": torch.float32, "float16": torch.float16,
                   "bfloat16": torch.bfloat16}[dtype]
    model = BlipForQuestionAnswering.from_pretrained(folder, dtype=torch_dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    size = model.config.vision_config.image_size
    processor = BlipImageProcessorPil(size={"height": size, "width": size})
    app = FastAPI()

    @app.get("/readyz")
    def ready() -> dict[str, str]:
        return {"status": "ready"}

    @app.post("/vqa")
    def vqa(body: PlainBody) -> dict[str, Any]:
        image = Image.open(io.BytesIO(base64.b64decode(body.image))).convert("RGB")
        pixels = processor(images=image, return_tensors="pt")["pixel_values"].to(device, model.dtype)
        text = tokenizer(body.question, return_tensors="pt").to(device)
        with torch.inference_mode():
            out = model.generate(pixel_values=pixels, input_ids=text["input_ids"],
                                 attention_mask=text["attention_mask"], max_new_tokens=body.max_answer_length)
        return {"answer": tokenizer.decode(out[0, 1:], skip_special_tokens=True)}  # [DEC] first

    uvicorn.run(app, host=HOST, port=port, log_level="warning")


# -- starting both ------------------------------------------------------------------------------------------------

@dataclass
class Server:
    name: str
    url: str
    pid: int


def thread_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"})
    return env


@contextmanager
def started(name: str, argv: list[str], env: dict[str, str], port: int, work: Path):
    log_path = work / f"{name}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            url = f"http://{HOST}:{port}"
            wait_ready(proc, url, log_path)
            yield Server(name, url, proc.pid)
        finally:
            stop_process(proc)


def backbone_folder(args: argparse.Namespace, work: Path) -> Path:
    """The weights both servers load: the shipped demo model, or random BLIP-base weights in a folder."""
    from uniadapter_serve.model.demo.shipped import DEMO_ROOT

    demo = Path(DEMO_ROOT) / "backbone"
    if args.backbone == "demo":
        return demo
    import shutil

    import torch
    from transformers import BlipForQuestionAnswering

    from uniadapter_serve.model.loading import load_config

    folder = work / args.backbone
    torch.manual_seed(0)
    model = BlipForQuestionAnswering(load_config(args.backbone))  # random weights; no download here
    model.save_pretrained(folder)
    for f in ("tokenizer.json", "tokenizer_config.json", "answer_list.json"):
        shutil.copy(demo / f, folder / f)  # the demo's small vocabulary: its ids fit any BLIP vocabulary
    return folder


# -- load --------------------------------------------------------------------------------------------------------

def scene(size: int = 256) -> str:
    img = Image.new("RGB", (size, size), (30, 30, 30))
    ImageDraw.Draw(img).ellipse((size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill=(220, 40, 40))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return base64.b64encode(buf.getvalue()).decode()


@dataclass
class Sample:
    throughput: float
    latencies: list[float]
    errors: int
    answers: set[str]
    cpu: float = 0.0
    """the server process's CPU time over the run, as a share of the machine (every core busy = 1.0)"""
    load_cpu: float = 0.0
    """the load generator's (this process's) CPU time over the run, as a share of the machine"""


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (and its threads) from /proc, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def drive(url: str, body: dict[str, Any], clients: int, seconds: float, pids: int | Sequence[int] = (),
                client: str = "raw") -> Sample:
    """`clients` back-to-back `POST /vqa` loops for `seconds`: each its own keep-alive connection through RawHttp
    (the request's bytes built once), or through one httpx.AsyncClient (`client="httpx"`, ~1 ms of this process's
    CPU per request, taken from the servers on a small machine). The CPU figure sums the processes `pids`."""
    pids = [pids] if isinstance(pids, int) else list(pids)
    latencies: list[float] = []
    answers: set[str] = set()
    errors = 0
    host, port = url.removeprefix("http://").rsplit(":", 1)
    payload = json.dumps(body).encode()
    request = RawHttp.request(host, int(port), "/vqa", payload)
    end = time.monotonic() + seconds
    pool = httpx.AsyncClient(base_url=url, timeout=120.0, limits=httpx.Limits(max_connections=clients)) \
        if client == "httpx" else None

    async def post(conn: RawHttp | None) -> tuple[int, bytes]:
        if pool is not None:
            r = await pool.post("/vqa", content=payload, headers={"content-type": "application/json"})
            return r.status_code, r.content
        assert conn is not None
        return await conn.send(request)

    async def one_client() -> None:
        nonlocal errors
        conn = RawHttp(host, int(port)) if pool is None else None
        try:
            while time.monotonic() < end:
                t0 = time.monotonic()
                try:
                    status, content = await post(conn)
                except (OSError, asyncio.IncompleteReadError, httpx.TransportError):
                    errors += 1
                    if conn is not None:
                        await conn.close()
                    continue
                if status != 200:
                    errors += 1
                    continue
                latencies.append(time.monotonic() - t0)
                answers.add(json.loads(content)["answer"])
        finally:
            if conn is not None:
                await conn.close()

    started_at, own_at = time.monotonic(), time.process_time()
    cpu_at = sum(cpu_seconds(p) for p in pids)
    try:
        await asyncio.gather(*(one_client() for _ in range(clients)))
    finally:
        if pool is not None:
            await pool.aclose()
    elapsed = time.monotonic() - started_at
    machine = elapsed * (os.cpu_count() or 1)
    cpu = (sum(cpu_seconds(p) for p in pids) - cpu_at) / machine
    return Sample(len(latencies) / elapsed, latencies, errors, answers, cpu, (time.process_time() - own_at) / machine)


def every_process_ready(url: str, supervisor: int, processes: int, timeout: float = 300.0) -> list[int]:
    """The pids of a PROCESSES group once each has answered a fresh connection (the supervisor returns from
    `started` when the first child listens; the others may still be loading)."""
    deadline = time.monotonic() + timeout
    seen: set[int] = set()
    while True:
        children = {int(p) for p in Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()}
        seen.add(int(httpx.get(f"{url}/readyz", params={"verbose": "true"}, timeout=30)
                      .json()["details"]["process"]["pid"]))
        if len(children) == processes and seen >= children:
            return sorted(children)
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {sorted(seen)} of {sorted(children)} answered in {timeout:.0f} s")


def rss_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) in MB from /proc."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                  if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def ratio_line(label: str, ours: list[float], plain: list[float], higher_is_better: bool) -> str:
    ratios = [a / b for a, b in zip(ours, plain, strict=True) if b > 0]
    if not ratios:
        return f"  {label}: n/a"
    median = statistics.median(ratios)
    return f"  {label}: {median:.2f}x ± {half_iqr(ratios):.2f} ({'higher' if higher_is_better else 'lower'} is better)"


def run_threads(args: argparse.Namespace, folder: Path, threads: int, work: Path) -> list[str]:
    lines = [f"\n## torch threads = {threads}"]
    with ExitStack() as stack:
        port_ours, port_plain = free_port(), free_port()
        env = thread_env(threads)
        ours_env = env | {
            "UNIADAPTER_BACKBONE": "demo" if args.backbone == "demo" else str(folder),
            "UNIADAPTER_PORT": str(port_ours), "UNIADAPTER_HOST": HOST,
            "UNIADAPTER_DATA_ROOT": str(work / f"data-{threads}"), "UNIADAPTER_DEVICE": args.device,
            "UNIADAPTER_DTYPE": args.dtype, "UNIADAPTER_TORCH_THREADS": str(threads),
            "UNIADAPTER_MAX_WAIT_MS": str(args.max_wait_ms), "UNIADAPTER_LOG_LEVEL": "warning",
            "UNIADAPTER_MAX_QUEUE": "4096",
        }
        serve = [sys.executable, "-m", "uniadapter_serve.service.cli", "serve"]
        ours = stack.enter_context(started(f"ours-{threads}", serve, ours_env, port_ours, work))
        workers = None
        if args.workers > 1:  # the same cores as more model threads (a batch alone gets every thread)
            port_workers = free_port()
            workers_env = ours_env | {
                "UNIADAPTER_PORT": str(port_workers), "UNIADAPTER_DATA_ROOT": str(work / f"data-w-{threads}"),
                "UNIADAPTER_MODEL_WORKERS": str(args.workers)}
            workers = stack.enter_context(started(f"ours-{args.workers}w-{threads}", serve, workers_env,
                                                  port_workers, work))
        group: tuple[Server, list[int]] | None = None
        if args.processes > 1:  # PROCESSES=N on one port (SO_REUSEPORT), the same cores split among them
            port_group = free_port()
            supervisor = stack.enter_context(started(f"ours-{args.processes}p-{threads}", serve, ours_env | {
                "UNIADAPTER_PORT": str(port_group), "UNIADAPTER_DATA_ROOT": str(work / f"data-p-{threads}"),
                "UNIADAPTER_PROCESSES": str(args.processes),
                "UNIADAPTER_TORCH_THREADS": str(max(1, threads // args.processes))}, port_group, work))
            group = supervisor, every_process_ready(supervisor.url, supervisor.pid, args.processes)
        nosplit = None
        if args.split_peer:  # the same service with a batch never shared out among idle workers
            port_nosplit = free_port()
            nosplit = stack.enter_context(started(f"ours-nosplit-{threads}", serve, ours_env | {
                "UNIADAPTER_PORT": str(port_nosplit), "UNIADAPTER_DATA_ROOT": str(work / f"data-ns-{threads}"),
                "UNIADAPTER_SPLIT_BATCHES": "false"}, port_nosplit, work))
        fp32 = None
        if args.fp32_peer:  # the same service with DTYPE=float32: what DTYPE=auto's choice buys, side by side
            port_fp32 = free_port()
            fp32 = stack.enter_context(started(f"ours-fp32-{threads}", serve, ours_env | {
                "UNIADAPTER_PORT": str(port_fp32), "UNIADAPTER_DATA_ROOT": str(work / f"data-f-{threads}"),
                "UNIADAPTER_DTYPE": "float32"}, port_fp32, work))
        peer_dtypes = {"plain": args.dtype}
        if args.bf16_peer and args.dtype != "bfloat16":
            peer_dtypes["plain-bf16"] = "bfloat16"
        peers: dict[str, Server] = {}
        for name, dtype in peer_dtypes.items():
            port = port_plain if name == "plain" else free_port()
            peers[name] = stack.enter_context(started(
                f"{name}-{threads}", [sys.executable, __file__, "plain", "--folder", str(folder), "--port",
                                      str(port), "--threads", str(threads), "--device", args.device,
                                      "--dtype", dtype], env, port, work))
        choice = httpx.get(f"{ours.url}/readyz", params={"verbose": "true"}, timeout=30).json()
        lines.append(f"  service dtype: {choice['details']['backbone'].get('dtype_choice')}")
        body = {"image": scene(), "question": QUESTION, "max_answer_length": args.max_answer_length}
        variants: dict[str, tuple[str, dict[str, Any]]] = {
            name: (peer.url, body) for name, peer in peers.items()}
        pids: dict[str, int | list[int]] = {name: peer.pid for name, peer in peers.items()}
        variants["ours-bare"] = (ours.url, body | {"mode": "generate", "adapter": "none"})
        pids["ours-bare"] = ours.pid
        if nosplit is not None:
            variants["ours-nosplit"] = (nosplit.url, body | {"mode": "generate", "adapter": "none"})
            pids["ours-nosplit"] = nosplit.pid
        if args.backbone == "demo":
            variants["ours-set"] = (ours.url, body | {"mode": "generate", "adapter": "demo-vqa"})
            pids["ours-set"] = ours.pid
        ours_adapter = "demo-vqa" if args.backbone == "demo" else "none"  # the fp32 variant: as ours-set / ours-bare
        if fp32 is not None:
            variants["ours-fp32"] = (fp32.url, body | {"mode": "generate", "adapter": ours_adapter})
            pids["ours-fp32"] = fp32.pid
        if group is not None:
            name = f"ours-{args.processes}p-set" if args.backbone == "demo" else f"ours-{args.processes}p"
            variants[name] = (group[0].url,
                              body | {"mode": "generate", "adapter": "demo-vqa" if args.backbone == "demo" else "none"})
            pids[name] = group[1]
        if workers is not None:
            variants[f"ours-{args.workers}w"] = (workers.url, body | {"mode": "generate", "adapter": "none"})
            pids[f"ours-{args.workers}w"] = workers.pid
        for url, b in variants.values():  # warm-up: first calls, lazy loads
            asyncio.run(drive(url, b, 1, args.warmup_seconds, client=args.client))
        for clients in args.clients:
            results: dict[str, list[Sample]] = {name: [] for name in variants}
            names = list(variants)
            for r in range(args.rounds):
                for k in range(len(names)):
                    name = names[(k + r) % len(names)]
                    url, b = variants[name]
                    results[name].append(asyncio.run(drive(url, b, clients, args.seconds, pids[name], args.client)))
            lines.append(f"\n### {clients} client(s)")
            for name, samples in results.items():
                tput = [s.throughput for s in samples]
                lat = [x for s in samples for x in s.latencies]
                errs = sum(s.errors for s in samples)
                answers = sorted(set().union(*(s.answers for s in samples)))
                p50 = percentile(lat, 50) * 1000
                cpu = statistics.median(s.cpu for s in samples)
                load = statistics.median(s.load_cpu for s in samples)
                lines.append(f"  {name:10s} {statistics.median(tput):8.1f} req/s   p50 {p50:7.1f}"
                             f" ms   p95 {percentile(lat, 95) * 1000:7.1f} ms   CPU {cpu:.2f} of the machine"
                             f" (load generator {load:.2f})   "
                             f"errors {errs}   answers {answers[:3]}")
            for peer in peers:
                peer_t = [s.throughput for s in results[peer]]
                peer_p50 = [percentile(s.latencies, 50) for s in results[peer]]
                for name in names:
                    if name in peers and (name == peer or peer != "plain"):
                        continue  # each service variant against each peer, and plain-bf16 against plain
                    lines.append(ratio_line(f"{name} / {peer} throughput", [s.throughput for s in results[name]],
                                            peer_t, True))
                    lines.append(ratio_line(f"{name} / {peer} p50 latency",
                                            [percentile(s.latencies, 50) for s in results[name]], peer_p50, False))
            if fp32 is not None:
                same = "ours-set" if args.backbone == "demo" else "ours-bare"
                lines.append(ratio_line(f"{same} (DTYPE={args.dtype}) / ours-fp32 throughput",
                                        [s.throughput for s in results[same]],
                                        [s.throughput for s in results["ours-fp32"]], True))
        for server in (ours, *peers.values(), *([workers] if workers is not None else []),
                       *([nosplit] if nosplit is not None else []), *([fp32] if fp32 is not None else [])):
            now, peak = rss_mb(server.pid)
            lines.append(f"  RSS {server.name}: {now:.0f} MB (peak {peak:.0f} MB)")
        if group is not None:  # the supervisor holds no model: its children's sum
            sizes = [rss_mb(pid) for pid in group[1]]
            lines.append(f"  RSS {group[0].name} ({len(sizes)} processes): {sum(n for n, _ in sizes):.0f} MB "
                         f"(peak {sum(k for _, k in sizes):.0f} MB)")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command")
    plain = sub.add_parser("plain", help="run the plain transformers server")
    plain.add_argument("--folder", type=Path, required=True)
    plain.add_argument("--port", type=int, required=True)
    plain.add_argument("--threads", type=int, default=1)
    plain.add_argument("--device", default="cpu")
    plain.add_argument("--dtype", default="auto")
    p.add_argument("--backbone", default="demo", choices=["demo", "blip-base"])
    p.add_argument("--threads", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2])
    p.add_argument("--clients", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 32])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=5.0, help="per variant per round")
    p.add_argument("--warmup-seconds", type=float, default=2.0)
    p.add_argument("--max-answer-length", type=int, default=10)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--workers", type=int, default=1,
                   help="also run the service with this many model workers (MODEL_WORKERS) sharing the threads")
    p.add_argument("--processes", type=int, default=1,
                   help="also run the service as this many server processes (each its own model), clients shared out")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto", help="the service's DTYPE and the plain peer's dtype")
    p.add_argument("--split-peer", action="store_true",
                   help="also run the service with SPLIT_BATCHES=false (a batch never shared out among idle workers)")
    p.add_argument("--fp32-peer", action="store_true",
                   help="also run the service with DTYPE=float32 beside the --dtype one (what the choice buys)")
    p.add_argument("--client", choices=["raw", "httpx"], default="raw",
                   help="the load generator's HTTP client (raw: benchkit.RawHttp, pre-encoded requests)")
    p.add_argument("--no-bf16-peer", dest="bf16_peer", action="store_false",
                   help="leave out the plain server in bfloat16")
    args = p.parse_args()
    if args.command == "plain":
        plain_server(args.folder, args.port, args.threads, args.device, args.dtype)
        return
    print(f"# peer benchmark: {args.backbone}, device {args.device}, dtype {args.dtype}, {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory(prefix="peer-bench-") as tmp:
        work = Path(tmp)
        folder = backbone_folder(args, work)
        for threads in args.threads:
            for line in run_threads(args, folder, threads, work):
                print(line, flush=True)


if __name__ == "__main__":
    main()
