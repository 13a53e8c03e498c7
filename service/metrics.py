"""Every metric the service exports, on prometheus-client (one registry per service, so several apps
in one process, as in tests, do not collide)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
COMPUTE_BUCKETS = (0.001, 0.0025, *LATENCY_BUCKETS)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)

Samples = Callable[[], Iterable[tuple[dict[str, str], float]]]
"""-> (labels, value) pairs, read at scrape time"""


class CallbackMetric(Collector):
    """A gauge (or a counter kept elsewhere, e.g. the adapter manager's statistics) whose values are
    read from callbacks at scrape time."""

    def __init__(self, name: str, documentation: str, labels: tuple[str, ...] = (), kind: str = "gauge") -> None:
        self.name, self.documentation, self.labels, self.kind = name, documentation, labels, kind
        self._callbacks: list[Samples] = []

    def collect_from(self, fn: Samples) -> None:
        self._callbacks.append(fn)

    def collect(self) -> Iterator[Metric]:
        family: GaugeMetricFamily | CounterMetricFamily
        if self.kind == "counter":
            family = CounterMetricFamily(self.name, self.documentation, labels=list(self.labels))
        else:
            family = GaugeMetricFamily(self.name, self.documentation, labels=list(self.labels))
        for fn in self._callbacks:
            for labels, value in fn():
                family.add_metric([labels[k] for k in self.labels], value)
        yield family

    def describe(self) -> Iterator[Metric]:
        return iter(())


class ServiceMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("uniadapter_requests", "HTTP requests by route and status code.",
                                ["route", "status"], registry=r)
        self.latency = Histogram("uniadapter_request_latency_seconds", "Request latency by route.", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("uniadapter_requests_in_flight",
                               "HTTP requests being handled now (probes and /metrics not counted).", registry=r)
        self.queue_depth = self._callback("uniadapter_queue_depth", "Jobs waiting per batcher stage.", ("stage",))
        self.batch_size = Histogram("uniadapter_batch_size", "Jobs per executed batch, by stage.", ["stage"],
                                    buckets=BATCH_BUCKETS, registry=r)
        self.batch_adapters = Histogram("uniadapter_batch_adapter_sets",
                                        "Distinct adapter sets (bare counts as one) per batch, by stage.", ["stage"],
                                        buckets=BATCH_BUCKETS, registry=r)
        self.mixed_batches = Counter("uniadapter_mixed_batches",
                                     "Batches that carried samples of more than one adapter set.", ["stage"],
                                     registry=r)
        self.stage_compute = Histogram("uniadapter_stage_compute_seconds",
                                       "Model compute time per executed batch, by stage.", ["stage"],
                                       buckets=COMPUTE_BUCKETS, registry=r)
        self.stage_queue = Histogram("uniadapter_stage_queue_seconds",
                                     "Time a job waited for its batch to run (adapter leases included), by stage.",
                                     ["stage"], buckets=COMPUTE_BUCKETS, registry=r)
        self.request_phase = Histogram("uniadapter_request_phase_seconds",
                                       "Where requests' time goes, by route and phase (decode, queue, compute, "
                                       "replica; the same split as the Server-Timing header).", ["route", "phase"],
                                       buckets=COMPUTE_BUCKETS, registry=r)
        self.rejected = Counter("uniadapter_rejected", "Jobs not run, by reason (queue_full, deadline, cancelled).",
                                ["reason"], registry=r)
        self.adapter_events = self._callback(
            "uniadapter_adapter_events", "Adapter manager events: device_hits, cpu_hits, disk_loads, evictions, "
            "unloads.", ("event",), kind="counter")
        self.golden_checks = self._callback(
            "uniadapter_golden_checks", "Golden-record checks before serving, by subject (set, backbone) and result "
            "(pass, mismatch, unrecorded, recorded).", ("subject", "result"), kind="counter")
        self.self_checks = Counter("uniadapter_self_checks", "Rows of mixed-set batches recomputed alone and "
                                   "compared, by stage and result (pass, mismatch).", ["stage", "result"], registry=r)
        self.cache = Counter("uniadapter_embedding_cache", "Embedding cache lookups by result (hit, miss).",
                             ["result"], registry=r)
        self.decode_pixels = self._callback("uniadapter_decode_pixels",
                                            "Pixels held by uploads being decoded now (the decode budget in use).")
        self.decode_waits = self._callback("uniadapter_decode_budget_waits",
                                           "Decodes that waited for the budget, and those that gave up (outcome).",
                                           ("outcome",), kind="counter")
        self.decode_class_pixels = self._callback(
            "uniadapter_decode_class_pixels", "Pixels of the decode budget held now, by class (task: task routes; "
            "bulk: collection adds, re-indexing, thumbnails, at most DECODE_BULK_SHARE of it).", ("class",))
        self.decode_waiting = self._callback("uniadapter_decode_waiting",
                                             "Decodes waiting for the decode budget now, by class.", ("class",))
        self.decode_class_waits = self._callback("uniadapter_decode_class_waits",
                                                 "Decodes that waited for the decode budget, by class.", ("class",),
                                                 kind="counter")

    def _callback(self, name: str, documentation: str, labels: tuple[str, ...] = (),
                  kind: str = "gauge") -> CallbackMetric:
        metric = CallbackMetric(name, documentation, labels, kind)
        self.registry.register(metric)
        return metric

    def render(self) -> bytes:
        return generate_latest(self.registry)
