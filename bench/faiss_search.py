"""FAISS search on the service's collections: latency, throughput, recall and memory (CPU).

The service stores L2-normalised 256-d ITC embeddings and ranks them by inner product. The
design target for a large collection is: 1 M vectors, top-10 in under 10 ms per query on CPU,
with recall@10 >= 0.95 against exact search. This measures, in one run, for each collection
size (`--sizes`) and two kinds of random data:

- `clustered`: `--clusters` Gaussian clusters around random unit centres, then normalised;
  queries are drawn the same way around the same centres. The noise is anisotropic (variance
  ~ rank^-1, a low effective dimension like real embeddings have) and randomly rotated, with
  expected norm 1.5 against the unit centre: top-10 cosines come out around 0.5-0.6 and
  IVF-Flat needs a few tens of probes (1 M) to a hundred (100 k) for recall@10 0.95.
  (Isotropic, well-separated clusters are trivial: recall 1.0 at nprobe 8.)
- `uniform`: uniform on the unit sphere, queries too (the hardest case for approximate indexes:
  the true neighbours are barely closer than any other vector);

the indexes, all with METRIC_INNER_PRODUCT:

- `IDMap2,Flat`: exact `IndexIDMap2(IndexFlatIP)`, the ground truth and the baseline;
- `IVF{nlist},Flat` with nlist ~ 4*sqrt(N), for each `--nprobes` value;
- `IVF{nlist},PQ32np` (32 B codes, no polysemous training) on the same coarse centroids, for
  each `--pq-nprobes` value: the memory-saving option;
- `HNSW32,Flat` (efConstruction `--ef-construction`), for each `--ef-search` value. Its build
  is the slow one (5-10 minutes for 1 M vectors on 2 cores): with `--hnsw auto` (default) it is
  built for N <= `--hnsw-always-upto` (100 k), and at larger sizes only when its build time,
  extrapolated from the sizes already built, fits in what is left of `--budget`; skips are
  printed.

Per index and search parameter: build time (train + add), memory (serialised bytes per vector,
and the growth of the process' resident memory during the build), latency of one query at a
time (median and p95 over `--latency-queries` queries, with 1 thread and with all OpenMP
threads), batch throughput (all `--queries` queries in one call, all threads) and recall@10 of
the batch results against the exact index. Then, per size, a verdict on the target and, for
the largest size, the recommended default (factory string + search parameter).

Run from the repository root:

    .venv/bin/python bench/faiss_search.py
    .venv/bin/python bench/faiss_search.py --sizes 100000 --queries 500
    .venv/bin/python bench/faiss_search.py --hnsw all          # also HNSW at 1 M (+5-10 min)

The default run takes about 5 minutes on an idle 2-core machine (about 10 when other processes
compete for the cores: the load average is printed) and peaks at about 2.5 GB resident.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import math
import os
import platform
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import faiss
import numpy as np

DIM = 256
K = 10
TARGET_MS = 10.0
"""Largest acceptable per-query latency (p95, one query at a time)."""
TARGET_RECALL = 0.95
"""Smallest acceptable recall@10 against exact search."""
CHUNK = 100_000
"""Rows generated at a time: keeps float temporaries small next to the 1 GB data array."""
HNSW_M = 32
PQ_M = 32
HNSW_S_PER_VEC_2CORES = 3e-4
"""HNSW32 build seconds per vector (efConstruction 80, 2 cores, 1 M): used when nothing was built yet."""
PQ_ITER = 10
"""k-means iterations per PQ sub-quantizer (faiss default 25: ~40 s more per build on 2 cores)."""


@dataclass
class Row:
    """One index at one search parameter, on one data set."""

    size: int
    data: str
    index: str
    param: str
    build_s: float | None
    bytes_per_vec: float
    rss_mb: float | None
    lat1: tuple[float, float, int]
    latn: tuple[float, float, int]
    qps: float
    recall: float

    @property
    def worst_p95(self) -> float:
        return max(self.lat1[1], self.latn[1])

    @property
    def meets(self) -> bool:
        return self.worst_p95 < TARGET_MS and self.recall >= TARGET_RECALL


@dataclass
class Budget:
    """Wall-clock bookkeeping for the `--hnsw auto` decision."""

    total_s: float
    start: float = field(default_factory=time.perf_counter)
    hnsw_rates: list[tuple[int, float]] = field(default_factory=list)
    """(size, build seconds) of every HNSW built so far."""
    skipped: list[str] = field(default_factory=list)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def hnsw_estimate(self, n: int) -> float | None:
        """Build seconds for n vectors, from the largest build so far, scaled as n log n."""
        if not self.hnsw_rates:
            return None
        n0, s0 = max(self.hnsw_rates)
        return s0 * (n / n0) * (math.log(n) / math.log(n0))


# --------------------------------------------------------------------------- data


def _rng(seed: int, *salt: int) -> np.random.Generator:
    return np.random.default_rng([seed, *salt])


def uniform_sphere(n: int, rng: np.random.Generator) -> np.ndarray:
    """n x DIM float32, uniform on the unit sphere."""
    x = np.empty((n, DIM), dtype=np.float32)
    for lo in range(0, n, CHUNK):
        block = rng.standard_normal((min(CHUNK, n - lo), DIM), dtype=np.float32)
        faiss.normalize_L2(block)
        x[lo : lo + len(block)] = block
    return x


def noise_std(spread: float, decay: float) -> np.ndarray:
    """Per-axis noise std: variance ~ rank**-decay, total expected norm `spread`."""
    var = np.arange(1, DIM + 1, dtype=np.float64) ** -decay
    return (np.sqrt(var / var.sum()) * spread).astype(np.float32)


def effective_dim(decay: float) -> float:
    """Participation ratio (sum var)^2 / sum var^2 of the noise spectrum."""
    var = np.arange(1, DIM + 1, dtype=np.float64) ** -decay
    return float(var.sum() ** 2 / (var**2).sum())


def clustered(
    n: int, centres: np.ndarray, std: np.ndarray, rotation: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """n x DIM float32: a random centre plus rotated anisotropic Gaussian noise, normalised."""
    x = np.empty((n, DIM), dtype=np.float32)
    for lo in range(0, n, CHUNK):
        m = min(CHUNK, n - lo)
        block = rng.standard_normal((m, DIM), dtype=np.float32)
        block *= std
        block = block @ rotation
        block += centres[rng.integers(0, len(centres), m)]
        faiss.normalize_L2(block)
        x[lo : lo + m] = block
    return x


def make_data(kind: str, n: int, nq: int, args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray]:
    """Database and queries of one kind; the same seed gives the same vectors."""
    rng = _rng(args.seed, n, 0 if kind == "clustered" else 1)
    if kind == "uniform":
        return uniform_sphere(n, rng), uniform_sphere(nq, rng)
    centres = uniform_sphere(args.clusters, rng)
    rotation = np.linalg.qr(rng.standard_normal((DIM, DIM)))[0].astype(np.float32)
    std = noise_std(args.cluster_spread, args.cluster_decay)
    return clustered(n, centres, std, rotation, rng), clustered(nq, centres, std, rotation, rng)


# --------------------------------------------------------------------------- measurements


def rss_mb() -> float:
    """Resident memory of this process, MiB (Linux), after handing freed heap pages back (glibc)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def serialized_bytes(index: faiss.Index) -> int:
    """Size of the index as written by faiss.write_index, counted without keeping a copy."""
    total = 0

    def sink(chunk: bytes) -> int:
        nonlocal total
        total += len(chunk)
        return len(chunk)

    writer = faiss.PyCallbackIOWriter(sink)
    faiss.write_index(index, writer)
    del writer
    return total


def single_query_latency(
    index: faiss.Index, queries: np.ndarray, threads: int, max_n: int, max_s: float
) -> tuple[float, float, int]:
    """(median ms, p95 ms, samples): one query per search call, up to max_n calls or max_s seconds."""
    faiss.omp_set_num_threads(threads)
    index.search(queries[:1], K)  # warm-up
    times: list[float] = []
    deadline = time.perf_counter() + max_s
    for i in range(min(max_n, len(queries))):
        q = queries[i : i + 1]
        t0 = time.perf_counter_ns()
        index.search(q, K)
        times.append((time.perf_counter_ns() - t0) / 1e6)
        if len(times) >= 20 and time.perf_counter() > deadline:
            break
    ms = np.asarray(times)
    return float(np.median(ms)), float(np.percentile(ms, 95)), len(times)


def batch_search(index: faiss.Index, queries: np.ndarray, threads: int) -> tuple[float, np.ndarray]:
    """(queries/s, ids): all queries in one call."""
    faiss.omp_set_num_threads(threads)
    t0 = time.perf_counter()
    _, ids = index.search(queries, K)
    return len(queries) / (time.perf_counter() - t0), ids


def recall_at_k(ids: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of the exact top-K found in the approximate top-K."""
    hits = sum(len(np.intersect1d(a[a >= 0], t)) for a, t in zip(ids, truth, strict=True))
    return hits / truth.size


@dataclass
class Built:
    index: faiss.Index
    name: str
    build_s: float
    bytes_per_vec: float
    rss_mb: float


def timed_build(name: str, n: int, threads: int, build: Callable[..., faiss.Index], *build_args: object) -> Built:
    """build(*build_args) with `threads` OpenMP threads, timed and sized."""
    faiss.omp_set_num_threads(threads)
    before = rss_mb()
    t0 = time.perf_counter()
    index = build(*build_args)
    seconds = time.perf_counter() - t0
    return Built(index, name, seconds, serialized_bytes(index) / n, rss_mb() - before)


def sweep(
    built: Built,
    param: str,
    values: Sequence[int],
    ctx: Context,
) -> list[Row]:
    """One row per search-parameter value (none when param is empty)."""
    rows = []
    space = faiss.ParameterSpace()
    for i, value in enumerate(values or [0]):
        if param:
            space.set_index_parameter(built.index, param, value)
        lat1 = single_query_latency(built.index, ctx.lat_queries, 1, ctx.lat_n, ctx.lat_max_s)
        latn = single_query_latency(built.index, ctx.lat_queries, ctx.threads, ctx.lat_n, ctx.lat_max_s)
        qps, ids = batch_search(built.index, ctx.queries, ctx.threads)
        row = Row(
            size=ctx.n,
            data=ctx.kind,
            index=built.name,
            param=f"{param}={value}" if param else "exact",
            build_s=built.build_s if i == 0 else None,
            bytes_per_vec=built.bytes_per_vec,
            rss_mb=built.rss_mb if i == 0 else None,
            lat1=lat1,
            latn=latn,
            qps=qps,
            recall=recall_at_k(ids, ctx.truth) if ctx.truth is not None else 1.0,
        )
        print(format_row(row), flush=True)
        rows.append(row)
    return rows


@dataclass
class Context:
    """One data set and the search settings shared by every index on it."""

    n: int
    kind: str
    queries: np.ndarray
    lat_queries: np.ndarray
    lat_n: int
    lat_max_s: float
    threads: int
    truth: np.ndarray | None = None


# --------------------------------------------------------------------------- indexes


def build_exact(x: np.ndarray) -> faiss.Index:
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(DIM))
    index.add_with_ids(x, np.arange(len(x), dtype=np.int64))
    return index


def nlist_for(n: int, factor: float) -> int:
    return max(1, round(factor * math.sqrt(n)))


def build_ivf(x: np.ndarray, nlist: int, train_per_list: int, seed: int) -> faiss.Index:
    """IVF{nlist},Flat trained on a random subsample of train_per_list * nlist vectors."""
    index = faiss.index_factory(DIM, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
    n_train = min(len(x), train_per_list * nlist)
    pick = np.sort(_rng(seed, len(x), 2).choice(len(x), n_train, replace=False))
    index.train(x[pick])
    del pick
    index.add(x)
    return index


def build_ivfpq(x: np.ndarray, centroids: np.ndarray, train_per_list: int, seed: int) -> faiss.Index:
    """IVF{nlist},PQ32 reusing the IVF-Flat coarse centroids: only the PQ codebooks are trained."""
    nlist = len(centroids)
    # "np": no polysemous training (only useful for Hamming-filtered search; ~1 min on 2 cores)
    index = faiss.index_factory(DIM, f"IVF{nlist},PQ{PQ_M}np", faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.extract_index_ivf(index)
    ivf.quantizer.add(centroids)  # trained coarse level: train() skips k-means
    faiss.downcast_index(ivf).pq.cp.niter = PQ_ITER
    n_train = min(len(x), train_per_list * nlist)
    pick = np.sort(_rng(seed, len(x), 3).choice(len(x), n_train, replace=False))
    index.train(x[pick])
    del pick
    index.add(x)
    return index


def build_hnsw(x: np.ndarray, ef_construction: int) -> faiss.Index:
    index = faiss.index_factory(DIM, f"HNSW{HNSW_M},Flat", faiss.METRIC_INNER_PRODUCT)
    faiss.downcast_index(index).hnsw.efConstruction = ef_construction
    index.add(x)
    return index


# --------------------------------------------------------------------------- one data set


def run_dataset(
    kind: str, n: int, args: argparse.Namespace, budget: Budget, reserve_s: Callable[[float], float]
) -> tuple[list[Row], float]:
    """All indexes on one data set; returns the rows and the seconds spent outside HNSW."""
    t0 = time.perf_counter()
    x, queries = make_data(kind, n, args.queries, args)
    ctx = Context(
        n=n,
        kind=kind,
        queries=queries,
        lat_queries=queries[: args.latency_queries],
        lat_n=args.latency_queries,
        lat_max_s=args.latency_max_s,
        threads=args.threads,
    )
    print(f"\n-- {n:,} x {DIM} {kind} (generated in {time.perf_counter() - t0:.1f} s)", flush=True)
    rows: list[Row] = []

    exact = timed_build("IDMap2,Flat", n, args.threads, build_exact, x)
    _, ctx.truth = exact.index.search(queries, K)  # ground truth, before timing anything
    rows += sweep(exact, "", [], ctx)
    del exact

    nlist = nlist_for(n, args.nlist_factor)
    ivf = timed_build(f"IVF{nlist},Flat", n, args.threads, build_ivf, x, nlist, args.train_per_list, args.seed)
    rows += sweep(ivf, "nprobe", [p for p in args.nprobes if p <= nlist], ctx)
    centroids = faiss.extract_index_ivf(ivf.index).quantizer.reconstruct_n(0, nlist)
    del ivf

    if args.pq_nprobes:
        pq = timed_build(
            f"IVF{nlist},PQ{PQ_M}np", n, args.threads, build_ivfpq, x, centroids, args.train_per_list, args.seed
        )
        rows += sweep(pq, "nprobe", [p for p in args.pq_nprobes if p <= nlist], ctx)
        del pq
    del centroids
    outside_hnsw = time.perf_counter() - t0

    if want_hnsw(n, args, budget, reserve_s(outside_hnsw)):
        hnsw = timed_build(f"HNSW{HNSW_M},Flat", n, args.threads, build_hnsw, x, args.ef_construction)
        budget.hnsw_rates.append((n, hnsw.build_s))
        rows += sweep(hnsw, "efSearch", args.ef_search, ctx)
        del hnsw
    del x, queries, ctx
    return rows, outside_hnsw


def want_hnsw(n: int, args: argparse.Namespace, budget: Budget, reserve_s: float) -> bool:
    """Whether to build HNSW here; prints and records why not."""
    if args.hnsw == "none" or not args.ef_search:
        return False
    if args.hnsw == "all" or n <= args.hnsw_always_upto:
        return True
    estimate = budget.hnsw_estimate(n)
    if estimate is None:
        estimate = HNSW_S_PER_VEC_2CORES * n
    left = budget.total_s - budget.elapsed() - reserve_s
    if estimate <= left:
        return True
    note = (
        f"HNSW{HNSW_M},Flat skipped at {n:,}: estimated build {estimate:.0f} s > {max(left, 0):.0f} s left of "
        f"--budget {budget.total_s:.0f} s (after reserving {reserve_s:.0f} s for the remaining data sets); "
        "pass --hnsw all to build it"
    )
    print(note, flush=True)
    budget.skipped.append(note)
    return False


# --------------------------------------------------------------------------- report


HEADER = (
    f"{'size':>9} {'data':<9} {'index':<14} {'param':<12} {'build s':>8} {'B/vec':>7} {'RSS+MB':>7} "
    f"{'1thr med/p95 ms':>16} {'Nthr med/p95 ms':>16} {'batch q/s':>10} {'R@10':>6} {'ok':>3}"
)


def format_row(r: Row) -> str:
    build = f"{r.build_s:8.1f}" if r.build_s is not None else f"{'':>8}"
    rss = f"{r.rss_mb:7.0f}" if r.rss_mb is not None else f"{'':>7}"
    lat1 = f"{r.lat1[0]:.2f}/{r.lat1[1]:.2f}"
    latn = f"{r.latn[0]:.2f}/{r.latn[1]:.2f}"
    return (
        f"{r.size:>9,} {r.data:<9} {r.index:<14} {r.param:<12} {build} {r.bytes_per_vec:7.0f} {rss} "
        f"{lat1:>16} {latn:>16} {r.qps:10.0f} {r.recall:6.3f} {'yes' if r.meets else 'no':>3}"
    )


def describe(r: Row) -> str:
    return (
        f"{r.index} {r.param}: p95 {r.worst_p95:.2f} ms ({TARGET_MS / r.worst_p95:.1f}x under {TARGET_MS:g} ms), "
        f"recall@10 {r.recall:.3f} ({r.recall - TARGET_RECALL:+.3f} vs {TARGET_RECALL})"
    )


def verdict(rows: list[Row], n: int) -> None:
    """Per data kind at size n: the cheapest configuration meeting the target, or the best miss."""
    for kind in dict.fromkeys(r.data for r in rows if r.size == n):
        mine = [r for r in rows if r.size == n and r.data == kind]
        ok = sorted((r for r in mine if r.meets), key=lambda r: r.lat1[0])
        if ok:
            print(f"VERDICT {n:,} {kind}: {len(ok)} config(s) meet the target; fastest: {describe(ok[0])}")
        else:
            approx = [r for r in mine if r.param != "exact"]
            best = max(approx, key=lambda r: (r.recall, -r.worst_p95), default=None)
            why = f"; best recall: {describe(best)}" if best else ""
            print(f"VERDICT {n:,} {kind}: no configuration meets the target{why}")


def recommend(rows: list[Row], n: int) -> None:
    """Default for size n: the fastest index+param (exact search included) meeting the target on every data kind."""
    kinds = list(dict.fromkeys(r.data for r in rows if r.size == n))
    by_config: dict[tuple[str, str], list[Row]] = {}
    for r in rows:
        if r.size == n:
            by_config.setdefault((r.index, r.param), []).append(r)
    everywhere = [rs for rs in by_config.values() if len(rs) == len(kinds) and all(r.meets for r in rs)]
    realistic = [rs for rs in by_config.values() if any(r.data == "clustered" and r.meets for r in rs)]
    if everywhere:
        pick, scope = min(everywhere, key=lambda rs: max(r.lat1[0] for r in rs)), "on every data kind"
    elif realistic:
        pick = min(realistic, key=lambda rs: next(r.lat1[0] for r in rs if r.data == "clustered"))
        scope = "on clustered data only (uniform data misses the target)"
    else:
        print(f"RECOMMENDATION {n:,}: nothing measured meets the target")
        return
    index, param = pick[0].index, pick[0].param
    print(f"RECOMMENDATION {n:,}: factory '{index}' (METRIC_INNER_PRODUCT) with {param}, meets the target {scope}:")
    for r in pick:
        print(f"    {r.data}: {describe(r)}")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> str:
    return "/".join(f"{v:.1f}" for v in os.getloadavg())


def print_header(args: argparse.Namespace) -> None:
    print(
        f"faiss {faiss.__version__} ({faiss.get_compile_options().strip()}), numpy {np.__version__}, "
        f"python {platform.python_version()}"
    )
    print(
        f"CPU: {cpu_model()}; os.cpu_count()={os.cpu_count()}, usable={len(os.sched_getaffinity(0))}; "
        f"OpenMP threads: 1thr=1, Nthr/batch={args.threads} (faiss.omp_get_max_threads()); "
        f"load average 1/5/15 min at start: {load_average()}"
    )
    print(
        f"d={DIM}, k={K}, queries={args.queries}, latency sample={args.latency_queries} queries "
        f"(<= {args.latency_max_s:g} s per cell, min 20), nlist={args.nlist_factor:g}*sqrt(N), "
        f"IVF k-means on {args.train_per_list}*nlist vectors (10 iterations), HNSW efConstruction="
        f"{args.ef_construction}; clustered: {args.clusters} clusters, noise norm {args.cluster_spread:g}, variance "
        f"~ rank^-{args.cluster_decay:g} (effective dim {effective_dim(args.cluster_decay):.0f}), randomly rotated"
    )
    print(
        f"target: one query at a time, p95 (worst of 1thr and Nthr) < {TARGET_MS:g} ms and recall@10 >= "
        f"{TARGET_RECALL}; B/vec = faiss.write_index size / N; RSS+MB = resident growth during the build"
    )


def int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int_list, default=int_list("100000,1000000"), help="collection sizes")
    p.add_argument("--data", type=lambda s: s.split(","), default=["clustered", "uniform"], help="data kinds")
    p.add_argument("--queries", type=int, default=1000, help="queries for recall and batch throughput")
    p.add_argument("--latency-queries", type=int, default=200, help="single-query latency sample size")
    p.add_argument("--latency-max-s", type=float, default=4.0, help="time cap per latency cell (exact search)")
    p.add_argument("--nprobes", type=int_list, default=int_list("8,16,32,64,128,256,512"), help="IVF-Flat nprobe")
    p.add_argument("--pq-nprobes", type=int_list, default=int_list("16,64"), help="IVF-PQ nprobe ('' to skip)")
    p.add_argument("--ef-search", type=int_list, default=int_list("64,128,256,512"), help="HNSW efSearch")
    p.add_argument("--ef-construction", type=int, default=80, help="HNSW efConstruction")
    p.add_argument("--hnsw", choices=["auto", "all", "none"], default="auto", help="when to build HNSW")
    p.add_argument("--hnsw-always-upto", type=int, default=100_000, help="--hnsw auto: always build up to this N")
    p.add_argument("--budget", type=float, default=420.0, help="--hnsw auto: seconds the run should fit in")
    p.add_argument("--nlist-factor", type=float, default=4.0, help="nlist = factor * sqrt(N)")
    p.add_argument("--train-per-list", type=int, default=64, help="IVF training vectors per list")
    p.add_argument("--clusters", type=int, default=1000, help="clusters in the clustered data")
    p.add_argument("--cluster-spread", type=float, default=1.5, help="expected noise norm around a unit centre")
    p.add_argument("--cluster-decay", type=float, default=1.0, help="noise variance ~ rank**-decay")
    p.add_argument("--threads", type=int, default=faiss.omp_get_max_threads(), help="threads for Nthr and batch")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    args.sizes = sorted(args.sizes)
    bad = set(args.data) - {"clustered", "uniform"}
    if bad:
        p.error(f"unknown --data kind(s): {sorted(bad)}")
    return args


def main() -> None:
    args = parse_args()
    print_header(args)
    budget = Budget(args.budget)
    plan = [(n, kind) for n in args.sizes for kind in args.data]
    rows: list[Row] = []
    print("\n" + HEADER)
    for i, (n, kind) in enumerate(plan):
        rest = plan[i + 1 :]

        def reserve(outside_s: float, n: int = n, rest: list[tuple[int, str]] = rest) -> float:
            # the rest's non-HNSW work, scaled linearly from this data set's (exact for the same size)
            return sum(outside_s * m / n for m, _ in rest)

        new, _ = run_dataset(kind, n, args, budget, reserve)
        rows += new
        if not rest or rest[0][0] != n:
            print()
            verdict(rows, n)
    faiss.omp_set_num_threads(args.threads)

    print("\n" + HEADER)
    for r in rows:
        print(format_row(r))
    print()
    for n in args.sizes:
        verdict(rows, n)
    for note in budget.skipped:
        print("SKIPPED " + note)
    recommend(rows, args.sizes[-1])
    print(
        "note: IVF and HNSW parallelise a search over its queries, so a 1-query search runs on one core "
        "(1thr ~ Nthr); the exact scan with Nthr > 1 can be several times slower than with 1 thread when other "
        "processes hold the cores. Threads pay off in batches (batch q/s, all threads)."
    )
    print(
        f"wall time {budget.elapsed():.0f} s, peak RSS {peak_rss_mb():.0f} MiB, "
        f"load average now {load_average()} (other processes compete for the cores when it exceeds the core count)"
    )


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


if __name__ == "__main__":
    main()
