"""Hot-swap manager: two LRU tiers of adapter sets over one frozen backbone.

- device tier: sets ready for compute on the backbone's device (budget in bytes);
- CPU tier: CPU copies, so re-promoting an evicted set skips disk and validation (budget in bytes).

A batch takes a `Lease` per set it routes to; a leased or pinned set is never evicted, and
making room when everything resident is pinned or leased raises `AdapterCapacityError`. A set's device copy
passes the `verify` hook (its golden record) before it first serves.
Evicting happens before loading. Every removal goes through `_on_remove`. Using a resident
set copies no weights: batches route to it (see `model/routing.py`).
A version published while requests run does not disturb them: their leases hold the old
version's module; `name` resolves to the new version for every later request.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from uniadapter_serve.adapters.format import AdapterSetMeta, check_compatible, load_adapter_set
from uniadapter_serve.adapters.registry import AdapterRegistry
from uniadapter_serve.errors import AdapterCapacityError, AdapterInUseError, ConfigError
from uniadapter_serve.model.backbone import BlipBackbone
from uniadapter_serve.model.uniadapter import AdapterSetModule

log = logging.getLogger(__name__)


@dataclass
class _Resident:
    meta: AdapterSetMeta
    module: AdapterSetModule
    nbytes: int
    leases: int = 0
    pinned: bool = False
    unload_when_free: bool = False
    """unload as soon as the last lease ends (an unload asked for while batches used the set)"""


@dataclass
class Lease:
    """A running batch's hold on a device-resident set; release it when the batch is done."""

    meta: AdapterSetMeta
    module: AdapterSetModule
    _manager: AdapterManager = field(repr=False)
    _released: bool = field(default=False, repr=False)

    @property
    def ref(self) -> str:
        return self.meta.ref

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._manager._release(self.meta.ref)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _module_bytes(module: AdapterSetModule) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


class AdapterManager:
    """Loads, caches, pins and leases adapter sets for one backbone. Thread-safe."""

    def __init__(self, backbone: BlipBackbone, registry: AdapterRegistry, *, device_budget_bytes: int,
                 cpu_budget_bytes: int, wait_timeout_s: float = 10.0,
                 verify: Callable[[AdapterSetMeta, AdapterSetModule], None] | None = None) -> None:
        if device_budget_bytes <= 0 or cpu_budget_bytes < 0:
            raise ConfigError(
                f"adapter budgets must be device > 0 and cpu >= 0 bytes, got {device_budget_bytes}, {cpu_budget_bytes}"
            )
        self.backbone = backbone
        self.registry = registry
        self.device_budget = device_budget_bytes
        self.cpu_budget = cpu_budget_bytes
        self.wait_timeout_s = wait_timeout_s
        """How long a load waits for running batches to release room before AdapterCapacityError."""
        self.verify = verify
        """called with each set's device copy before it first serves (`Verifier.check_set`: its golden record);
        raising keeps the set out of both tiers"""
        self.keep: Callable[[str], bool] = lambda ref: False
        """Sets to evict last (a Ray model replica's sets that hold its places: evicting one between its
        batches would reload it within its own turn); called under the lock, so it must be quick and must
        not call back here"""
        self._lock = threading.RLock()
        self._room = threading.Condition(self._lock)
        self._device: OrderedDict[str, _Resident] = OrderedDict()  # LRU first
        self._cpu: OrderedDict[str, _Resident] = OrderedDict()
        self._loading: dict[str, Future[None]] = {}
        self._reserved = 0
        """device bytes held for sets being copied to the device (off the lock)"""
        self.stats: Counter[str] = Counter()
        """device_hits, cpu_hits, disk_loads, device_evictions, cpu_evictions, unloads"""

    # -- public API -------------------------------------------------------------------------

    def acquire(self, ref: str) -> Lease:
        """Resolve `ref`, make the set device-resident if needed, and lease it."""
        meta = self.registry.resolve(ref)
        while True:
            with self._lock:
                entry = self._device.get(meta.ref)
                if entry is not None:
                    entry.leases += 1
                    entry.unload_when_free = False  # wanted again
                    self._device.move_to_end(meta.ref)
                    self.stats["device_hits"] += 1
                    return Lease(meta, entry.module, self)
            self._ensure_resident(meta)

    @contextmanager
    def lease(self, ref: str) -> Iterator[Lease]:
        held = self.acquire(ref)
        try:
            yield held
        finally:
            held.release()

    def load(self, ref: str) -> AdapterSetMeta:
        """Make a set device-resident (evicting LRU sets as needed) without leasing it."""
        with self.acquire(ref) as held:
            return held.meta

    def pin(self, ref: str) -> AdapterSetMeta:
        """Load and pin: a pinned set is never evicted."""
        with self.acquire(ref) as held, self._lock:
            self._device[held.meta.ref].pinned = True
            return held.meta

    def unpin(self, ref: str) -> AdapterSetMeta:
        meta = self.registry.resolve(ref)
        with self._lock:
            entry = self._device.get(meta.ref)
            if entry is not None:
                entry.pinned = False
        return meta

    def unload(self, ref: str, *, when_free: bool = False) -> AdapterSetMeta:
        """Drop a set from both tiers; refused while it is pinned or leased (`when_free`: a leased set
        leaves as its last lease ends instead)."""
        meta = self.registry.resolve(ref)
        with self._lock:
            entry = self._device.get(meta.ref)
            if entry is not None:
                if entry.pinned:
                    raise AdapterInUseError(f"{meta.ref} is pinned; unpin it first")
                if entry.leases and when_free:
                    entry.unload_when_free = True
                    return meta
                if entry.leases:
                    raise AdapterInUseError(f"{meta.ref} is used by {entry.leases} running batch(es)")
                self._on_remove(self._device, meta.ref, reason="unload")
            if meta.ref in self._cpu:
                self._on_remove(self._cpu, meta.ref, reason="unload")
        return meta

    def table(self) -> list[dict[str, object]]:
        """The slot tables, least recently used first: ref, tier, pinned, leases, bytes."""
        with self._lock:
            rows: list[dict[str, object]] = []
            for tier, entries in (("device", self._device), ("cpu", self._cpu)):
                rows.extend({"ref": ref, "tier": tier, "pinned": e.pinned, "leases": e.leases, "bytes": e.nbytes}
                            for ref, e in entries.items())
            return rows

    def resident(self) -> list[str]:
        with self._lock:
            return list(self._device)

    def pinned(self) -> list[str]:
        with self._lock:
            return [ref for ref, e in self._device.items() if e.pinned]

    def device_bytes(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self._device.values())

    def cpu_bytes(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self._cpu.values())

    # -- internals --------------------------------------------------------------------------

    def _release(self, ref: str) -> None:
        with self._lock:
            entry = self._device.get(ref)
            if entry is not None and entry.leases > 0:
                entry.leases -= 1
                if entry.leases == 0:
                    if entry.unload_when_free and not entry.pinned:
                        self._on_remove(self._device, ref, reason="unload")
                    self._room.notify_all()

    def _ensure_resident(self, meta: AdapterSetMeta) -> None:
        """Bring `meta` into the device tier; concurrent callers for one set share one load."""
        with self._lock:
            if meta.ref in self._device:
                return
            pending = self._loading.get(meta.ref)
            owner = pending is None
            if owner:
                pending = Future()
                self._loading[meta.ref] = pending
        assert pending is not None
        if not owner:
            pending.result()
            return
        try:
            self._promote(meta)
            pending.set_result(None)
        except BaseException as e:
            pending.set_exception(e)
            raise
        finally:
            with self._lock:
                self._loading.pop(meta.ref, None)

    def _promote(self, meta: AdapterSetMeta) -> None:
        with self._lock:
            cpu_copy = self._cpu.get(meta.ref)
        if cpu_copy is not None:
            check_compatible(meta, self.backbone)
            cpu_module = cpu_copy.module
        else:
            cpu_module = load_adapter_set(meta.path, self.backbone, device="cpu", dtype=self.backbone.dtype,
                                          meta=meta).module
            with self._lock:
                self.stats["disk_loads"] += 1
            if self.backbone.device.type == "cuda" and _module_bytes(cpu_module) <= self.cpu_budget:
                pin_module(cpu_module)  # before the first copy, so that one is asynchronous too
        nbytes = _module_bytes(cpu_module)
        if nbytes > self.device_budget:
            raise AdapterCapacityError(
                f"{meta.ref} needs {nbytes} bytes, more than the whole device budget of {self.device_budget}"
            )
        deadline = time.monotonic() + self.wait_timeout_s
        with self._lock:
            while not self._make_room(nbytes):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AdapterCapacityError(
                        f"no room for {meta.ref} ({nbytes} bytes) in the device budget of {self.device_budget} "
                        f"within {self.wait_timeout_s} s: resident sets are in use: {self._busy()}"
                    )
                self._room.wait(remaining)
            self._reserved += nbytes  # the room stays ours while the copy runs off the lock
        try:
            device_module = device_copy(cpu_module, self.backbone.device)
            if self.verify is not None:
                self.verify(meta, device_module)
        except BaseException:
            with self._lock:
                self._reserved -= nbytes
                self._room.notify_all()
            raise
        with self._lock:
            self._reserved -= nbytes
            self._device[meta.ref] = _Resident(meta, device_module, nbytes)
            if cpu_copy is None:
                self._put_cpu(meta, cpu_module, nbytes)
            else:
                self.stats["cpu_hits"] += 1
                if meta.ref in self._cpu:
                    self._cpu.move_to_end(meta.ref)
            self._room.notify_all()
        log.info("adapter set %s resident on %s (%d bytes)", meta.ref, self.backbone.device, nbytes)

    def _busy(self) -> list[str]:
        return [f"{ref} ({'pinned' if e.pinned else f'{e.leases} leases'})" for ref, e in self._device.items()]

    def _make_room(self, nbytes: int) -> bool:
        """Evict least-recently-used unpinned, unleased sets (those `keep` names last) until `nbytes` fit.
        Holds the lock.

        Returns False when only leased sets stand in the way (room will free up when their
        batches end); raises AdapterCapacityError when pinned sets alone leave too little room.
        """
        pinned = sum(e.nbytes for e in self._device.values() if e.pinned)
        if pinned + nbytes > self.device_budget:
            raise AdapterCapacityError(
                f"no room for {nbytes} more bytes in the device budget of {self.device_budget}: "
                f"pinned sets hold {pinned} bytes: {self._busy()}; unpin a set or raise the budget"
            )
        used = sum(e.nbytes for e in self._device.values()) + self._reserved
        while used + nbytes > self.device_budget:
            free = [ref for ref, e in self._device.items() if not e.pinned and e.leases == 0]  # LRU first
            victim = next((ref for ref in free if not self.keep(ref)), None)
            if victim is None and any(e.leases and not e.pinned and not self.keep(ref)
                                      for ref, e in self._device.items()):
                return False  # a set out of its turn frees room as its batch ends: wait for it, keep the rest
            victim = victim or (free[0] if free else None)
            if victim is None:
                return False
            used -= self._device[victim].nbytes
            self._on_remove(self._device, victim, reason="evict")
        return True

    def _put_cpu(self, meta: AdapterSetMeta, module: AdapterSetModule, nbytes: int) -> None:
        if nbytes > self.cpu_budget:
            return
        used = sum(e.nbytes for e in self._cpu.values())
        while used + nbytes > self.cpu_budget and self._cpu:
            victim = next(iter(self._cpu))
            used -= self._cpu[victim].nbytes
            self._on_remove(self._cpu, victim, reason="evict")
        self._cpu[meta.ref] = _Resident(meta, module, nbytes)

    def _on_remove(self, tier: OrderedDict[str, _Resident], ref: str, *, reason: str) -> None:
        """The one exit path from either tier (eviction and unload)."""
        entry = tier.pop(ref)
        name = "device" if tier is self._device else "cpu"
        self.stats[f"{name}_{'evictions' if reason == 'evict' else 'unloads'}"] += 1
        log.info("adapter set %s left the %s tier (%s)", ref, name, reason)
        del entry


def pin_module(module: AdapterSetModule) -> None:
    """Page-lock a CPU module's tensors in place: copies from them to a GPU are asynchronous DMA."""
    for t in [*module.parameters(), *module.buffers()]:
        if not t.is_pinned():
            t.data = t.data.pin_memory()


def device_copy(module: AdapterSetModule, device: torch.device) -> AdapterSetModule:
    """The module with every tensor copied to `device` straight from the source tensors (pinned ones
    copy asynchronously); no intermediate CPU clone. On CUDA the copies run on a side stream, which
    is waited for before the module is returned, and every copy is marked as used by the default
    stream (where the model thread computes), so its memory is not reused while kernels still read it.
    The CPU device gets the module itself: one module serves both tiers, nothing is written to it."""
    if device.type == "cpu":
        return module
    cuda = device.type == "cuda"
    stream = torch.cuda.Stream(device) if cuda else None
    copies: dict[int, torch.Tensor] = {}
    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
        for p in module.parameters():
            copies[id(p)] = torch.nn.Parameter(p.detach().to(device, non_blocking=True), requires_grad=p.requires_grad)
        for b in module.buffers():
            copies[id(b)] = b.to(device, non_blocking=True)
    if stream is not None:
        stream.synchronize()
        default = torch.cuda.default_stream(device)
        for t in copies.values():
            t.record_stream(default)
    memo: dict[int, Any] = dict(copies)  # deepcopy takes these instead of copying the source tensors
    return copy.deepcopy(module, memo)
