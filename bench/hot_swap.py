"""Hot-swapping adapter sets on one frozen BLIP backbone (CPU, fp32): swap, cold load, mixed batches, cold load
with golden verification.

Four measurements, each printed with its median and, where there is a target, the ratio or
value next to it with "ok" or "MISSED":

1. swap: routing a batch to another already-resident set is `AdapterManager.acquire(ref)` +
   `Lease.release()` (the model is not touched; batches only route to another module).
   Timed while cycling over 4 resident sets (target < 1 ms). Also timed, for reference:
   `Routing.per_sample` for a batch of 32 rows mixing 4 sets, and a whole mixed-batch switch
   (4 acquires + `per_sample` + 4 releases).
2. cold load: the first acquire of a set that is not resident, CPU tier empty (parse +
   validate + read + build), for a retrieval set with BLIP-base dims and bottleneck 512
   (19.5 M parameters, ~78 MB fp32; target < 0.3 s), against reloading the whole BLIP-base
   backbone with `load_backbone(folder)` from a transformers-format folder (config.json +
   model.safetensors) written once into a temporary folder (target: >= 50x faster).
   Both are warm-cache numbers: every file is read once before timing, so the OS page cache
   holds it and neither number includes the disk.
3. mixed batch: throughput of a batch of 32 whose rows are spread over 4 sets (row i -> set
   i % 4) against the same batch on one set, on the image ITC path (`encode_image` +
   `image_features`) and the text ITC path (`text_features`), on `blip-demo` with batch 32,
   then on `blip-base` with image batch 4 and text batch 16 (one row per set in the image
   batch: the worst case; `--base-image-batch 0 --base-text-batch 0` skips it). Target: mixed
   >= 0.8x single. The routing is built inside every call for both variants, as a server would.
4. cold load with golden verification (issue 24): on the shipped demo backbone, per task (--verify-tasks:
   retrieval, vqa), two random sets of about 20 M parameters (--verify-params; bottleneck ~9,700 at 128-d),
   published with their golden records; timed side by side: a cold load without verification, with a first
   verification (`AdapterManager(verify=Verifier(Prober(...)).check_set)`, a fresh Verifier per load, so the
   probes run; target < 0.3 s), a reload from disk with the pass remembered, and a hot swap (a reload from the
   CPU tier after the other set evicted it; the pass remembered, so no probe runs: the count printed must be 0).
   Then a first verification step by step (read golden.json, probe inputs, each served stage, the rest of the
   probes, compare()). The same for a ~20 M retrieval set on the blip-base backbone (--base-verify-rounds,
   --base-verify-tasks; each round runs BLIP-base's probes once on the CPU: 3-6 s on two cores).

Machines are noisy, so the variants of each measurement are timed side by side in one run:
every round takes one sample of each variant (the order rotating from round to round), a
sample being the mean of enough calls to last `--min-time` seconds (cold loads: one load per
sample); lines report the median sample and ratios are ratios of medians. `spread` is half
the inter-quartile range of the per-round paired ratios. Weights are random: timings do not
depend on their values. The last line says how much of the CPUs other processes used during
the run (from /proc/stat): above ~10%, rerun on a quiet machine.

Run from the repository root:

    .venv/bin/python bench/hot_swap.py
    .venv/bin/python bench/hot_swap.py --rounds 15 --cold-rounds 7 --threads 4 --base-image-batch 8

The defaults take about 75 s on two cores (section 4 adds about 15 s on the demo model and about 40 s on
blip-base; `--verify-rounds 0 --base-verify-rounds 0` skips it) and peak near 3.3 GB of memory (two BLIP-base
backbones alive while the reload is timed; `--skip-cold`: about 2.2 GB).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import os
import platform
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from benchkit import half_iqr, rotating_rounds
from safetensors.torch import save_file

from uniadapter_serve.adapters.format import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    AdapterSetMeta,
    BackboneInfo,
    check_compatible,
    load_adapter_set,
    read_adapter_meta,
)
from uniadapter_serve.adapters.golden import GoldenRecord, Prober, compare, probe_clip, probe_images, read_record
from uniadapter_serve.adapters.manager import AdapterManager
from uniadapter_serve.adapters.registry import AdapterRegistry
from uniadapter_serve.adapters.verification import Verifier
from uniadapter_serve.model.backbone import BlipBackbone, text_config, vision_config
from uniadapter_serve.model.loading import DEMO_DIR, load_backbone, random_backbone
from uniadapter_serve.model.routing import Routing
from uniadapter_serve.model.stages import RankPlan, make_stages
from uniadapter_serve.model.testing import random_adapter, random_batch
from uniadapter_serve.model.tokenizer import BlipTokenizer, load_answer_list, load_tokenizer
from uniadapter_serve.model.uniadapter import AdapterSetModule, UniAdapterConfig

SWAP_TARGET_S = 1e-3
COLD_TARGET_S = 0.3
COLD_RATIO_TARGET = 50.0
VERIFIED_TARGET_S = 0.3
"""a cold load with golden verification of a 20 M set on the demo model (issue 24)"""
MIX_RATIO_TARGET = 0.8
N_SETS = 4
TEXT_LEN = 32
DEVICE_BUDGET = 4 << 30
"""Room for every set this benchmark loads: nothing is evicted behind its back."""

Call = Callable[[], object]


# -- timing and printing ----------------------------------------------------------------------


def per_call(call: Call, min_time: float) -> float:
    """Mean seconds per call over a run of at least `min_time` seconds (at least one call)."""
    n = 0
    start = time.perf_counter()
    while True:
        call()
        n += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_time:
            return elapsed / n


def interleaved(calls: Sequence[Call], rounds: int, min_time: float, warmup: int = 1) -> list[list[float]]:
    """Per call, one sample (s per call) per round; calls interleaved, order rotating each round."""
    for _ in range(warmup):
        for call in calls:
            call()
    return rotating_rounds([lambda c=c: per_call(c, min_time) for c in calls], rounds)


def paired_spread(num: Sequence[float], den: Sequence[float]) -> float:
    return half_iqr([a / b for a, b in zip(num, den, strict=True)])


def fmt_s(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    if seconds < 1.0:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.3f} s"


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def report(label: str, value: str, target: str = "", result: str = "") -> None:
    print(f"  {label:<68} {value:>22}   {target:<9} {result}".rstrip())


def section(title: str) -> None:
    print(f"\n[{title}]")


def collect() -> None:
    gc.collect()


# -- shared setup -------------------------------------------------------------------------------


def build_backbone(config: str) -> BlipBackbone:
    return random_backbone(config, seed=0).requires_grad_(False).eval()


def publish_sets(backbone: BlipBackbone, registry: AdapterRegistry, config: UniAdapterConfig, names: Sequence[str],
                 seed: int = 0) -> list[str]:
    """Publish one random set per name; returns the names (refs resolving to the newest version)."""
    info = BackboneInfo.of(backbone)
    for k, name in enumerate(names):
        registry.publish(random_adapter(backbone, config, seed=seed + k), name, info)
    return list(names)


def mixed_rows(modules: Sequence[AdapterSetModule], batch: int) -> list[AdapterSetModule | None]:
    """Row i -> set i % len(modules): every set's rows are scattered over the batch."""
    return [modules[i % len(modules)] for i in range(batch)]


# -- 1. swap between resident sets --------------------------------------------------------------


def bench_swap(manager: AdapterManager, refs: Sequence[str], modules: Sequence[AdapterSetModule],
               args: argparse.Namespace) -> None:
    section(f"1. swap between resident sets ({len(refs)} resident, CPU tier unused)")
    cycle = itertools.cycle(refs)
    rows = mixed_rows(modules, args.batch)

    def swap() -> None:
        manager.acquire(next(cycle)).release()

    def routing() -> None:
        Routing.per_sample(rows)

    def batch_switch() -> None:
        leases = [manager.acquire(ref) for ref in refs]
        Routing.per_sample(rows)
        for lease in leases:
            lease.release()

    hits_before = manager.stats["device_hits"]
    loads_before = manager.stats["disk_loads"]
    swap_s, routing_s, switch_s = (statistics.median(s) for s in
                                   interleaved([swap, routing, batch_switch], args.rounds, args.swap_min_time))
    if manager.stats["disk_loads"] != loads_before or manager.stats["device_hits"] == hits_before:
        print("  warning: the swap loop did not run on resident sets only")
    report("acquire(ref) + release() on a resident set", fmt_s(swap_s), "< 1 ms", verdict(swap_s < SWAP_TARGET_S))
    report(f"Routing.per_sample, batch {args.batch} mixing {len(refs)} sets", fmt_s(routing_s))
    report(f"mixed-batch switch: {len(refs)} acquires + per_sample + {len(refs)} releases", fmt_s(switch_s))


# -- 3. mixed batch vs single set ---------------------------------------------------------------


def path_call(backbone: BlipBackbone, path: str, rows: Sequence[AdapterSetModule | None], batch_size: int,
              text_len: int) -> Call:
    """One ITC forward of a fixed random batch; the routing is built inside the call."""
    batch = random_batch(backbone, batch_size, seed=1, text_len=text_len)
    if path == "image":
        pixels = batch.pixel_values

        def image() -> torch.Tensor:
            routing = Routing.per_sample(rows)
            return backbone.image_features(backbone.encode_image(pixels, routing), routing)

        return image
    ids, mask = batch.input_ids, batch.attention_mask

    def text() -> torch.Tensor:
        return backbone.text_features(ids, mask, Routing.per_sample(rows))

    return text


def bench_mixed(backbone: BlipBackbone, modules: Sequence[AdapterSetModule], config: str, batches: dict[str, int],
                rounds: int, min_time: float) -> None:
    """Per path ("image", "text") and its batch size: single set vs rows spread over `modules`."""
    sizes = ", ".join(f"{path} batch {n}" for path, n in batches.items())
    section(f"3. mixed batch vs one set: {config}, {sizes}, {len(modules)} sets, routing built per call")
    text_len = min(TEXT_LEN, int(backbone.text_encoder.embeddings.position_ids.shape[-1]))
    for path, batch_size in batches.items():
        single = [modules[0]] * batch_size
        mixed = mixed_rows(modules, batch_size)
        calls = [path_call(backbone, path, rows, batch_size, text_len) for rows in (single, mixed)]
        with torch.inference_mode():
            t_single, t_mixed = interleaved(calls, rounds, min_time)
        single_s, mixed_s = statistics.median(t_single), statistics.median(t_mixed)
        ratio = single_s / mixed_s  # throughput ratio mixed/single
        spread = paired_spread(t_single, t_mixed)
        report(f"{path} ITC, one set", f"{fmt_s(single_s)} ({batch_size / single_s:,.1f}/s)")
        report(f"{path} ITC, {len(modules)} sets mixed", f"{fmt_s(mixed_s)} ({batch_size / mixed_s:,.1f}/s)")
        report(f"{path} ITC throughput mixed/single (spread ±{spread:.3f})", f"{ratio:.3f}x", ">= 0.8x",
               verdict(ratio >= MIX_RATIO_TARGET))


def bench_small(args: argparse.Namespace, root: Path) -> None:
    """Sections 1 and 3 on the small config: sets published, loaded and leased through the manager."""
    backbone = build_backbone(args.small_config)
    registry = AdapterRegistry(root / "adapters-small")
    config = UniAdapterConfig.for_task("retrieval", bottleneck=args.mix_bottleneck)
    refs = publish_sets(backbone, registry, config, [f"set-{k}" for k in range(N_SETS)])
    manager = AdapterManager(backbone, registry, device_budget_bytes=DEVICE_BUDGET, cpu_budget_bytes=0)
    modules = []
    for ref in refs:
        with manager.lease(ref) as lease:
            modules.append(lease.module)
    bench_swap(manager, refs, modules, args)
    bench_mixed(backbone, modules, args.small_config, {"image": args.batch, "text": args.batch}, args.rounds,
                args.min_time)


# -- 2. cold load vs backbone reload ------------------------------------------------------------


def save_backbone(backbone: BlipBackbone, folder: Path) -> int:
    """Write `backbone` as a transformers-format folder; returns the weights file's size."""
    folder.mkdir(parents=True, exist_ok=True)
    backbone.config.to_json_file(folder / "config.json")
    weights = folder / "model.safetensors"
    save_file({k: v.contiguous() for k, v in backbone.state_dict().items()}, str(weights))
    return weights.stat().st_size


def warm_page_cache(paths: Sequence[Path]) -> None:
    """Read every file once so that the timed loads find it in the OS page cache."""
    for path in paths:
        with path.open("rb") as f:
            while f.read(64 << 20):
                pass


def cold_acquire(manager: AdapterManager, ref: str) -> float:
    """Seconds for the first acquire (+ release) of `ref` after dropping it from both tiers."""
    manager.unload(ref)
    collect()
    start = time.perf_counter()
    manager.acquire(ref).release()
    return time.perf_counter() - start


def reload_backbone(folder: Path) -> float:
    collect()
    start = time.perf_counter()
    model = load_backbone(folder)
    elapsed = time.perf_counter() - start
    del model
    collect()
    return elapsed


def cold_breakdown(folder: Path, backbone: BlipBackbone, n: int) -> tuple[float, float]:
    """Median seconds of two steps of every cold load, timed on their own: reading the set
    (whole file, hash, JSON and header parse) and validating it against the backbone."""
    read_s, check_s = [], []
    for _ in range(n):
        collect()
        start = time.perf_counter()
        meta = read_adapter_meta(folder)
        read_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        check_compatible(meta, backbone)
        check_s.append(time.perf_counter() - start)
    return statistics.median(read_s), statistics.median(check_s)


def bench_cold(args: argparse.Namespace, root: Path, backbone: BlipBackbone) -> None:
    section("2. cold load of an adapter set vs reloading the backbone (blip-base dims, CPU, fp32)")
    t0 = time.perf_counter()
    folder = root / "backbone-base"
    backbone_bytes = save_backbone(backbone, folder)
    registry = AdapterRegistry(root / "adapters-base")
    config = UniAdapterConfig.for_task("retrieval", bottleneck=args.cold_bottleneck)
    (ref,) = publish_sets(backbone, registry, config, ["cold-set"])
    meta = registry.resolve(ref)
    set_files = [meta.path / WEIGHTS_FILE, meta.path / CONFIG_FILE]
    set_bytes = set_files[0].stat().st_size
    manager = AdapterManager(backbone, registry, device_budget_bytes=DEVICE_BUDGET, cpu_budget_bytes=0)
    print(f"  (setup: backbone saved, set published, in {time.perf_counter() - t0:.1f} s)")
    warm_page_cache([*set_files, folder / "model.safetensors", folder / "config.json"])
    print("  warm OS page cache: every file was read once before timing; neither number includes the disk")

    cold_acquire(manager, ref)  # warm-up (untimed): first-call costs, allocator
    reload_backbone(folder)
    adapter_s: list[float] = []
    backbone_s: list[float] = []
    for r in range(args.cold_rounds):
        adapter_first = r % 2 == 0
        if adapter_first:
            adapter_s.extend(cold_acquire(manager, ref) for _ in range(args.cold_repeats))
        backbone_s.append(reload_backbone(folder))
        if not adapter_first:
            adapter_s.extend(cold_acquire(manager, ref) for _ in range(args.cold_repeats))
    if manager.stats["disk_loads"] != 1 + args.cold_rounds * args.cold_repeats:
        print(f"  warning: expected every timed acquire to load from disk, stats: {dict(manager.stats)}")
    read_s, check_s = cold_breakdown(meta.path, backbone, args.cold_rounds * args.cold_repeats)

    a_med, b_med = statistics.median(adapter_s), statistics.median(backbone_s)
    ratio = b_med / a_med
    n_set = meta.num_parameters
    n_backbone = sum(p.numel() for p in backbone.parameters())
    report(f"adapter set: first acquire, {n_set / 1e6:.1f} M params, {set_bytes / 1e6:.1f} MB "
           f"(n={len(adapter_s)})", fmt_s(a_med), "< 0.3 s", verdict(a_med < COLD_TARGET_S))
    report(f"backbone: load_backbone(folder), {n_backbone / 1e6:.1f} M params, {backbone_bytes / 1e6:.0f} MB "
           f"(n={len(backbone_s)})", fmt_s(b_med))
    report("backbone reload / adapter cold load", f"{ratio:.1f}x", ">= 50x", verdict(ratio >= COLD_RATIO_TARGET))
    report("  MB/s: adapter | backbone",
           f"{set_bytes / 1e6 / a_med:,.0f} | {backbone_bytes / 1e6 / b_med:,.0f}")
    report("  of which: read + sha256 + parse (read_adapter_meta)", fmt_s(read_s))
    report("  of which: validate against the backbone (check_compatible)", fmt_s(check_s))
    report("  of which: the rest (deserialize, build, manager)", fmt_s(max(a_med - read_s - check_s, 0.0)))
    del manager
    collect()


def bench_base(args: argparse.Namespace, root: Path) -> None:
    """Section 2 and the blip-base part of section 3, on one BLIP-base backbone built here."""
    batches = {path: n for path, n in (("image", args.base_image_batch), ("text", args.base_text_batch)) if n > 0}
    if args.skip_cold and not batches and args.base_verify_rounds <= 0:
        return
    start = time.perf_counter()
    backbone = build_backbone("blip-base")
    print(f"\n(blip-base backbone built in {time.perf_counter() - start:.1f} s)")
    if not args.skip_cold:
        bench_cold(args, root, backbone)
    if args.base_verify_rounds > 0:
        setup = VerifiedSetup("blip-base (random backbone)", backbone,
                              BlipTokenizer.demo(text_config(backbone.config).vocab_size), load_answer_list(), False)
        bench_verified(setup, root, args, args.base_verify_rounds, args.base_verify_tasks)
    if batches:
        config = UniAdapterConfig.for_task("retrieval", bottleneck=args.cold_bottleneck)
        modules = [random_adapter(backbone, config, seed=10 + k) for k in range(N_SETS)]
        bench_mixed(backbone, modules, "blip-base", batches, args.base_rounds, args.base_min_time)
        del modules
    del backbone
    collect()


# -- 4. cold load with golden verification ----------------------------------------------------


class TimedStage:
    """A served stage that adds its seconds to `clock[name]` (the verifier's probes run through the stages)."""

    def __init__(self, stage: Any, clock: defaultdict[str, float]) -> None:
        self.stage, self.clock, self.name, self.kind = stage, clock, stage.name, stage.kind

    def __call__(self, payloads: Sequence[Any], routing: Routing) -> list[Any]:
        plan = getattr(payloads[0], "plan", None) if payloads else None
        key = self.name if plan is None else f"{self.name} ({'rank' if isinstance(plan, RankPlan) else 'generate'})"
        start = time.perf_counter()
        try:
            return self.stage(payloads, routing)
        finally:
            self.clock[key] += time.perf_counter() - start


def bottleneck_for(dims: Any, task: str, params: float) -> int:
    """The bottleneck whose set for `task` has about `params` parameters (counted on the meta device)."""
    def count(bottleneck: int) -> int:
        with torch.device("meta"):
            return AdapterSetModule(UniAdapterConfig.for_task(task, bottleneck=bottleneck), dims,
                                    init=False).num_parameters()
    base, per = count(1), count(2) - count(1)
    return max(1, round((params - base + per) / per))


@dataclass
class VerifiedSetup:
    label: str
    backbone: BlipBackbone
    tokenizer: BlipTokenizer
    answers: list[str]
    """the server's default answer list"""
    target: bool
    """whether VERIFIED_TARGET_S applies"""


def demo_setup() -> VerifiedSetup:
    backbone = load_backbone("demo")
    return VerifiedSetup("demo model (the shipped backbone)", backbone, load_tokenizer("demo", backbone.config),
                         load_answer_list(DEMO_DIR / "answer_list.json"), True)


def verify_breakdown(prober: Prober, clock: defaultdict[str, float], meta: AdapterSetMeta, module: AdapterSetModule,
                     n: int) -> dict[str, float]:
    """Median seconds of each step of a first verification (what `Verifier.check_set` does on a miss), over `n`
    runs: read golden.json, make the probe inputs, each served stage (the answer stage's rank and generate calls
    apart), the rest of the probes (mostly the greedy margins' teacher-forced passes, one question at a time),
    compare()."""
    steps: dict[str, list[float]] = {}
    size = prober.size
    frames = meta.config.num_frames if meta.config.temporal_embedding else 4
    for _ in range(n):
        collect()
        clock.clear()
        t0 = time.perf_counter()
        record = read_record(meta.path)
        t1 = time.perf_counter()
        probe_images(size)
        if meta.config.task == "videoqa" or meta.config.temporal_embedding:
            probe_clip(size, frames)
        t2 = time.perf_counter()
        assert record is not None
        answers = record.probes.get("answer_scores", {}).get("answers")
        got = prober.record(module, ref=record.ref, answer_list=meta.answer_list, answers=answers,
                            probes=list(record.probes))
        t3 = time.perf_counter()
        verdict = compare(meta.ref, record, got, prober.tokenizer)
        t4 = time.perf_counter()
        if not verdict.ok:
            print(f"  warning: {verdict.message()}")
        staged = dict(clock)
        row = {"read golden.json": t1 - t0, "probe inputs (PIL, preprocess)": t2 - t1,
               **{f"stage {k}": v for k, v in sorted(staged.items())},
               "rest of the probes (greedy margins, sketches)": max(t3 - t2 - sum(staged.values()), 0.0),
               "whole Prober.record": t3 - t2,
               "compare()": t4 - t3}
        for k, v in row.items():
            steps.setdefault(k, []).append(v)
    return {k: statistics.median(v) for k, v in steps.items()}


def bench_verified(setup: VerifiedSetup, root: Path, args: argparse.Namespace, rounds: int,
                   tasks: Sequence[str]) -> None:
    """Per task in --verify-tasks, for a set of about --verify-params parameters: a cold load without and with
    golden verification, a reload from disk with the pass remembered, and a hot swap (a reload from the CPU tier
    after eviction); then where a first verification's time goes."""
    b = setup.backbone
    section(f"4. cold load with golden verification: {setup.label}, {text_config(b.config).hidden_size}-d, "
            f"{vision_config(b.config).image_size} px, CPU, fp32")
    clock: defaultdict[str, float] = defaultdict(float)
    stages = {name: TimedStage(st, clock) for name, st in make_stages(b, setup.tokenizer).items()}
    prober = Prober(b, setup.tokenizer, setup.answers, stages)  # type: ignore[arg-type]
    for task in tasks:
        verified_task(setup, prober, clock, task, root, args, rounds)
        collect()


def record_of(prober: Prober, module: AdapterSetModule) -> Callable[[AdapterSetMeta], GoldenRecord]:
    """The `golden` hook of `AdapterRegistry.publish`, as the publish route passes it."""
    def make(meta: AdapterSetMeta) -> GoldenRecord:
        return prober.record(module, ref=meta.ref, answer_list=meta.answer_list)
    return make


def verified_task(setup: VerifiedSetup, prober: Prober, clock: defaultdict[str, float], task: str, root: Path,
                  args: argparse.Namespace, rounds: int) -> None:
    t0 = time.perf_counter()
    b = setup.backbone
    bottleneck = bottleneck_for(b.dims, task, args.verify_params)
    registry = AdapterRegistry(root / f"verified-{task}-{text_config(b.config).hidden_size}")
    config = UniAdapterConfig.for_task(task, bottleneck=bottleneck)
    info = BackboneInfo.of(b)
    refs = []
    for k in range(2):  # two sets: the hot swap alternates them through a device tier that holds one
        module = random_adapter(b, config, seed=50 + k, std=0.02)
        meta = registry.publish(module, f"{task}-{k}", info, golden=record_of(prober, module))
        refs.append(meta.ref)
    del module
    meta = registry.resolve(refs[0])
    set_bytes = (meta.path / WEIGHTS_FILE).stat().st_size
    warm_page_cache([registry.resolve(r).path / f for r in refs for f in (WEIGHTS_FILE, CONFIG_FILE, "golden.json")])
    print(f"  {task}: bottleneck {bottleneck}, {meta.num_parameters / 1e6:.1f} M params, {set_bytes / 1e6:.0f} MB, "
          f"golden.json {(meta.path / 'golden.json').stat().st_size / 1e3:.1f} KB "
          f"(two sets published with their records in {time.perf_counter() - t0:.1f} s)")

    plain = AdapterManager(b, registry, device_budget_bytes=DEVICE_BUDGET, cpu_budget_bytes=0)
    first = AdapterManager(b, registry, device_budget_bytes=DEVICE_BUDGET, cpu_budget_bytes=0)
    kept = Verifier(prober)
    cached = AdapterManager(b, registry, device_budget_bytes=DEVICE_BUDGET, cpu_budget_bytes=0,
                            verify=kept.check_set)
    one_set = int(set_bytes * 1.05)  # the device tier holds one set: each acquire evicts the other to the CPU tier
    swapping = AdapterManager(b, registry, device_budget_bytes=one_set, cpu_budget_bytes=3 * one_set,
                              verify=kept.check_set)

    def verified_first() -> float:
        first.verify = Verifier(prober).check_set  # nothing remembered: the probes run
        return cold_acquire(first, refs[0])

    def hot_swap() -> float:
        """acquire refs[1] (refs[0] goes to the CPU tier), then time re-acquiring refs[0] from there"""
        swapping.acquire(refs[1]).release()
        collect()
        start = time.perf_counter()
        swapping.acquire(refs[0]).release()
        return time.perf_counter() - start

    calls: list[Callable[[], float]] = [lambda: cold_acquire(plain, refs[0]), verified_first,
                                        lambda: cold_acquire(cached, refs[0]), hot_swap]
    for call in (calls[0], calls[2], calls[3]):  # warm-up (untimed), which runs the probes once: the pass kept
        call()
    checks_before = sum(kept.counts.values())
    hits_before = swapping.stats["cpu_hits"]
    samples = rotating_rounds(calls, rounds)
    new_checks = sum(kept.counts.values()) - checks_before
    plain_s, first_s, cached_s, swap_s = (statistics.median(x) for x in samples)
    target = ("< 0.3 s", verdict(first_s < VERIFIED_TARGET_S)) if setup.target else ("", "")
    report(f"  cold load, no verification (n={rounds})", fmt_s(plain_s))
    report("  cold load, first verification (the probes run)", fmt_s(first_s), *target)
    report("  reload from disk after unload, pass remembered", fmt_s(cached_s))
    report("  hot swap: reload from the CPU tier after eviction, pass remembered", fmt_s(swap_s))
    report("  verified / plain cold load", f"{first_s / plain_s:.2f}x")
    report("  remembered / plain cold load | hot swap / plain", f"{cached_s / plain_s:.2f}x | {swap_s / plain_s:.2f}x")
    report("  verifications during the remembered loads (0: every pass came from the cache)", str(new_checks))
    if new_checks or swapping.stats["cpu_hits"] - hits_before < rounds:
        print(f"  warning: expected remembered passes and CPU-tier hits; verifier {dict(kept.counts)}, "
              f"swap manager {dict(swapping.stats)}")
    remembered = []
    for _ in range(max(3, rounds)):
        with swapping.lease(refs[0]) as lease:  # resident: only the check is timed
            start = time.perf_counter()
            kept.check_set(meta, lease.module)
            remembered.append(time.perf_counter() - start)
    report("  of a remembered load: check_set (read golden.json, digests, lookup)",
           fmt_s(statistics.median(remembered)))
    module = load_adapter_set(meta.path, b, meta=meta).module
    steps = verify_breakdown(prober, clock, meta, module, rounds)
    whole = steps.pop("whole Prober.record")
    total = sum(steps.values())
    print(f"  a first verification step by step, {rounds} more runs, medians (sum {fmt_s(total)}; the probes, "
          f"Prober.record, {fmt_s(whole)}):")
    for step, seconds in steps.items():
        report(f"    {step}", f"{fmt_s(seconds)} ({seconds / total:.0%})")
    for manager in (plain, first, cached, swapping):
        for ref in refs:
            manager.unload(ref)


# -- main -----------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small-config", default="blip-demo", help="config for the swap and mixed-batch sections")
    p.add_argument("--batch", type=int, default=32, help="batch size of the swap routing and the mixed batches")
    p.add_argument("--mix-bottleneck", type=int, default=512, help="bottleneck of the small config's sets")
    p.add_argument("--rounds", type=int, default=9, help="timed rounds of the swap and mixed-batch sections")
    p.add_argument("--min-time", type=float, default=0.2, help="seconds of forward calls averaged into one sample")
    p.add_argument("--swap-min-time", type=float, default=0.05, help="seconds of swap calls per sample")
    p.add_argument("--cold-bottleneck", type=int, default=512, help="bottleneck of the blip-base sets")
    p.add_argument("--cold-rounds", type=int, default=5, help="backbone reloads (one per round)")
    p.add_argument("--cold-repeats", type=int, default=3, help="adapter cold loads per round")
    p.add_argument("--base-image-batch", type=int, default=4, help="blip-base mixed/single, image path (0: skip)")
    p.add_argument("--base-text-batch", type=int, default=16, help="blip-base mixed/single, text path (0: skip)")
    p.add_argument("--base-rounds", type=int, default=5, help="rounds of the blip-base mixed-batch comparison")
    p.add_argument("--base-min-time", type=float, default=0.0, help="seconds per blip-base sample (0: one call)")
    p.add_argument("--verify-params", type=float, default=20e6, help="section 4: parameters of the sets")
    p.add_argument("--verify-tasks", nargs="+", default=["retrieval", "vqa"], choices=("retrieval", "vqa", "videoqa"),
                   help="section 4, demo model: a set per task")
    p.add_argument("--verify-rounds", type=int, default=7, help="section 4, demo model: rounds (0: skip)")
    p.add_argument("--base-verify-tasks", nargs="+", default=["retrieval"], choices=("retrieval", "vqa", "videoqa"),
                   help="section 4, blip-base: a set per task")
    p.add_argument("--base-verify-rounds", type=int, default=1,
                   help="section 4, blip-base: rounds (0: skip; each round runs the probes once, ~10 s on 2 cores)")
    p.add_argument("--skip-cold", action="store_true", help="skip section 2 (the only one needing ~3.3 GB)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: leave as is)")
    p.add_argument("--tmpdir", default=None, help="where to write the temporary backbone and sets")
    return p.parse_args(argv)


def busy_cpu_seconds() -> float | None:
    """CPU seconds every process on the machine has used since boot (Linux /proc/stat), or None."""
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        return (sum(values) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait
    except (OSError, ValueError, IndexError):
        return None


def own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def foreign_share(busy_start: float | None, own_start: float, wall: float) -> str:
    """Share of the machine's CPUs that other processes used during the run."""
    busy_end = busy_cpu_seconds()
    if busy_start is None or busy_end is None or wall <= 0:
        return "n/a"
    other = (busy_end - busy_start) - (own_cpu_seconds() - own_start)
    return f"{max(other, 0.0) / (wall * (os.cpu_count() or 1)):.0%}"


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def print_header() -> None:
    print(f"hot_swap: torch {torch.__version__}, python {platform.python_version()}, "
          f"{torch.get_num_threads()} intra-op / {torch.get_num_interop_threads()} inter-op threads, "
          f"{os.cpu_count()} CPUs, device cpu, fp32")
    print(f"  load average {load_average()} at start")
    print("  medians over interleaved rounds; ratios are ratios of medians")


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start, busy, own = time.perf_counter(), busy_cpu_seconds(), own_cpu_seconds()
    print_header()
    with tempfile.TemporaryDirectory(prefix="hot-swap-", dir=args.tmpdir) as tmp:
        root = Path(tmp)
        bench_small(args, root)
        collect()
        if args.verify_rounds > 0:
            bench_verified(demo_setup(), root, args, args.verify_rounds, args.verify_tasks)
            collect()
        bench_base(args, root)
    wall = time.perf_counter() - start
    print(f"\nwall time {wall:.1f} s; other processes used {foreign_share(busy, own, wall)} of the CPUs meanwhile "
          "(more than ~10%: the numbers above are skewed)")


if __name__ == "__main__":
    main()
