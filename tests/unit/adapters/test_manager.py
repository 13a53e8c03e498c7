"""The two-tier LRU manager: the exact slot table after every operation, pins, leases, errors."""

from __future__ import annotations

import pytest
import torch

from uniadapter_serve.adapters.manager import AdapterManager
from uniadapter_serve.errors import (
    AdapterCapacityError,
    AdapterIncompatibleError,
    AdapterInUseError,
    AdapterNotFoundError,
    AdapterVersionNotFoundError,
    ConfigError,
)
from uniadapter_serve.model.loading import random_backbone
from uniadapter_serve.model.routing import Routing
from uniadapter_serve.model.testing import random_batch


@pytest.fixture
def size(backbone, registry):
    probe = AdapterManager(backbone, registry, device_budget_bytes=1 << 30, cpu_budget_bytes=0)
    probe.load("a")
    return probe.device_bytes()


@pytest.fixture
def manager(backbone, registry, size):
    """Room for exactly two sets on the device and two CPU copies; no waiting for room."""
    return AdapterManager(backbone, registry, device_budget_bytes=2 * size, cpu_budget_bytes=2 * size,
                          wait_timeout_s=0.0)


def table(manager):
    names = {m.ref: m.name for m in manager.registry.all()}
    return [(names[r["ref"]], r["tier"], r["pinned"]) for r in manager.table()]


def test_exact_slot_table_after_every_operation(manager):
    manager.load("a")
    assert table(manager) == [("a", "device", False), ("a", "cpu", False)]
    manager.load("b")
    assert table(manager) == [("a", "device", False), ("b", "device", False), ("a", "cpu", False),
                              ("b", "cpu", False)]
    with manager.lease("a"):  # touch: a becomes most recently used
        pass
    assert table(manager) == [("b", "device", False), ("a", "device", False), ("a", "cpu", False),
                              ("b", "cpu", False)]
    manager.load("c")  # evicts b (LRU) before loading; CPU tier drops its LRU copy (a)
    assert table(manager) == [("a", "device", False), ("c", "device", False), ("b", "cpu", False),
                              ("c", "cpu", False)]
    manager.pin("a")
    assert table(manager) == [("c", "device", False), ("a", "device", True), ("b", "cpu", False),
                              ("c", "cpu", False)]
    manager.load("b")  # c is the only candidate; b comes back from its CPU copy (touching it)
    assert table(manager) == [("a", "device", True), ("b", "device", False), ("c", "cpu", False),
                              ("b", "cpu", False)]
    assert manager.stats["cpu_hits"] == 1 and manager.stats["disk_loads"] == 3
    manager.pin("b")
    before = table(manager)
    with pytest.raises(AdapterCapacityError, match="pinned"):
        manager.load("c")
    assert table(manager) == before  # nothing changed
    manager.unpin("a")
    manager.load("c")
    assert table(manager) == [("b", "device", True), ("c", "device", False), ("b", "cpu", False),
                              ("c", "cpu", False)]
    with pytest.raises(AdapterInUseError, match="pinned"):
        manager.unload("b")
    manager.unpin("b")
    manager.unload("b")
    assert table(manager) == [("c", "device", False), ("c", "cpu", False)]
    assert manager.stats["device_evictions"] == 3 and manager.stats["device_unloads"] == 1


def test_leased_sets_are_never_evicted(manager):
    la, lb = manager.acquire("a"), manager.acquire("b")
    with pytest.raises(AdapterCapacityError, match="in use"):
        manager.load("c")
    with pytest.raises(AdapterInUseError, match="running batch"):
        manager.unload("a")
    la.release()
    la.release()  # idempotent
    manager.load("c")  # a is free now
    assert manager.resident() == [manager.registry.resolve("b").ref, manager.registry.resolve("c").ref]
    lb.release()


def test_sets_it_is_told_to_keep_are_evicted_last(manager):
    """A Ray replica's sets in their turn (`keep`) stay while a set without one goes, however recently used;
    when only kept sets are left, the least recently used of them goes (room is never refused for it)."""
    ref = {name: manager.registry.resolve(name).ref for name in "abcd"}
    manager.keep = lambda r: r == ref["a"]
    manager.load("a")
    manager.load("b")  # a is the least recently used
    manager.load("c")
    assert manager.resident() == [ref["a"], ref["c"]]
    manager.keep = lambda r: r in (ref["a"], ref["c"])
    manager.load("d")
    assert manager.resident() == [ref["c"], ref["d"]]
    manager.keep = lambda r: r == ref["c"]
    with manager.lease("d"):  # a set out of its turn in a running batch: wait for it rather than evict c
        with pytest.raises(AdapterCapacityError, match="in use"):
            manager.load("a")
        assert manager.resident() == [ref["c"], ref["d"]]
    manager.load("a")  # d's batch ended: d goes
    assert manager.resident() == [ref["c"], ref["a"]]


def test_load_waits_for_a_running_batch_to_release_room(backbone, registry, size):
    import threading

    manager = AdapterManager(backbone, registry, device_budget_bytes=size, cpu_budget_bytes=0, wait_timeout_s=5)
    held = manager.acquire("a")
    threading.Timer(0.2, held.release).start()
    with manager.lease("b") as lb:  # blocks until a is released, then evicts it
        assert lb.meta.name == "b"
    assert manager.resident() == [manager.registry.resolve("b").ref]


def test_set_larger_than_budget(backbone, registry, size):
    manager = AdapterManager(backbone, registry, device_budget_bytes=size - 1, cpu_budget_bytes=0)
    with pytest.raises(AdapterCapacityError, match="more than the whole device budget"):
        manager.load("a")
    assert manager.table() == []


def test_switching_between_resident_sets_copies_nothing(manager, backbone):
    manager.load("a")
    manager.load("b")
    ptrs = {ref: [p.data_ptr() for p in (manager.acquire(ref).module.parameters())] for ref in manager.resident()}
    loads = manager.stats["disk_loads"] + manager.stats["cpu_hits"]
    batch = random_batch(backbone, 2, seed=80)
    for _ in range(5):
        with manager.lease("a") as la, manager.lease("b") as lb:
            routing = Routing.per_sample([la.module, lb.module])
            with torch.no_grad():
                backbone.image_features(backbone.encode_image(batch.pixel_values, routing), routing)
    assert manager.stats["disk_loads"] + manager.stats["cpu_hits"] == loads
    for ref, before in ptrs.items():
        with manager.lease(ref) as held:
            assert [p.data_ptr() for p in held.module.parameters()] == before


def test_distinct_errors_for_unknown_name_version_and_incompatible(manager, registry, tiny_config):
    with pytest.raises(AdapterNotFoundError, match="no adapter set named 'zzz'"):
        manager.acquire("zzz")
    with pytest.raises(AdapterVersionNotFoundError, match="has no version 'abcdef'"):
        manager.acquire("a@abcdef")
    with pytest.raises(AdapterNotFoundError, match="invalid adapter name"):
        manager.acquire("../etc")
    with pytest.raises(AdapterVersionNotFoundError, match="invalid adapter version"):
        manager.acquire("a@not-hex")
    other = AdapterManager(random_backbone(tiny_config, seed=5), registry, device_budget_bytes=1 << 30,
                           cpu_budget_bytes=1 << 30)
    with pytest.raises(AdapterIncompatibleError, match="fingerprint"):
        other.acquire("a")
    assert other.table() == []
    assert manager.table() == []


def test_exact_version_and_prefix(manager, registry):
    meta = registry.resolve("a")
    with manager.lease(f"a@{meta.version}") as held:
        assert held.ref == meta.ref
    with manager.lease(f"a@{meta.version[:6]}") as held:
        assert held.ref == meta.ref


def test_budgets_are_validated(backbone, registry):
    with pytest.raises(ConfigError, match="budgets"):
        AdapterManager(backbone, registry, device_budget_bytes=0, cpu_budget_bytes=0)


def test_cold_load_trusts_the_scan_only_while_files_are_unchanged(manager, registry, backbone):
    import os

    from uniadapter_serve.adapters.format import WEIGHTS_FILE, load_adapter_set
    from uniadapter_serve.errors import AdapterFormatError

    meta = registry.resolve("a")
    loaded = load_adapter_set(meta.path, backbone, meta=meta)  # no second read + hash
    assert loaded.meta is meta
    weights = meta.path / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, new content, new mtime: the scan no longer vouches for it
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(meta.file_key[1] + 10**9, meta.file_key[1] + 10**9))
    with pytest.raises(AdapterFormatError, match="changed on disk"):
        manager.acquire("a")
