"""Merging worker registries into one Prometheus view: counters and histograms summed across
workers, gauges kept apart under a ``worker`` label."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from semroute.grpc.metrics_merge import merge


def _worker(routes: int, ready: float, latencies: list[float]) -> str:
    reg = CollectorRegistry()
    requests = Counter("requests", "calls", ["method"], namespace="t", registry=reg)
    requests.labels(method="Route").inc(routes)
    Gauge("ready", "up", namespace="t", registry=reg).set(ready)
    hist = Histogram("seconds", "time", namespace="t", registry=reg, buckets=(0.001, 0.01))
    for value in latencies:
        hist.observe(value)
    return generate_latest(reg).decode()


def test_counters_and_histograms_add_up_and_gauges_stay_per_worker() -> None:
    """Two workers: the Route counter and every histogram bucket are the sums; each worker's
    ``ready`` gauge is its own series; the result renders as valid exposition text."""
    merged = merge({"0": _worker(3, 1.0, [0.0005, 0.005]), "1": _worker(4, 0.0, [0.005])})
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in merged for s in family.samples}
    assert samples[("t_requests_total", (("method", "Route"),))] == 7
    assert samples[("t_seconds_bucket", (("le", "0.001"),))] == 1
    assert samples[("t_seconds_bucket", (("le", "0.01"),))] == 3
    assert samples[("t_seconds_count", ())] == 3
    assert samples[("t_ready", (("worker", "0"),))] == 1.0
    assert samples[("t_ready", (("worker", "1"),))] == 0.0

    class Fixed:
        def collect(self):  # type: ignore[no-untyped-def]
            return merged

    reg = CollectorRegistry()
    reg.register(Fixed())  # type: ignore[arg-type]
    text = generate_latest(reg).decode()
    assert 't_requests_total{method="Route"} 7.0' in text
    assert 't_ready{worker="1"} 0.0' in text
