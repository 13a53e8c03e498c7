"""The service on Ray Serve, measured side by side on a local Ray cluster started here (demo model, CPU):

1. throughput of `/vqa` with 1 vs 2 model replicas (`--clients` clients, `--seconds` each; on 2 cores
   expect little: the replicas share them);
2. cold loads of adapter sets for a skewed mix of `--sets` sets over 2 replicas whose budget holds 2 sets
   each, with our affinity router, Serve's own multiplexed routing, and no routing by set (ratios);
3. the latency Ray adds: `/vqa` p50 at one client through the Ray app vs the in-process server.

    .venv/bin/python bench/ray_serve.py
    .venv/bin/python bench/ray_serve.py --seconds 10 --requests 400
"""

from __future__ import annotations

import argparse
import base64
import os
import random
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from benchkit import free_port
from support.media import image_bytes
from support.server import start_server

from uniadapter_serve.adapters.format import BackboneInfo, read_adapter_meta
from uniadapter_serve.adapters.registry import AdapterRegistry
from uniadapter_serve.model.demo.shipped import ANSWERS
from uniadapter_serve.model.loading import load_backbone
from uniadapter_serve.model.testing import random_adapter
from uniadapter_serve.model.uniadapter import UniAdapterConfig
from uniadapter_serve.service import demo

IMAGE = base64.b64encode(image_bytes()).decode()


def publish(root: Path, n: int) -> tuple[list[str], int]:
    backbone = load_backbone("demo")
    registry = AdapterRegistry(root / "adapters")
    names = [f"set-{i}" for i in range(n)]
    for i, name in enumerate(names):
        module = random_adapter(backbone, UniAdapterConfig.for_task("vqa", bottleneck=64, kv_rank=16), seed=i,
                                std=0.05)
        registry.publish(module, name, BackboneInfo.of(backbone), answer_list=ANSWERS)
    biggest = max(read_adapter_meta(demo.SETS_DIR / s / "v1").num_parameters for s in demo.DEMO_SETS.values())
    return names, 4 * max(biggest, registry.resolve(names[0]).num_parameters)


def deploy(root: Path, port: int, **settings: object) -> str:
    from ray import serve

    from uniadapter_serve.service.ray_app import build_app

    base = {"backbone": "demo", "data_root": str(root), "device": "cpu", "ray_model_cpus": 0.5,
            "ray_ingress_cpus": 0.5, "torch_threads": 1, "demo_content": False}
    serve.run(build_app({**base, **settings}), name="uniadapter", route_prefix="/")
    return f"http://127.0.0.1:{port}"


def ask(url: str, adapter: str | None = None) -> float:
    started = time.perf_counter()
    body = {"image": IMAGE, "question": "what colour is it?"} | ({"adapter": adapter} if adapter else {})
    r = httpx.post(f"{url}/vqa", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return time.perf_counter() - started


def throughput(url: str, clients: int, seconds: float) -> float:
    stop = time.monotonic() + seconds
    done = 0

    def loop() -> int:
        n = 0
        while time.monotonic() < stop:
            ask(url)
            n += 1
        return n

    with ThreadPoolExecutor(clients) as pool:
        done = sum(pool.map(lambda _: loop(), range(clients)))
    return done / seconds


def disk_loads(url: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith('uniadapter_adapter_events_total{event="disk_loads"}'):
            return float(line.split()[-1])
    return 0.0


def settled_loads(url: str, before: float) -> float:
    loads = disk_loads(url) - before
    for _ in range(10):  # replicas post statistics every 0.5 s
        time.sleep(1.0)
        now = disk_loads(url) - before
        if now == loads:
            break
        loads = now
    return loads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--sets", type=int, default=4, help="4 fit the 2 x 2 places; more thrash whatever routes")
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--sequential", type=int, default=200)
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray import serve

    with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp:
        root = Path(tmp)
        names, set_bytes = publish(root, args.sets)
        ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        try:
            print(f"\n== 1. /vqa throughput, {args.clients} clients, {args.seconds:g} s ==")
            rates = {}
            for replicas in (1, 2):
                url = deploy(root, port, ray_model_replicas=replicas)
                for _ in range(5):
                    ask(url)
                rates[replicas] = throughput(url, args.clients, args.seconds)
                print(f"{replicas} model replica(s): {rates[replicas]:.1f} req/s")
            print(f"2 / 1 replicas: {rates[2] / rates[1]:.2f}x (os.cpu_count() = {os.cpu_count()})")

            print(f"\n== 2. cold loads, {args.requests} requests over {args.sets} sets (Zipf), 2 replicas x 2 sets ==")
            weights = [1 / (i + 1) for i in range(len(names))]
            mix = random.Random(3).choices(names, weights=weights, k=args.requests)
            loads = {}
            for router in ("affinity", "serve", "none"):
                url = deploy(root, port, ray_model_replicas=2, ray_sets_per_replica=2, ray_router=router,
                             device_adapter_budget_mb=2.2 * set_bytes / 2**20, cpu_adapter_budget_mb=0)
                before = disk_loads(url)
                with ThreadPoolExecutor(8) as pool:
                    list(pool.map(ask, [url] * len(mix), mix))
                loads[router] = settled_loads(url, before)
                print(f"{router:>9}: {loads[router]:.0f} cold loads")
            print(f"affinity / serve: {loads['affinity'] / max(loads['serve'], 1):.2f}x, "
                  f"affinity / none: {loads['affinity'] / max(loads['none'], 1):.2f}x")

            print(f"\n== 3. one client, {args.sequential} sequential /vqa: the Ray hop ==")
            url = deploy(root, port, ray_model_replicas=1)
            for _ in range(5):
                ask(url)
            ray_p50 = statistics.median(ask(url) for _ in range(args.sequential))
        finally:
            serve.shutdown()
            ray.shutdown()
        local = start_server(root / "local", root, backbone="demo", demo_content="false", torch_threads=1,
                             adapters_root=root / "adapters")
        try:
            for _ in range(5):
                ask(local.url)
            local_p50 = statistics.median(ask(local.url) for _ in range(args.sequential))
        finally:
            local.stop()
        print(f"p50 Ray {ray_p50 * 1000:.1f} ms, in-process {local_p50 * 1000:.1f} ms: "
              f"Ray / in-process {ray_p50 / local_p50:.2f}x")


if __name__ == "__main__":
    main()
