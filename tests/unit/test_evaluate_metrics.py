"""Hand-computed cases for the pure metric functions in semroute.quality.metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest

from semroute.quality.metrics import (
    CostQuality,
    abstain_metrics,
    aiq,
    apgr,
    auroc,
    choose_targets,
    cost_at_quality,
    cost_quality_sweep,
    coverage_curve,
    cpt,
    label_metrics,
    oracle,
    pgr_curve,
    random_router,
    reliability,
    upper_hull,
)


def test_label_metrics_match_hand_computed_precision_recall_f1() -> None:
    """Three routes with one mistake: P/R/F1 per route and macro-F1 equal the hand values."""
    y_true = ["a", "a", "b", "b", "c"]
    y_pred = ["a", "b", "b", "b", "c"]
    m = label_metrics(y_true, y_pred, labels=["a", "b", "c"])
    assert m.accuracy == pytest.approx(0.8)
    assert m.per_route["a"].precision == pytest.approx(1.0)
    assert m.per_route["a"].recall == pytest.approx(0.5)
    assert m.per_route["a"].f1 == pytest.approx(2 / 3)
    assert m.per_route["b"].precision == pytest.approx(2 / 3)
    assert m.per_route["b"].f1 == pytest.approx(0.8)
    assert m.macro_f1 == pytest.approx((2 / 3 + 0.8 + 1.0) / 3)
    assert m.confusion.tolist() == [[1, 1, 0], [0, 2, 0], [0, 0, 1]]


def test_label_metrics_macro_f1_ignores_labels_only_predicted() -> None:
    """A predicted-only label (e.g. the fallback route) is in the matrix but not in macro-F1."""
    m = label_metrics(["a", "a"], ["a", "default"])
    assert m.labels == ("a", "default")
    assert m.macro_f1 == pytest.approx(2 / 3)
    assert m.per_route["default"].support == 0


def test_coverage_curve_is_exact_per_threshold() -> None:
    """Raising the threshold past the lowest (wrong) answer lifts accuracy to 1 at 3/4 coverage."""
    pts = coverage_curve([0.9, 0.8, 0.7, 0.2], [1, 1, 1, 0])
    assert [(p.coverage, p.accuracy) for p in pts] == [
        (1.0, 0.75), (0.75, 1.0), (0.5, 1.0), (0.25, 1.0)
    ]
    assert pts[1].threshold == pytest.approx(0.7)


def test_coverage_curve_keeps_tied_confidences_together() -> None:
    """Equal confidences cannot be split by a threshold: they form a single point."""
    pts = coverage_curve([0.5, 0.5, 0.9], [0, 1, 1])
    assert [(p.coverage, p.accuracy) for p in pts] == [(1.0, pytest.approx(2 / 3)), (1 / 3, 1.0)]


def test_ece_of_known_bins() -> None:
    """Two occupied bins: |0.5-0.15|*2/4 + |1.0-0.95|*2/4 = 0.2."""
    ece, bins = reliability([0.12, 0.18, 0.9, 1.0], [1, 0, 1, 1], n_bins=10)
    assert ece == pytest.approx(0.5 * 0.35 + 0.5 * 0.05)
    assert bins[1].count == 2
    assert (bins[1].confidence, bins[1].accuracy) == (pytest.approx(0.15), pytest.approx(0.5))
    assert bins[9].count == 2  # 0.9 and 1.0 share the last bin
    assert math.isnan(bins[5].accuracy)


def test_auroc_of_known_orderings() -> None:
    """Perfect ordering 1, reversed 0, one swapped pair of four pairs 0.75, full tie 0.5."""
    assert auroc([0.9, 0.8, 0.1, 0.2], [1, 1, 0, 0]) == pytest.approx(1.0)
    assert auroc([0.1, 0.2, 0.9, 0.8], [1, 1, 0, 0]) == pytest.approx(0.0)
    assert auroc([0.9, 0.3, 0.5, 0.1], [1, 1, 0, 0]) == pytest.approx(0.75)
    assert auroc([0.5, 0.5], [1, 0]) == pytest.approx(0.5)
    assert math.isnan(auroc([0.1], [1]))


def test_abstain_metrics_count_out_of_scope_hits() -> None:
    """Abstaining on two rows, one out of scope of two: precision 1/2, recall 1/2."""
    m = abstain_metrics([True, True, False, False], [True, False, True, False], [0.1, 0.2, 0.9, 0.8])
    assert m.precision == pytest.approx(0.5)
    assert m.recall == pytest.approx(0.5)
    assert m.auroc == pytest.approx(0.5)


def test_upper_hull_drops_points_below_and_after_the_peak() -> None:
    """(0.5,0.3) lies under the segment (0,0.2)-(1,0.6); (2,0.5) comes after the peak."""
    pts = [CostQuality(0, 0.2), CostQuality(0.5, 0.3), CostQuality(1, 0.6), CostQuality(2, 0.5)]
    assert upper_hull(pts) == [(0, 0.2), (1, 0.6)]


def test_aiq_of_a_known_hull() -> None:
    """Hull (0,0.2)-(1,0.6) then flat to 2: area 0.4 + 0.6 = 1.0 over a range of 2."""
    pts = [CostQuality(0, 0.2), CostQuality(0.5, 0.3), CostQuality(1, 0.6), CostQuality(2, 0.5)]
    assert aiq(pts) == pytest.approx(0.5)
    # Over a wider range starting below the cheapest point, nothing is reachable there.
    assert aiq([CostQuality(1, 0.5), CostQuality(2, 0.5)], cost_range=(0, 2)) == pytest.approx(0.25)


def test_cost_at_quality_interpolates_on_the_hull() -> None:
    """Quality 0.4 on the segment (0,0.2)-(1,0.6) is reached at cost 0.5; 0.7 never."""
    pts = [CostQuality(0, 0.2), CostQuality(1, 0.6)]
    assert cost_at_quality(pts, 0.4) == pytest.approx(0.5)
    assert cost_at_quality(pts, 0.1) == pytest.approx(0.0)
    assert cost_at_quality(pts, 0.7) is None


def test_pgr_apgr_cpt_of_a_known_curve() -> None:
    """Strong wins on query 0 only and the router ranks it first: PGR 0, 1, 1 -> APGR 0.75."""
    curve = pgr_curve(advantage=[0.9, 0.1], weak=[0, 0], strong=[1, 0])
    assert curve.pgr.tolist() == pytest.approx([0.0, 1.0, 1.0])
    assert apgr(curve) == pytest.approx(0.75)
    assert cpt(curve, 0.5) == pytest.approx(0.5)
    worst = pgr_curve(advantage=[0.1, 0.9], weak=[0, 0], strong=[1, 0])
    assert apgr(worst) == pytest.approx(0.25)
    assert cpt(worst, 0.8) == pytest.approx(1.0)


def test_apgr_of_random_order_is_about_one_half() -> None:
    """A router with no signal sits on the diagonal: APGR near 0.5 on many rows."""
    rng = np.random.default_rng(0)
    weak = rng.integers(0, 2, 4000).astype(float)
    strong = np.maximum(weak, rng.integers(0, 2, 4000))
    assert apgr(pgr_curve(rng.random(4000), weak, strong)) == pytest.approx(0.5, abs=0.03)


def test_oracle_random_and_sweep_points() -> None:
    """Oracle takes the cheapest of equally good targets; the sweep ends at the cheapest target."""
    quality = np.array([[1.0, 1.0], [0.0, 1.0]])
    costs = np.array([1.0, 4.0])
    o = oracle(quality, costs)
    assert (o.cost, o.quality) == (pytest.approx(2.5), pytest.approx(1.0))
    r = random_router(quality, costs)
    assert (r.cost, r.quality) == (pytest.approx(2.5), pytest.approx(0.75))
    predicted = np.array([[0.6, 0.9], [0.2, 0.9]])
    assert choose_targets(predicted, costs / 4, 0.0).tolist() == [1, 1]
    assert choose_targets(predicted, costs / 4, 0.5).tolist() == [0, 1]
    sweep = cost_quality_sweep(predicted, quality, costs, weights=[0.0, 0.5, 10.0])
    assert [(p.cost, p.quality) for p in sweep] == [(4.0, 1.0), (2.5, 1.0), (1.0, 0.5)]


def test_abstention_curve_trades_in_scope_coverage_for_oos_recall() -> None:
    """In-scope 0.9, 0.8, 0.6, 0.4 and out-of-scope 0.5, 0.1: at threshold 0.6, 3/4 in scope
    are answered and both out-of-scope rows abstained on."""
    from semroute.quality.metrics import abstention_curve

    curve = abstention_curve([0.9, 0.8, 0.6, 0.4, 0.5, 0.1],
                             [False, False, False, False, True, True])
    at = {round(p.threshold, 2): p for p in curve}
    assert at[0.6].in_scope_coverage == pytest.approx(0.75)
    assert at[0.6].oos_recall == pytest.approx(1.0)
    assert at[0.1].in_scope_coverage == 1.0 and at[0.1].oos_recall == 0.0
    assert [p.threshold for p in curve] == sorted(p.threshold for p in curve)
