"""Hot-swapping adapter sets on one frozen BLIP backbone (CPU, fp32): swap, cold load, mixed batches.

Three measurements, each printed with its median and, where there is a target, the ratio or
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

The defaults take about 75 s on two cores and peak near 3.3 GB of memory (two BLIP-base
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
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from benchkit import half_iqr, rotating_rounds
from safetensors.torch import save_file

from uniadapter_serve.adapters.format import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    BackboneInfo,
    check_compatible,
    read_adapter_meta,
)
from uniadapter_serve.adapters.manager import AdapterManager
from uniadapter_serve.adapters.registry import AdapterRegistry
from uniadapter_serve.model.backbone import BlipBackbone
from uniadapter_serve.model.loading import load_backbone, random_backbone
from uniadapter_serve.model.routing import Routing
from uniadapter_serve.model.testing import random_adapter, random_batch
from uniadapter_serve.model.uniadapter import AdapterSetModule, UniAdapterConfig

SWAP_TARGET_S = 1e-3
COLD_TARGET_S = 0.3
COLD_RATIO_TARGET = 50.0
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
    if args.skip_cold and not batches:
        return
    start = time.perf_counter()
    backbone = build_backbone("blip-base")
    print(f"\n(blip-base backbone built in {time.perf_counter() - start:.1f} s)")
    if not args.skip_cold:
        bench_cold(args, root, backbone)
    if batches:
        config = UniAdapterConfig.for_task("retrieval", bottleneck=args.cold_bottleneck)
        modules = [random_adapter(backbone, config, seed=10 + k) for k in range(N_SETS)]
        bench_mixed(backbone, modules, "blip-base", batches, args.base_rounds, args.base_min_time)
        del modules
    del backbone
    collect()


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
        bench_base(args, root)
    wall = time.perf_counter() - start
    print(f"\nwall time {wall:.1f} s; other processes used {foreign_share(busy, own, wall)} of the CPUs meanwhile "
          "(more than ~10%: the numbers above are skewed)")


if __name__ == "__main__":
    main()
