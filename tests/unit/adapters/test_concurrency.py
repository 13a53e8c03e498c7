"""Threads hammer four sets while new versions are published and sets are evicted: every result
equals the single-sample reference of the version it reports, and only documented errors occur."""

from __future__ import annotations

import random
import threading

import torch

from uniadapter_serve.adapters.format import BackboneInfo, load_adapter_set
from uniadapter_serve.adapters.manager import AdapterManager
from uniadapter_serve.errors import AdapterCapacityError, AdapterInUseError
from uniadapter_serve.model.routing import Routing
from uniadapter_serve.model.testing import random_adapter, random_batch
from uniadapter_serve.model.uniadapter import UniAdapterConfig

DOCUMENTED = (AdapterCapacityError, AdapterInUseError)


def test_hammer_with_publishing_and_eviction(backbone, registry):
    size = sum(t.numel() * t.element_size()
               for t in load_adapter_set(registry.resolve("a").path, backbone).module.state_dict().values())
    manager = AdapterManager(backbone, registry, device_budget_bytes=int(2.5 * size), cpu_budget_bytes=size,
                             wait_timeout_s=10)
    batch = random_batch(backbone, 1, seed=90)
    results: list[tuple[str, torch.Tensor]] = []
    failures: list[BaseException] = []
    stop = threading.Event()
    lock = threading.Lock()

    def request(name: str) -> None:
        with manager.lease(name) as held, torch.no_grad():
            r = Routing.single(held.module, 1)
            image = backbone.encode_image(batch.pixel_values, r)
            itm = backbone.itm_logits(batch.input_ids, batch.attention_mask, image, r)
            with lock:
                results.append((held.ref, itm))

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(30):
            try:
                request(rng.choice("abcd"))
            except DOCUMENTED:
                pass
            except BaseException as e:
                failures.append(e)
                return

    def publisher() -> None:
        info = BackboneInfo.of(backbone)
        for i in range(6):
            name = "ab"[i % 2]
            module = random_adapter(backbone, UniAdapterConfig.for_task("retrieval", bottleneck=8, kv_rank=4),
                                    seed=200 + i)
            registry.publish(module, name, info)

    def evictor() -> None:
        rng = random.Random(5)
        while not stop.is_set():
            try:
                manager.unload(rng.choice("abcd"))
            except DOCUMENTED:
                pass
            except BaseException as e:
                failures.append(e)
                return
            stop.wait(0.01)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    side = [threading.Thread(target=publisher), threading.Thread(target=evictor)]
    for t in threads + side:
        t.start()
    for t in threads:
        t.join(timeout=120)
    stop.set()
    for t in side:
        t.join(timeout=60)
    assert not failures, failures
    assert len(results) >= 100
    versions_seen = {ref for ref, _ in results}
    assert len({ref.split("@")[0] for ref in versions_seen}) == 4
    assert len(versions_seen) > 4  # published versions were picked up while running
    references: dict[str, torch.Tensor] = {}
    for ref, itm in results:
        if ref not in references:
            module = load_adapter_set(registry.resolve(ref).path, backbone).module
            r = Routing.single(module, 1)
            with torch.no_grad():
                image = backbone.encode_image(batch.pixel_values, r)
                references[ref] = backbone.itm_logits(batch.input_ids, batch.attention_mask, image, r)
        assert (itm - references[ref]).abs().max() <= 1e-5, ref
    assert manager.stats["device_evictions"] + manager.stats["device_unloads"] > 0
