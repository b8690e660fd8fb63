"""Prometheus metrics of the service (``GET /metrics``), in a registry of its own.

Request-side metrics (``RequestMetrics``) are updated by the HTTP app; batch-side ones
(``EngineMetrics``) by the batcher, and the engine's counters (compiles, prefix cache) are
read from ``Engine.stats()`` at scrape time by a collector, so the engine itself does not
depend on prometheus-client. The single-process server keeps both in one registry
(``ServeMetrics``); the multi-process one keeps the first in its front ends and the second
in the engine process (``supervisor.py``).
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0, 2.0,
                   5.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class RequestMetrics:
    """What the HTTP layer records: latency and status per endpoint, errors by class, the
    event loop's lag. In the multi-process server each front end keeps these, in
    prometheus-client's multiprocess mode, so a scrape of any front end sums them all."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.latency = Histogram("genrec_request_latency_seconds", "End-to-end request latency in the server",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.requests = Counter("genrec_requests", "Requests answered, by endpoint and HTTP status",
                                ["endpoint", "status"], registry=r)
        self.errors = Counter("genrec_errors", "Error responses by class", ["error_class"], registry=r)
        # "livesum": in multiprocess mode, the live front ends' limits added up
        self.inflight_limit = Gauge("genrec_inflight_limit",
                                    "Model requests that may be in progress at once (0: no limit; adapts with "
                                    "serve.target_latency_ms)", registry=r, multiprocess_mode="livesum")
        # "livemin": in multiprocess mode, the front end with the smallest copy (0 until all have one)
        self.catalog_copy = Gauge("genrec_frontend_catalog_items",
                                  "Items in the HTTP front ends' catalogue copies, which resolve requests before "
                                  "the engine process (serve.resolve_in_frontends; 0: not yet, or off)",
                                  registry=r, multiprocess_mode="livemin")
        # Multi-process server only: with genrec_engine_request_seconds (engine side) it splits a
        # request's time between this process, the socket and the engine process.
        self.engine_roundtrip = Histogram("genrec_engine_roundtrip_seconds",
                                          "Front end: a model request's round trip to the engine process, from "
                                          "sending its frame to reading the answer", ["op"],
                                          buckets=LATENCY_BUCKETS, registry=r)
        # "livemax": in multiprocess mode, the most lagging live front end (ignored otherwise)
        self.loop_lag = Gauge("genrec_event_loop_lag_seconds",
                              "How late the HTTP event loop runs a 5 ms timer (load shedding above "
                              "serve.max_loop_lag_ms)", registry=r, multiprocess_mode="livemax")


class EngineMetrics:
    """What the batcher and the engine record: batch sizes, queue wait and depth, and the
    engine's own counters (compiles, prefix cache), read at scrape time."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.batch_size = Histogram("genrec_batch_size", "Requests per batch the batcher ran",
                                    buckets=SIZE_BUCKETS, registry=r)
        self.step_rows = Histogram("genrec_step_rows", "Real rows per compiled-step call (bucket padding excluded)",
                                   ["step"], buckets=SIZE_BUCKETS, registry=r)
        self.queue_wait = Histogram("genrec_queue_wait_seconds", "Time the oldest request of a batch waited",
                                    buckets=LATENCY_BUCKETS, registry=r)
        # One observation per request: a rare long pause that delays many requests at once
        # weighs here as it does in their latency (per batch it is one or two batches).
        self.request_wait = Histogram("genrec_request_queue_wait_seconds",
                                      "Time each request waited in the batcher queue before its batch started",
                                      buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("genrec_queue_depth", "Requests waiting in the batcher queue", registry=r)
        self.engine_request = Histogram("genrec_engine_request_seconds",
                                        "Engine process: a front end's model request from reading its frame to "
                                        "writing the answer (multi-process server)", ["op"],
                                        buckets=LATENCY_BUCKETS, registry=r)
        self.batch_seconds = Histogram("genrec_batch_seconds",
                                       "Time from a batch's dispatch to its answers: the compiled steps and the "
                                       "host work around them", buckets=LATENCY_BUCKETS, registry=r)

    def on_batch(self, size: int, waited_s: float, waits: list[float] = ()) -> None:
        self.batch_size.observe(size)
        self.queue_wait.observe(waited_s)
        for w in waits:
            self.request_wait.observe(w)

    def on_batch_done(self, size: int, seconds: float) -> None:
        self.batch_seconds.observe(seconds)

    def on_step(self, step: str, rows: int, bucket: int) -> None:
        self.step_rows.labels(step).observe(rows)

    def watch(self, stats: Callable[[], dict | None], depth: Callable[[], int]) -> None:
        """Read the engine's counters and the queue depth at every scrape."""
        self.queue_depth.set_function(depth)
        self.registry.register(_EngineCollector(stats))


class ServeMetrics(RequestMetrics, EngineMetrics):
    """Both sides in one registry: the single-process server."""

    def __init__(self, registry: CollectorRegistry | None = None):
        registry = registry if registry is not None else CollectorRegistry()
        RequestMetrics.__init__(self, registry)
        EngineMetrics.__init__(self, registry)


class _EngineCollector:
    def __init__(self, stats: Callable[[], dict | None]):
        self._stats = stats

    def describe(self):
        return []

    def collect(self):
        s = self._stats() or {}
        yield _counter("genrec_compiles", "Executables compiled (all at start-up or cold-start swaps)",
                       s.get("compiles", 0))
        yield _counter("genrec_compile_seconds", "Seconds spent compiling", s.get("compile_seconds", 0.0))
        yield _counter("genrec_prefix_cache_hits", "Returning-user requests that reused their cached prefix",
                       s.get("prefix_cache_hits", 0))
        yield _counter("genrec_prefix_cache_misses", "Requests with a user_id that encoded their whole window",
                       s.get("prefix_cache_misses", 0))
        yield _counter("genrec_prefix_cache_evictions", "Users evicted from the prefix cache (LRU)",
                       s.get("prefix_cache_evictions", 0))
        yield _gauge("genrec_prefix_cache_hit_rate", "hits / (hits + misses) since start",
                     s.get("prefix_cache_hit_rate", 0.0))
        yield _gauge("genrec_prefix_cache_entries", "Users in the prefix cache", s.get("prefix_cache_entries", 0))
        yield _gauge("genrec_prefix_cache_capacity", "User slots of the prefix cache",
                     s.get("prefix_cache_capacity", 0))
        yield _gauge("genrec_kv_pool_bytes", "Device bytes of the K/V slot pool", s.get("pool_bytes", 0))
        yield _gauge("genrec_ready", "1 once every executable is compiled", 1.0 if s.get("ready") else 0.0)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    c = CounterMetricFamily(name, doc)
    c.add_metric([], value)
    return c


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)
