"""One Prometheus endpoint for several router worker processes.

Each worker keeps its own registry and serves it on a private loopback port; the supervisor's
``MergedCollector`` reads them all at scrape time and exposes one view on the configured metrics
port. Counters and histograms are summed across workers (a rate over the merged series is the
fleet's rate); gauges, whose sum rarely means anything (``ready``, ``index_version_info``, cache
ratios), are kept per worker under a ``worker`` label. A worker that cannot be read is skipped
and counted in ``semroute_router_workers_unscraped``.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

SUMMED = frozenset({"counter", "histogram", "summary"})
SCRAPE_TIMEOUT_S = 2.0


def fetch(port: int, timeout: float = SCRAPE_TIMEOUT_S) -> str:
    """The exposition text a worker serves on ``127.0.0.1:port``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as reply:
        return str(reply.read().decode("utf-8"))


def merge(texts: Mapping[str, str]) -> list[Metric]:
    """Metric families of several expositions (worker name -> text), merged as the module
    docstring says. ``_created`` samples keep the earliest value."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for worker, text in texts.items():
        for family in text_string_to_metric_families(text):
            families.setdefault(
                family.name, Metric(family.name, family.documentation, family.type)
            )
            into = values.setdefault(family.name, {})
            for sample in family.samples:
                labels = dict(sample.labels)
                if family.type not in SUMMED:
                    labels["worker"] = worker
                key = (sample.name, tuple(sorted(labels.items())))
                if key not in into:
                    into[key] = sample.value
                elif sample.name.endswith("_created"):
                    into[key] = min(into[key], sample.value)
                else:
                    into[key] += sample.value
    out = []
    for name, family in families.items():
        for (sample_name, pairs), value in values[name].items():
            family.add_sample(sample_name, dict(pairs), value)
        out.append(family)
    return out


class MergedCollector:
    """A collector (``registry.register(MergedCollector(ports))``) that merges the workers
    whose metrics ports ``ports()`` returns (worker name -> port) at every scrape."""

    def __init__(self, ports: Callable[[], Mapping[str, int]]) -> None:
        self._ports = ports

    def collect(self) -> Iterator[Metric]:
        texts: dict[str, str] = {}
        missed = 0
        for worker, port in sorted(self._ports().items()):
            try:
                texts[worker] = fetch(port)
            except (OSError, ValueError):
                missed += 1  # a worker restarting or gone: the next scrape sees it again
        yield from merge(texts)
        unscraped = Metric("semroute_router_workers_unscraped",
                           "Worker processes whose metrics this scrape could not read", "gauge")
        unscraped.add_sample("semroute_router_workers_unscraped", {}, float(missed))
        yield unscraped

    def describe(self) -> list[Any]:
        return []  # families are only known at scrape time
