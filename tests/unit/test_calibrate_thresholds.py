"""Threshold choice for a target precision or coverage, globally and per route (hand-computed)."""

from __future__ import annotations

import numpy as np
import pytest

from semroute.errors import ConfigError
from semroute.quality.calibrate import (
    choose_thresholds,
    threshold_for_coverage,
    threshold_for_precision,
)


def test_precision_target_picks_the_lowest_threshold_that_reaches_it() -> None:
    """Sorted confidences 0.9 ok, 0.8 ok, 0.7 wrong, 0.6 ok: precision 1, 1, 2/3, 3/4.
    For 0.75 the lowest threshold is 0.6 (3/4 answered right, all covered)."""
    conf = [0.9, 0.8, 0.7, 0.6]
    ok = [1, 1, 0, 1]
    p = threshold_for_precision(conf, ok, 0.75)
    assert p is not None and p.threshold == pytest.approx(0.6) and p.coverage == 1.0
    p = threshold_for_precision(conf, ok, 0.9)
    assert p is not None and p.threshold == pytest.approx(0.8)
    assert p.precision == 1.0 and p.coverage == 0.5


def test_precision_target_out_of_reach_gives_none() -> None:
    """When even the most confident answer is wrong nothing reaches the target."""
    assert threshold_for_precision([0.9, 0.5], [0, 1], 0.6) is None


def test_precision_threshold_never_splits_tied_confidences() -> None:
    """Two rows share 0.8 (one right, one wrong): a threshold takes both or neither."""
    p = threshold_for_precision([0.9, 0.8, 0.8], [1, 1, 0], 0.9)
    assert p is not None and p.threshold == pytest.approx(0.9) and p.coverage == pytest.approx(1 / 3)


def test_coverage_target_answers_at_least_that_share() -> None:
    """Covering half of four rows sets the threshold at the second highest confidence."""
    p = threshold_for_coverage([0.2, 0.9, 0.5, 0.7], 0.5)
    assert p.threshold == pytest.approx(0.7) and p.coverage == 0.5
    assert threshold_for_coverage([0.2, 0.9, 0.5, 0.7], 1.0).threshold == pytest.approx(0.2)


def test_per_route_thresholds_follow_each_routes_rows() -> None:
    """Route a is clean and gets a low threshold; route b needs a higher one; route c has too
    few rows and keeps the global threshold."""
    predicted = ["a"] * 4 + ["b"] * 4 + ["c"]
    conf = [0.9, 0.8, 0.7, 0.6, 0.9, 0.8, 0.7, 0.6, 0.5]
    ok = [1, 1, 1, 1, 1, 1, 0, 0, 1]
    cal = choose_thresholds(predicted, conf, ok, precision=0.9, per_route=True, min_rows=3)
    assert cal.per_route["a"] == pytest.approx(0.6)
    assert cal.per_route["b"] == pytest.approx(0.8)
    assert "c" not in cal.per_route and "c" in cal.skipped
    # global: sorted 0.9,0.9,0.8,0.8 ok (4/4), 0.7 one of two wrong (5/6), so 0.8
    assert cal.global_threshold == pytest.approx(0.8)


def test_exactly_one_goal_and_a_valid_target_are_required() -> None:
    """Neither or both goals, or a target outside (0, 1], is a ConfigError saying so."""
    with pytest.raises(ConfigError, match="exactly one"):
        choose_thresholds(["a"], [0.5], [1])
    with pytest.raises(ConfigError, match="exactly one"):
        choose_thresholds(["a"], [0.5], [1], precision=0.9, coverage=0.5)
    with pytest.raises(ConfigError, match=r"in \(0, 1\]"):
        choose_thresholds(["a"], [0.5], [1], coverage=1.5)


def test_unreachable_global_precision_names_the_best_reachable() -> None:
    """The error tells the user what precision is reachable so they can lower the target."""
    with pytest.raises(ConfigError, match=r"best: 0\.000"):
        choose_thresholds(["a", "a"], [0.9, 0.5], [0, 1], precision=0.6)


def test_in_scope_coverage_counts_only_in_scope_rows() -> None:
    """Four in-scope rows (0.9, 0.8, 0.7, 0.2) and two out-of-scope rows (0.85, 0.1): 75%
    in-scope coverage answers the top three in-scope rows, threshold 0.7, whatever the
    out-of-scope rows score; their answered one shows in the precision."""
    conf = [0.9, 0.8, 0.7, 0.2, 0.85, 0.1]
    inside = [True, True, True, True, False, False]
    correct = [True, True, False, True, False, False]
    cal = choose_thresholds(["a"] * 6, conf, correct, in_scope_coverage=0.75, in_scope=inside)
    point = cal.points["*"]
    assert cal.global_threshold == pytest.approx(0.7)
    assert point.coverage == pytest.approx(0.75) and point.rows == 4
    assert point.precision == pytest.approx(2 / 4)  # 0.9, 0.8 right; 0.85 (oos), 0.7 wrong


def test_in_scope_coverage_ignores_out_of_scope_rows_entirely_for_the_threshold() -> None:
    """Adding out-of-scope rows at any confidence does not move the threshold."""
    base = choose_thresholds(["a"] * 4, [0.9, 0.8, 0.7, 0.2], [True] * 4,
                             in_scope_coverage=0.5, in_scope=[True] * 4)
    more = choose_thresholds(["a"] * 7, [0.9, 0.8, 0.7, 0.2, 0.99, 0.75, 0.01],
                             [True] * 4 + [False] * 3, in_scope_coverage=0.5,
                             in_scope=[True] * 4 + [False] * 3)
    assert base.global_threshold == more.global_threshold == pytest.approx(0.8)


def test_in_scope_coverage_needs_in_scope_rows_and_is_one_of_three_goals() -> None:
    """No in-scope row is a clear error; combining goals is refused."""
    with pytest.raises(ConfigError, match="in-scope validation rows"):
        choose_thresholds(["a"], [0.5], [False], in_scope_coverage=0.9, in_scope=[False])
    with pytest.raises(ConfigError, match="exactly one"):
        choose_thresholds(["a"], [0.5], [True], coverage=0.5, in_scope_coverage=0.9)


def test_per_route_in_scope_coverage_skips_routes_without_in_scope_rows() -> None:
    """A route only out-of-scope rows were sent to keeps the global threshold."""
    pred = ["a"] * 10 + ["b"] * 10
    conf = list(np.linspace(0.5, 0.95, 10)) + list(np.linspace(0.1, 0.4, 10))
    inside = [True] * 10 + [False] * 10
    cal = choose_thresholds(pred, conf, [True] * 10 + [False] * 10, in_scope_coverage=0.9,
                            in_scope=inside, per_route=True, min_rows=5)
    assert "a" in cal.per_route and "b" not in cal.per_route
    assert cal.skipped["b"] == "no in-scope validation rows"


def test_rows_taken_by_out_of_scope_exemplars_are_never_answered() -> None:
    """calibrate gives rows whose vote out-of-scope exemplars won a confidence of -inf: the
    coverage goal counts them as abstained, and a goal only they could meet gives 0 with a
    note instead of an infinite threshold."""
    from semroute.quality.calibrate import _finite_thresholds

    conf = np.array([0.9, 0.8, 0.7, -np.inf])
    cal = choose_thresholds(["a", "a", "a", "oos"], conf, [True] * 4, in_scope_coverage=0.75)
    assert cal.global_threshold == pytest.approx(0.7)
    cal = choose_thresholds(["a", "a", "a", "oos"], conf, [True] * 4, in_scope_coverage=1.0)
    _finite_thresholds(cal)
    assert cal.global_threshold == 0.0 and "out-of-scope exemplars" in cal.skipped["*"]


def test_per_route_thresholds_skip_the_out_of_scope_examples() -> None:
    """Rows out-of-scope exemplars took are no route: no per-route threshold for them."""
    pred = ["a"] * 12 + ["oos"] * 12
    conf = np.r_[np.linspace(0.5, 0.99, 12), np.full(12, -np.inf)]
    cal = choose_thresholds(pred, conf, [True] * 24, in_scope_coverage=0.5, per_route=True)
    assert set(cal.per_route) == {"a"} and "oos" not in cal.skipped
