"""Drift: how live traffic moves away from what the index was built on. Pure functions.

- the share of decisions that fell back (confidence under the threshold);
- the route mix against the exemplars' mix, as a Jensen-Shannon divergence (base 2: 0 for the
  same mix, 1 for disjoint ones), per time window, and which routes gained or lost traffic
  between the first and the last window;
- the confidence distribution per window (the decision log keeps confidence, not the top-1
  similarity);
- per index version (A/B arms, promotions): requests, fallbacks, feedback, cost;
- clusters of fell-back queries (greedy leader clustering of their embeddings), the candidates
  for new exemplars.

``SlidingWindow`` keeps the last N decisions for the router's live metrics.
"""

from __future__ import annotations

import math
import threading
from collections import Counter, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from semroute.loop.records import DecisionRecord, Feedback

CONFIDENCE_BINS = 10


def mix(counts: Mapping[str, float]) -> dict[str, float]:
    """Counts as shares summing to 1 (empty when the total is 0)."""
    total = float(sum(counts.values()))
    return {k: v / total for k, v in counts.items()} if total > 0 else {}


def js_divergence(p: Mapping[str, float], q: Mapping[str, float]) -> float:
    """Jensen-Shannon divergence of two mixes (normalised first), base 2, in [0, 1]."""
    p, q = mix(p), mix(q)
    if not p or not q:
        return 0.0
    total = 0.0
    for key in set(p) | set(q):
        a, b = p.get(key, 0.0), q.get(key, 0.0)
        m = (a + b) / 2
        if a > 0:
            total += 0.5 * a * math.log2(a / m)
        if b > 0:
            total += 0.5 * b * math.log2(b / m)
    return min(1.0, max(0.0, total))


def split_windows(records: Sequence[DecisionRecord], n: int) -> list[list[DecisionRecord]]:
    """``records`` (any order) cut into ``n`` windows of equal time span, oldest first."""
    if not records:
        return [[] for _ in range(n)]
    start = min(r.ts for r in records)
    span = max(r.ts for r in records) - start
    out: list[list[DecisionRecord]] = [[] for _ in range(n)]
    for r in sorted(records, key=lambda r: r.ts):
        i = min(n - 1, int((r.ts - start) / span * n)) if span > 0 else 0
        out[i].append(r)
    return out


def histogram(values: Iterable[float], bins: int = CONFIDENCE_BINS) -> list[int]:
    """Counts of ``values`` in ``bins`` equal bins over [0, 1] (1.0 falls in the last)."""
    out = [0] * bins
    for v in values:
        out[min(bins - 1, max(0, int(v * bins)))] += 1
    return out


@dataclass(frozen=True)
class Window:
    start: float
    end: float
    requests: int
    fallback_share: float
    route_mix: dict[str, float]
    divergence: float | None  # against the exemplars' mix (None: no exemplar mix)
    confidence_hist: list[int]


@dataclass(frozen=True)
class VersionStats:
    """One index version (an A/B arm, a promoted version): what the dispatcher logged."""

    version: str
    requests: int
    fallback_share: float
    feedback: int
    mean_score: float | None
    cost_usd: float
    mean_latency_ms: float


def window_stats(records: Sequence[DecisionRecord],
                 exemplar_mix: Mapping[str, float] | None) -> Window:
    routes = Counter(r.route for r in records)
    return Window(
        start=min((r.ts for r in records), default=0.0),
        end=max((r.ts for r in records), default=0.0),
        requests=len(records),
        fallback_share=sum(r.fallback for r in records) / len(records) if records else 0.0,
        route_mix=mix(routes),
        divergence=js_divergence(routes, exemplar_mix) if exemplar_mix and records else None,
        confidence_hist=histogram(r.confidence for r in records),
    )


def route_changes(first: Mapping[str, float], last: Mapping[str, float],
                  min_change: float = 0.02) -> list[tuple[str, float, float]]:
    """(route, share before, share after) for routes whose share moved by ``min_change`` or
    more, biggest gain first, biggest loss last."""
    rows = [(r, first.get(r, 0.0), last.get(r, 0.0)) for r in set(first) | set(last)]
    moved = [row for row in rows if abs(row[2] - row[1]) >= min_change]
    return sorted(moved, key=lambda row: (-(row[2] - row[1]), row[0]))


def version_stats(records: Sequence[DecisionRecord],
                  feedback: Sequence[tuple[DecisionRecord, Feedback]]) -> list[VersionStats]:
    """Per index version, most requests first."""
    scores: dict[str, list[float]] = {}
    for decision, item in feedback:
        scores.setdefault(decision.index_version, []).append(item.score)
    groups: dict[str, list[DecisionRecord]] = {}
    for r in records:
        groups.setdefault(r.index_version, []).append(r)
    out = []
    for version, rows in groups.items():
        given = scores.get(version, [])
        out.append(VersionStats(
            version=version or "(none)", requests=len(rows),
            fallback_share=sum(r.fallback for r in rows) / len(rows),
            feedback=len(given), mean_score=sum(given) / len(given) if given else None,
            cost_usd=sum(r.cost_usd for r in rows),
            mean_latency_ms=sum(r.latency_ms for r in rows) / len(rows),
        ))
    return sorted(out, key=lambda v: (-v.requests, v.version))


def leader_clusters(vectors: npt.NDArray[np.float32], threshold: float,
                    min_size: int = 2) -> list[list[int]]:
    """Greedy leader clustering of unit vectors: each row joins the first leader whose cosine
    is at least ``threshold``, else leads a new cluster. Clusters of ``min_size`` or more rows,
    biggest first (row indices, the leader first). Order-dependent but deterministic, and
    linear in rows x clusters: enough to point at groups of similar fell-back queries."""
    leaders: list[int] = []
    members: list[list[int]] = []
    for i in range(vectors.shape[0]):
        if leaders:
            sims = vectors[leaders] @ vectors[i]
            best = int(np.argmax(sims))
            if float(sims[best]) >= threshold:
                members[best].append(i)
                continue
        leaders.append(i)
        members.append([i])
    return sorted((m for m in members if len(m) >= min_size), key=lambda m: (-len(m), m[0]))


class SlidingWindow:
    """The last ``size`` decisions' route and fallback flag (thread-safe), for live metrics."""

    def __init__(self, size: int) -> None:
        self._rows: deque[tuple[str, bool]] = deque(maxlen=size)
        self._lock = threading.Lock()

    def add(self, route: str, fallback: bool) -> None:
        with self._lock:
            self._rows.append((route, fallback))

    def fallback_share(self) -> float:
        with self._lock:
            rows = list(self._rows)
        return sum(f for _, f in rows) / len(rows) if rows else 0.0

    def divergence(self, exemplar_mix: Mapping[str, float]) -> float:
        """JS divergence of the window's route mix from ``exemplar_mix`` (0 when empty)."""
        with self._lock:
            routes = Counter(r for r, _ in self._rows)
        return js_divergence(routes, exemplar_mix) if routes and exemplar_mix else 0.0
