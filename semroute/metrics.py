"""Prometheus metrics: generic per-RPC metrics, the router's own metrics, and the HTTP endpoint.

Each server owns a ``CollectorRegistry`` (never the global one), so several servers, or many
tests, can live in one process. A service adds its own metrics class next to its code, built on
``RpcMetrics`` for the per-method counters (the dispatcher does so in its own module).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

# Latency buckets from 0.25 ms to 2.5 s: routing is a few ms, reloads and batches are longer.
LATENCY_BUCKETS = (
    0.00025, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 2.5,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class RpcMetrics:
    """Requests by method and status code, and latency by method, under ``<namespace>_``."""

    def __init__(self, namespace: str, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "requests", "RPCs handled, by method and gRPC status code",
            ["method", "code"], namespace=namespace, registry=registry,
        )
        self.latency = Histogram(
            "request_seconds", "Time to handle an RPC, by method",
            ["method"], namespace=namespace, registry=registry, buckets=LATENCY_BUCKETS,
        )

    def observe(self, method: str, code: str, seconds: float) -> None:
        """Record one finished RPC (``method`` is the short name, e.g. ``Route``)."""
        self.requests.labels(method=method, code=code).inc()
        self.latency.labels(method=method).observe(seconds)


class RouterMetrics:
    """Everything the router service exports (namespace ``semroute_router``)."""

    NAMESPACE = "semroute_router"

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        ns, reg = self.NAMESPACE, self.registry
        self.rpc = RpcMetrics(ns, reg)
        self.decisions = Counter(
            "decisions", "Routing decisions by route and target", ["route", "target"],
            namespace=ns, registry=reg,
        )
        self.fallbacks = Counter(
            "fallbacks", "Decisions that fell back to the default route (low confidence)",
            ["route"], namespace=ns, registry=reg,
        )
        self.encode_seconds = Histogram(
            "encode_seconds", "Encoder time per batch", namespace=ns, registry=reg,
            buckets=LATENCY_BUCKETS,
        )
        self.search_seconds = Histogram(
            "search_seconds", "FAISS search time per batch", namespace=ns, registry=reg,
            buckets=LATENCY_BUCKETS,
        )
        self.decide_seconds = Histogram(
            "decide_seconds", "Decision time per batch", namespace=ns, registry=reg,
            buckets=LATENCY_BUCKETS,
        )
        self.batch_size = Histogram(
            "batch_size", "Queries per encoder batch (coalesced Route calls or one RouteBatch)",
            namespace=ns, registry=reg, buckets=BATCH_BUCKETS,
        )
        self.cache_hits = Gauge(
            "embedding_cache_hits", "Embedding cache hits since start", namespace=ns,
            registry=reg,
        )
        self.cache_misses = Gauge(
            "embedding_cache_misses", "Embedding cache misses since start", namespace=ns,
            registry=reg,
        )
        self.cache_hit_ratio = Gauge(
            "embedding_cache_hit_ratio", "Embedding cache hits / lookups since start (0 if none)",
            namespace=ns, registry=reg,
        )
        self.index_version = Gauge(
            "index_version_info", "The index version serving (value 1)", ["version"],
            namespace=ns, registry=reg,
        )
        self.index_exemplars = Gauge(
            "index_exemplars", "Exemplars in the index serving", namespace=ns, registry=reg,
        )
        self.ready = Gauge(
            "ready", "1 when an index is loaded and the service is SERVING", namespace=ns,
            registry=reg,
        )
        self.reloads = Counter(
            "reloads", "Index reload attempts by result (ok, unchanged, error)", ["result"],
            namespace=ns, registry=reg,
        )
        self.reload_failed = Gauge(
            "reload_failed", "1 while the last reload attempt failed (old index still serving)",
            namespace=ns, registry=reg,
        )

    def watch_cache(self, hits: Callable[[], int], misses: Callable[[], int]) -> None:
        """Read the embedding cache counters at scrape time."""
        self.cache_hits.set_function(lambda: float(hits()))
        self.cache_misses.set_function(lambda: float(misses()))

        def ratio() -> float:
            h, m = hits(), misses()
            return h / (h + m) if h + m else 0.0

        self.cache_hit_ratio.set_function(ratio)

    def watch_stages(self, read: Callable[[], tuple[int, int]]) -> None:
        """Export ``stage_decisions_total{stage=static|full}`` from ``read() -> (static,
        full)`` at scrape time: which stage of the two-stage encoder made each decision."""
        self.registry.register(_StageCollector(f"{self.NAMESPACE}_stage_decisions", read))

    def set_index(self, version: str, exemplars: int) -> None:
        """Mark ``version`` as the one serving (and only it)."""
        self.index_version.clear()
        self.index_version.labels(version=version).set(1)
        self.index_exemplars.set(exemplars)


class _StageCollector(Collector):
    def __init__(self, name: str, read: Callable[[], tuple[int, int]]) -> None:
        self._name = name
        self._read = read

    def collect(self) -> Iterator[CounterMetricFamily]:
        static, full = self._read()
        family = CounterMetricFamily(
            self._name, "Routing decisions by the encoder stage that made them (static: the "
            "two-stage encoder's static model alone; full: the full encoder)", labels=["stage"],
        )
        family.add_metric(["static"], static)
        family.add_metric(["full"], full)
        yield family


@dataclass
class MetricsServer:
    """A running Prometheus HTTP endpoint; ``close()`` stops it."""

    server: WSGIServer
    thread: threading.Thread
    port: int

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def serve_metrics(registry: CollectorRegistry, port: int, host: str = "127.0.0.1") -> MetricsServer:
    """Serve ``registry`` at ``http://host:port/metrics`` in a daemon thread (port 0: any free)."""
    server, thread = start_http_server(port, addr=host, registry=registry)
    return MetricsServer(server=server, thread=thread, port=int(server.server_port))
