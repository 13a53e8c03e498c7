"""A small Prometheus registry (counters, gauges, histograms with labels) and its text format."""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable, Iterable

LabelKey = tuple[tuple[str, str], ...]

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


def _key(labels: dict[str, str]) -> LabelKey:
    return tuple(sorted(labels.items()))


def _fmt(labels: LabelKey, extra: tuple[tuple[str, str], ...] = ()) -> str:
    items = list(labels) + list(extra)
    if not items:
        return ""
    body = ",".join(f'{k}="{v.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"' for k, v in items)
    return "{" + body + "}"


class Metric:
    def __init__(self, name: str, help_text: str, kind: str) -> None:
        self.name, self.help, self.kind = name, help_text, kind
        self._lock = threading.Lock()

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(Metric):
    def __init__(self, name: str, help_text: str) -> None:
        super().__init__(name, help_text, "counter")
        self._values: dict[LabelKey, float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = _key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        with self._lock:
            return self._values.get(_key(labels), 0.0)

    def render(self) -> list[str]:
        with self._lock:
            return [f"{self.name}{_fmt(k)} {v:g}" for k, v in sorted(self._values.items())]


class Gauge(Metric):
    """A value read from a callback at scrape time (or set directly). `kind="counter"` exports a
    monotonic count kept elsewhere (e.g. the adapter manager's statistics)."""

    def __init__(self, name: str, help_text: str, kind: str = "gauge") -> None:
        super().__init__(name, help_text, kind)
        self._values: dict[LabelKey, float] = {}
        self._callbacks: list[Callable[[], Iterable[tuple[dict[str, str], float]]]] = []

    def set(self, value: float, **labels: str) -> None:
        with self._lock:
            self._values[_key(labels)] = value

    def collect_from(self, fn: Callable[[], Iterable[tuple[dict[str, str], float]]]) -> None:
        self._callbacks.append(fn)

    def render(self) -> list[str]:
        with self._lock:
            values = dict(self._values)
        for fn in self._callbacks:
            for labels, v in fn():
                values[_key(labels)] = v
        return [f"{self.name}{_fmt(k)} {v:g}" for k, v in sorted(values.items())]


class Histogram(Metric):
    def __init__(self, name: str, help_text: str, buckets: tuple[float, ...]) -> None:
        super().__init__(name, help_text, "histogram")
        self.buckets = buckets
        self._data: dict[LabelKey, tuple[list[int], float, int]] = {}

    def observe(self, value: float, **labels: str) -> None:
        key = _key(labels)
        with self._lock:
            counts, total, n = self._data.get(key, ([0] * len(self.buckets), 0.0, 0))
            i = bisect.bisect_left(self.buckets, value)
            if i < len(counts):
                counts[i] += 1
            self._data[key] = (counts, total + value, n + 1)

    def count(self, **labels: str) -> int:
        with self._lock:
            return self._data.get(_key(labels), ([], 0.0, 0))[2]

    def render(self) -> list[str]:
        lines: list[str] = []
        with self._lock:
            for key, (counts, total, n) in sorted(self._data.items()):
                cumulative = 0
                for bound, c in zip(self.buckets, counts, strict=True):
                    cumulative += c
                    lines.append(f"{self.name}_bucket{_fmt(key, (('le', f'{bound:g}'),))} {cumulative}")
                lines.append(f"{self.name}_bucket{_fmt(key, (('le', '+Inf'),))} {n}")
                lines.append(f"{self.name}_sum{_fmt(key)} {total:g}")
                lines.append(f"{self.name}_count{_fmt(key)} {n}")
        return lines


class Registry:
    def __init__(self) -> None:
        self._metrics: list[Metric] = []

    def counter(self, name: str, help_text: str) -> Counter:
        return self._add(Counter(name, help_text))

    def gauge(self, name: str, help_text: str, kind: str = "gauge") -> Gauge:
        return self._add(Gauge(name, help_text, kind))

    def histogram(self, name: str, help_text: str, buckets: tuple[float, ...]) -> Histogram:
        return self._add(Histogram(name, help_text, buckets))

    def _add(self, metric):  # type: ignore[no-untyped-def]
        self._metrics.append(metric)
        return metric

    def render(self) -> str:
        lines: list[str] = []
        for m in self._metrics:
            lines += m.header()
            lines += m.render()  # type: ignore[attr-defined]
        return "\n".join(lines) + "\n"


class ServiceMetrics:
    """Every metric the service exports, in one place."""

    def __init__(self) -> None:
        r = self.registry = Registry()
        self.requests = r.counter("uniadapter_requests_total", "HTTP requests by route and status code.")
        self.latency = r.histogram("uniadapter_request_latency_seconds", "Request latency by route.",
                                   LATENCY_BUCKETS)
        self.queue_depth = r.gauge("uniadapter_queue_depth", "Jobs waiting per batcher stage.")
        self.batch_size = r.histogram("uniadapter_batch_size", "Jobs per executed batch, by stage.", BATCH_BUCKETS)
        self.batch_adapters = r.histogram("uniadapter_batch_adapter_sets",
                                          "Distinct adapter sets (bare counts as one) per batch, by stage.",
                                          BATCH_BUCKETS)
        self.mixed_batches = r.counter("uniadapter_mixed_batches_total",
                                       "Batches that carried samples of more than one adapter set.")
        self.rejected = r.counter("uniadapter_rejected_total",
                                  "Jobs not run, by reason (queue_full, deadline, cancelled).")
        self.adapter_events = r.gauge("uniadapter_adapter_events_total",
                                      "Adapter manager events: device_hits, cpu_hits, disk_loads, evictions, unloads.",
                                      kind="counter")
        self.cache = r.counter("uniadapter_embedding_cache_total", "Embedding cache lookups by result (hit, miss).")

    def render(self) -> str:
        return self.registry.render()
