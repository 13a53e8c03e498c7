"""Latency overhead of a UniAdapter adapter set over the bare BLIP backbone (CPU, fp32).

For each backbone config and each adapter bottleneck, this times the two retrieval (ITC)
forward paths with the whole batch routed to one random retrieval adapter set, against the
same path with no set (`Routing.none`):

- image: `encode_image` + `image_features` (ViT with the visual branch in every block);
- text:  `text_features` (text-only BERT with the textual branch in every layer).

Machines are noisy, so the variants are measured side by side in one run: every round times
the bare path and each adapter set once (the order rotates from round to round), each sample
being the mean of enough calls to last `--min-time` seconds; the table reports the median
sample of each variant and the ratio adapter/bare of those medians, next to the target
(<= 1.15x). `spread` is half the inter-quartile range of the per-round paired ratios: an
"over" within it is noise. Weights are random: latency does not depend on their values.

Run from the repository root:

    .venv/bin/python bench/adapter_overhead.py
    .venv/bin/python bench/adapter_overhead.py --configs blip-base --bottlenecks 64,128,512 --rounds 9 --threads 4

The defaults (blip-demo and blip-base, bottlenecks 64 and 512) take about 2-3 minutes on two quiet
cores. On a machine shared with other jobs, wall-clock samples swing by 2-4x; `--clock cpu --threads 1`
times CPU seconds instead, which time spent waiting for a core does not inflate, for steadier ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from benchkit import half_iqr, rotating_rounds

from uniadapter_serve.model.backbone import BlipBackbone
from uniadapter_serve.model.loading import random_backbone
from uniadapter_serve.model.routing import Routing
from uniadapter_serve.model.testing import random_adapter, random_batch
from uniadapter_serve.model.uniadapter import AdapterSetModule, UniAdapterConfig

TARGET = 1.15
"""Largest acceptable adapter/bare latency ratio."""
TASK_COMPONENTS = ("vision_model", "text_encoder", "heads")
"""Backbone parts on the retrieval path: the denominator of the tunable share."""
TEXT_LEN = 32
LARGE = {"blip-base"}
"""Configs sized like the real model: small batches, one call per sample."""

Call = Callable[[], torch.Tensor]
Clock = Callable[[], float]
CLOCKS: dict[str, Clock] = {"wall": time.perf_counter, "cpu": time.process_time}
"""wall: latency. cpu: CPU seconds of all the process's threads, which time spent descheduled
does not inflate (steadier on a shared machine; with N threads it reads about N x wall)."""


@dataclass(frozen=True)
class Case:
    path: str
    batch: int


@dataclass(frozen=True)
class Row:
    config: str
    bottleneck: int
    tunable_pct: float
    case: Case
    bare_ms: float
    adapter_ms: float
    spread: float

    @property
    def ratio(self) -> float:
        return self.adapter_ms / self.bare_ms


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="blip-demo,blip-base", help="comma-separated bundled configs")
    p.add_argument("--bottlenecks", default="64,512", help="comma-separated adapter bottleneck widths")
    p.add_argument("--rounds", type=int, default=7, help="timed rounds per case (each variant once per round)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per variant before the rounds")
    p.add_argument("--min-time", type=float, default=0.05, help="seconds of calls averaged into one sample")
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                   help="wall: latency (default); cpu: process CPU time, steadier on a shared machine")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: leave as is)")
    return p.parse_args(argv)


def csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def cases_for(config: str) -> list[Case]:
    if config in LARGE:
        return [Case("image", 1), Case("image", 4), Case("text", 8)]
    return [Case("image", 1), Case("image", 16), Case("text", 16), Case("text", 64)]


def build_backbone(config: str) -> BlipBackbone:
    return random_backbone(config, seed=0).requires_grad_(False).eval()


def task_parameters(backbone: BlipBackbone) -> int:
    counts = backbone.component_parameters()
    return sum(counts.get(c, 0) for c in TASK_COMPONENTS)


def make_call(backbone: BlipBackbone, case: Case, adapter: AdapterSetModule | None) -> Call:
    batch = random_batch(backbone, case.batch, seed=1, text_len=TEXT_LEN)
    routing = Routing.single(adapter, case.batch)
    if case.path == "image":
        pixels = batch.pixel_values
        return lambda: backbone.image_features(backbone.encode_image(pixels, routing), routing)
    ids, mask = batch.input_ids, batch.attention_mask
    return lambda: backbone.text_features(ids, mask, routing)


def timed(call: Call) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    out = call()
    return out, time.perf_counter() - start


def sample_ms(call: Call, n: int, clock: Clock) -> float:
    start = clock()
    for _ in range(n):
        call()
    return (clock() - start) * 1e3 / n


def warm_up(calls: Sequence[Call], warmup: int, label: str) -> float:
    """`warmup` untimed passes over the variants (at least one, which checks that every adapter
    set changes the output); returns the bare call's duration (s) to size the samples."""
    first = [timed(call) for call in calls]
    for k, (out, _) in enumerate(first[1:], start=1):
        if torch.allclose(first[0][0], out):
            print(f"warning: {label}: adapter set {k} leaves the output unchanged")
    for _ in range(warmup - 1):
        for call in calls:
            timed(call)
    elapsed = first[0][1]
    if elapsed < 1.0:  # cheap: a first call is often slow, so time one more
        elapsed = min(elapsed, timed(calls[0])[1])
    return elapsed


def measure(calls: Sequence[Call], args: argparse.Namespace, label: str) -> list[list[float]]:
    """Per variant, one sample (ms per call) per round; variants interleaved, order rotating."""
    elapsed = warm_up(calls, args.warmup, label)
    n = max(1, round(args.min_time / max(elapsed, 1e-6)))
    return rotating_rounds([lambda c=c: sample_ms(c, n, CLOCKS[args.clock]) for c in calls], args.rounds)


def bench_config(config: str, bottlenecks: Sequence[int], args: argparse.Namespace) -> list[Row]:
    start = time.perf_counter()
    backbone = build_backbone(config)
    adapters = {
        b: random_adapter(backbone, UniAdapterConfig.for_task("retrieval", bottleneck=b), seed=b)
        for b in bottlenecks
    }
    print(f"# {config}: built backbone and {len(adapters)} adapter sets in {time.perf_counter() - start:.1f} s")
    base = task_parameters(backbone)
    rows: list[Row] = []
    for case in cases_for(config):
        t0 = time.perf_counter()
        bare = make_call(backbone, case, None)
        adapted = [make_call(backbone, case, a) for a in adapters.values()]
        samples = measure([bare, *adapted], args, f"{config} {case.path} x{case.batch}")
        bare_ms = statistics.median(samples[0])
        for (b, adapter), times in zip(adapters.items(), samples[1:], strict=True):
            paired = [a / s for a, s in zip(times, samples[0], strict=True)]
            rows.append(Row(config, b, 100 * adapter.num_parameters() / base, case, bare_ms,
                            statistics.median(times), half_iqr(paired)))
        print(f"#   {case.path} x{case.batch}: {time.perf_counter() - t0:.1f} s")
    return rows


HEADER = ("config", "bottleneck", "tunable %", "path", "batch", "bare ms", "adapter ms", "ratio", "spread",
          f"<= {TARGET:.2f}x")


def format_row(row: Row) -> tuple[str, ...]:
    verdict = "ok" if row.ratio <= TARGET else "over"
    return (row.config, str(row.bottleneck), f"{row.tunable_pct:.2f}", row.case.path, str(row.case.batch),
            f"{row.bare_ms:.2f}", f"{row.adapter_ms:.2f}", f"{row.ratio:.3f}x", f"±{row.spread:.3f}", verdict)


def align(cells: Sequence[str], widths: Sequence[int]) -> str:
    """First column left-aligned, the others right-aligned."""
    return "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))


def print_table(rows: Sequence[Row]) -> None:
    ordered = sorted(rows, key=lambda r: (r.config, r.bottleneck, r.case.path, r.case.batch))
    body = [format_row(r) for r in ordered]
    widths = [max(len(line[i]) for line in (HEADER, *body)) for i in range(len(HEADER))]
    print(align(HEADER, widths))
    print(align(["-" * w for w in widths], widths))
    for line in body:
        print(align(line, widths))


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    configs, bottlenecks = csv(args.configs), [int(b) for b in csv(args.bottlenecks)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.clock} clock, "
          f"rounds {args.rounds}, warmup {args.warmup}, min sample {args.min_time * 1e3:.0f} ms")
    start = time.perf_counter()
    rows: list[Row] = []
    with torch.inference_mode():
        for config in configs:
            rows += bench_config(config, bottlenecks, args)
    print()
    print_table(rows)
    print(f"\ntotal {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
