"""Live drift metrics of one router server, over the last ``router_server.drift_window``
decisions served (either arm): the share that fell back, the route mix's Jensen-Shannon
divergence from the serving index's exemplar mix (labelled indexes), and the confidence
distribution. The decision log's ``semroute drift`` report gives the same over any time span.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from prometheus_client import CollectorRegistry, Gauge, Histogram

from semroute.loop.drift import SlidingWindow, mix
from semroute.types import Decision

CONFIDENCE_BUCKETS = tuple(round(0.1 * i, 1) for i in range(1, 11))


class DriftMetrics:
    """Feed it every served decision (``observe``); gauges are read at scrape time."""

    def __init__(self, registry: CollectorRegistry, size: int,
                 exemplar_counts: Callable[[], Mapping[str, int]]) -> None:
        ns = "semroute_router"
        self.window = SlidingWindow(size)
        self._exemplar_counts = exemplar_counts
        self.fallback_share = Gauge(
            "window_fallback_share", f"Share of the last {size} decisions that fell back "
            "(confidence under the threshold)", namespace=ns, registry=registry,
        )
        self.fallback_share.set_function(self.window.fallback_share)
        self.divergence = Gauge(
            "window_route_divergence", f"Jensen-Shannon divergence (base 2) of the last {size} "
            "decisions' route mix from the serving index's exemplar mix (0: same mix; "
            "labelled indexes only)", namespace=ns, registry=registry,
        )
        self.divergence.set_function(self._divergence)
        self.confidence = Histogram(
            "confidence", "Confidence of served decisions", namespace=ns, registry=registry,
            buckets=CONFIDENCE_BUCKETS,
        )

    def observe(self, decision: Decision) -> None:
        self.window.add(decision.route, decision.fallback)
        self.confidence.observe(decision.confidence)

    def _divergence(self) -> float:
        shares = mix(self._exemplar_counts())
        return self.window.divergence(shares) if shares else 0.0
