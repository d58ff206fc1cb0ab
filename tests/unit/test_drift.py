"""Drift maths (semroute.loop.drift): divergence, windows, route changes, per-version stats,
clusters of fell-back queries and the router's sliding window."""

from __future__ import annotations

import numpy as np
import pytest

from semroute.loop.drift import (
    SlidingWindow,
    histogram,
    js_divergence,
    leader_clusters,
    route_changes,
    split_windows,
    version_stats,
    window_stats,
)
from semroute.loop.records import DecisionRecord, Feedback


def _row(i: int, route: str = "code", *, ts: float | None = None, fallback: bool = False,
         version: str = "v1", cost: float = 0.0, confidence: float = 0.9) -> DecisionRecord:
    return DecisionRecord(f"r{i}", float(i) if ts is None else ts, route, "t", "t", confidence,
                          fallback, "ok", index_version=version, cost_usd=cost)


def test_js_divergence_is_zero_for_the_same_mix_one_for_disjoint_and_symmetric() -> None:
    """0 for mixes that are the same up to scale, 1 for disjoint ones, a known value between."""
    assert js_divergence({"a": 2, "b": 2}, {"a": 0.5, "b": 0.5}) == pytest.approx(0.0)
    assert js_divergence({"a": 1}, {"b": 1}) == pytest.approx(1.0)
    value = js_divergence({"a": 1}, {"a": 0.5, "b": 0.5})
    assert value == pytest.approx(0.3112781, abs=1e-6)
    assert js_divergence({"a": 0.5, "b": 0.5}, {"a": 1}) == pytest.approx(value)
    assert js_divergence({}, {"a": 1}) == 0.0


def test_windows_cut_equal_time_spans_and_summarise_each() -> None:
    """Rows at t=0..99 in 4 windows: 25 each, oldest first; each window's fallback share and
    route mix; divergence against the exemplars' mix."""
    rows = [_row(i, "code" if i < 50 else "math", fallback=i % 10 == 0) for i in range(100)]
    windows = split_windows(list(reversed(rows)), 4)
    assert [len(w) for w in windows] == [25, 25, 25, 25]
    assert windows[0][0].ts == 0 and windows[3][-1].ts == 99
    first = window_stats(windows[0], {"code": 1, "math": 1})
    assert first.route_mix == {"code": 1.0} and first.fallback_share == pytest.approx(3 / 25)
    assert first.divergence == pytest.approx(js_divergence({"code": 1}, {"code": 1, "math": 1}))
    assert window_stats(windows[0], None).divergence is None
    assert split_windows([_row(1), _row(2, ts=1.0)], 3)[0] == [_row(1), _row(2, ts=1.0)]


def test_route_changes_list_gains_then_losses_above_the_threshold() -> None:
    """Routes whose share moved by at least min_change: biggest gain first, biggest loss last."""
    before = {"code": 0.6, "math": 0.3, "chat": 0.1}
    after = {"code": 0.3, "math": 0.31, "chat": 0.2, "new": 0.19}
    assert [r for r, _, _ in route_changes(before, after, 0.02)] == ["new", "chat", "code"]
    assert route_changes(before, before) == []


def test_version_stats_join_feedback_and_cost_per_index_version() -> None:
    """Per version: requests, fallback share, feedback count and mean score, total cost."""
    rows = [_row(0, version="v1", cost=0.5), _row(1, version="v1", fallback=True),
            _row(2, version="v2", cost=1.0)]
    fb = [(rows[0], Feedback("r0", 1.0, 0.0)), (rows[1], Feedback("r1", 0.0, 0.0))]
    stats = {s.version: s for s in version_stats(rows, fb)}
    assert (stats["v1"].requests, stats["v1"].fallback_share) == (2, 0.5)
    assert (stats["v1"].feedback, stats["v1"].mean_score, stats["v1"].cost_usd) == (2, 0.5, 0.5)
    assert (stats["v2"].feedback, stats["v2"].mean_score) == (0, None)


def test_leader_clusters_group_close_vectors_and_skip_singletons() -> None:
    """Two tight groups of unit vectors and one stray: two clusters, biggest first."""
    rng = np.random.default_rng(0)
    a, b, stray = np.eye(8, dtype=np.float32)[:3]
    rows = [a + 0.05 * rng.standard_normal(8) for _ in range(3)]
    rows += [b + 0.05 * rng.standard_normal(8) for _ in range(4)] + [stray]
    vectors = np.asarray(rows, dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    assert leader_clusters(vectors, 0.9) == [[3, 4, 5, 6], [0, 1, 2]]
    assert leader_clusters(vectors, 0.9, min_size=4) == [[3, 4, 5, 6]]


def test_histogram_bins_cover_zero_to_one_inclusive() -> None:
    assert histogram([0.0, 0.05, 0.1, 0.99, 1.0], bins=10) == [2, 1, 0, 0, 0, 0, 0, 0, 0, 2]


def test_sliding_window_keeps_the_last_n_decisions() -> None:
    """Only the newest ``size`` decisions count toward the fallback share and the mix."""
    window = SlidingWindow(4)
    for route, fb in [("code", True), ("code", True), ("math", False), ("math", False),
                      ("math", False), ("math", True)]:
        window.add(route, fb)
    assert window.fallback_share() == 0.25
    assert window.divergence({"math": 1.0}) == 0.0
    assert window.divergence({"code": 1.0}) == pytest.approx(1.0)
    assert SlidingWindow(3).fallback_share() == 0.0
