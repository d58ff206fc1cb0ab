"""The pure decision functions: votes, ties, thresholds, shrinkage, cost policy, locality."""

from __future__ import annotations

import numpy as np
import pytest

from semroute.decision import (
    DecisionParams,
    decide_labelled,
    decide_outcomes,
    predict_quality,
    predict_quality_local,
    rank_by_quality,
    vote_shares,
    winning_label,
)
from semroute.errors import NoTargetAvailable
from semroute.types import Policy, Route, RouteTable, Target

F = np.float32


def table(threshold: float | None = None, default: str | None = "general") -> RouteTable:
    targets = {
        "local-small": Target("local-small", 0.0, 0.0, local=True),
        "local-big": Target("local-big", 0.1, 0.1, local=True),
        "cloud": Target("cloud", 2.0, 8.0, local=False),
    }
    routes = {
        "code": Route("code", ("cloud", "local-big")),
        "chat": Route("chat", ("local-small",)),
        "general": Route("general", ("local-small", "cloud")),
    }
    return RouteTable(routes, targets, default, threshold)


NO_NULL = DecisionParams(temperature=0.05, null_similarity=None)


def test_vote_shares_weight_closer_neighbours_more() -> None:
    """One very close neighbour outvotes two distant ones under the softmax weighting."""
    sims = np.array([0.9, 0.6, 0.6], dtype=F)
    shares = vote_shares(sims, ["code", "chat", "chat"], np.ones(3, F), NO_NULL)
    assert shares["code"] > shares["chat"]
    assert sum(shares.values()) == pytest.approx(1.0)


def test_null_neighbour_lowers_confidence_of_far_queries() -> None:
    """The same unanimous vote is confident when close and not when every match is far."""
    params = DecisionParams(temperature=0.05, null_similarity=0.35)
    near = vote_shares(np.array([0.8, 0.78], F), ["code", "code"], np.ones(2, F), params)
    far = vote_shares(np.array([0.3, 0.29], F), ["code", "code"], np.ones(2, F), params)
    assert near["code"] > 0.99
    assert far["code"] < 0.5


def test_exemplar_weights_scale_votes() -> None:
    """A weight of 3 on one exemplar triples its vote."""
    shares = vote_shares(np.array([0.7, 0.7], F), ["a", "b"], np.array([3.0, 1.0], F), NO_NULL)
    assert shares["a"] == pytest.approx(0.75)


def test_ties_go_to_the_closer_best_match_then_name() -> None:
    """Equal shares: the route whose best neighbour is closer wins; then alphabetical."""
    labels = ["b", "a"]
    assert winning_label({"a": 0.5, "b": 0.5}, np.array([0.9, 0.8], F), labels) == "b"
    assert winning_label({"a": 0.5, "b": 0.5}, np.array([0.8, 0.8], F), labels) == "a"


def test_below_threshold_falls_back_to_default_with_reason() -> None:
    """Low confidence goes to the default route, flagged, saying which threshold was missed."""
    sims = np.array([0.6, 0.6], F)
    ids = np.array([0, 1])
    labels = np.array(["code", "chat"])
    d = decide_labelled(sims, ids, labels, np.ones(2, F), table(0.6), Policy(), NO_NULL)
    assert d.fallback and d.route == "general" and d.target == "local-small"
    assert "below its threshold 0.60" in d.reason
    assert d.scores["code"] == pytest.approx(0.5)


def test_confident_decision_keeps_route_and_chain() -> None:
    """Above threshold: the route's own chain, primary first."""
    d = decide_labelled(
        np.array([0.9, 0.5], F),
        np.array([0, 1]),
        np.array(["code", "chat"]),
        np.ones(2, F),
        table(0.5),
        Policy(),
        NO_NULL,
    )
    assert (d.route, d.target, d.targets, d.fallback) == (
        "code",
        "cloud",
        ("cloud", "local-big"),
        False,
    )


def test_require_local_filters_the_chain() -> None:
    """require_local drops non-local targets from the fallback chain."""
    d = decide_labelled(
        np.array([0.9], F),
        np.array([0]),
        np.array(["code"]),
        np.ones(1, F),
        table(),
        Policy(require_local=True),
        NO_NULL,
    )
    assert d.targets == ("local-big",)


def test_policy_excluding_everything_raises() -> None:
    """A policy no target satisfies is an explicit NoTargetAvailable, not a silent pick."""
    with pytest.raises(NoTargetAvailable, match="no target of route 'code'"):
        decide_labelled(
            np.array([0.9], F),
            np.array([0]),
            np.array(["code"]),
            np.ones(1, F),
            table(default=None),
            Policy(allowed_targets=("local-small",)),
            NO_NULL,
        )


def test_shrinkage_pulls_few_neighbours_toward_the_mean() -> None:
    """With m pseudo-neighbours at the target mean, one lucky neighbour cannot claim 1.0."""
    sims = np.array([0.8], F)
    scores = np.array([[1.0, 0.0]], F)
    means = np.array([0.4, 0.6], F)
    raw = predict_quality(sims, scores, np.ones(1, F), means, DecisionParams(shrinkage=0.0))
    shrunk = predict_quality(sims, scores, np.ones(1, F), means, DecisionParams(shrinkage=1.0))
    assert raw.tolist() == pytest.approx([1.0, 0.0])
    assert shrunk.tolist() == pytest.approx([0.7, 0.3])


def test_local_step_shrinks_the_closest_neighbours_toward_the_neighbourhood() -> None:
    """local_k=2 of 3 neighbours (given unsorted), equal weights (flat temperature):
    broad = ((1 + 0 + 1) + 1 * 0.5) / (3 + 1) = 0.625 for both targets; the closest two are
    rows 0 (0.9) and 2 (0.8): ((1 + 1) + 2 * 0.625) / (2 + 2) = 0.8125 and
    ((0 + 1) + 2 * 0.625) / (2 + 2) = 0.5625."""
    sims = np.array([0.9, 0.5, 0.8], F)
    scores = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], F)
    means = np.array([0.5, 0.5], F)
    ones = np.ones(3, F)
    flat = {"temperature": 1e9, "shrinkage": 1.0, "local_shrinkage": 2.0}
    broad = predict_quality(sims, scores, ones, means, DecisionParams(**flat))
    assert broad.tolist() == pytest.approx([0.625, 0.625])
    local = predict_quality(sims, scores, ones, means, DecisionParams(local_k=2, **flat))
    assert local.tolist() == pytest.approx([0.8125, 0.5625])
    direct = predict_quality_local(sims, scores, ones, broad, DecisionParams(local_k=2, **flat))
    assert direct.tolist() == pytest.approx([0.8125, 0.5625])
    # local_k of 0 (off) or not below the neighbour count leaves the estimate as it was
    for k in (0, 3, 10):
        same = predict_quality(sims, scores, ones, means, DecisionParams(local_k=k, **flat))
        assert same.tolist() == pytest.approx(broad.tolist())


def test_unknown_scores_do_not_count() -> None:
    """NaN scores are skipped: the estimate uses only neighbours that know the target."""
    scores = np.array([[1.0, np.nan], [0.0, np.nan]], F)
    q = predict_quality(
        np.array([0.7, 0.7], F),
        scores,
        np.ones(2, F),
        np.array([0.5, 0.2], F),
        DecisionParams(shrinkage=0.0),
    )
    assert q[0] == pytest.approx(0.5)
    assert q[1] == pytest.approx(0.2)  # nobody knows it: the prior mean


def test_quality_tolerance_takes_the_cheapest_near_the_best() -> None:
    """Within the tolerance of the best predicted quality, the cheapest target comes first."""
    t = table()
    quality = {"cloud": 0.80, "local-big": 0.77, "local-small": 0.60}
    assert rank_by_quality(quality, t, Policy(), 0.0)[0] == "cloud"
    assert rank_by_quality(quality, t, Policy(quality_tolerance=0.05), 0.0)[0] == "local-big"
    assert rank_by_quality(quality, t, Policy(max_cost=1.0), 0.0) == ["local-big", "local-small"]


def test_cost_weight_trades_quality_for_price() -> None:
    """A cost weight lowers expensive targets' utility until a cheaper one wins."""
    quality = {"cloud": 0.80, "local-big": 0.70, "local-small": 0.60}
    assert rank_by_quality(quality, table(), Policy(), 0.0)[0] == "cloud"
    assert rank_by_quality(quality, table(), Policy(), 0.5)[0] == "local-big"


def test_outcome_decision_reports_quality_per_target() -> None:
    """An outcome decision routes to the best predicted target and lists every estimate."""
    t = RouteTable(
        {"a": Route("a", ("a",)), "b": Route("b", ("b",))},
        {"a": Target("a", 1, 1), "b": Target("b", 0.1, 0.1)},
    )
    d = decide_outcomes(
        np.array([0.9, 0.8], F),
        np.array([0, 1]),
        np.array([[1.0, 0.0], [1.0, 0.0]], F),
        ("a", "b"),
        np.ones(2, F),
        np.array([0.5, 0.5], F),
        t,
        Policy(),
        DecisionParams(shrinkage=1.0),
    )
    assert d.target == "a" and d.route == "a"
    assert set(d.scores) == {"a", "b"} and d.scores["a"] > d.scores["b"]
    assert d.confidence == pytest.approx(d.scores["a"])


def test_out_of_scope_exemplars_winning_the_vote_fall_back_whatever_the_threshold() -> None:
    """`oos` exemplars are not a route: when they win, the default route answers, flagged,
    saying why, even with no threshold; the confidence is scaled by their share."""
    sims = np.array([0.9, 0.88, 0.6], F)
    labels = np.array(["oos", "oos", "code"])
    d = decide_labelled(sims, np.arange(3), labels, np.ones(3, F), table(None), Policy(), NO_NULL)
    share = d.scores["oos"]
    assert d.fallback and d.route == "general" and d.target == "local-small"
    assert "out-of-scope examples" in d.reason and "'general'" in d.reason
    assert d.confidence == pytest.approx(share * (1 - share))


def test_out_of_scope_share_lowers_an_in_scope_decisions_confidence() -> None:
    """An in-scope winner keeps its route; its confidence is its share times one minus the
    out-of-scope share, so a threshold can still send it to the default route."""
    sims = np.array([0.9, 0.88, 0.85], F)
    labels = np.array(["code", "code", "oos"])
    d = decide_labelled(sims, np.arange(3), labels, np.ones(3, F), table(None), Policy(), NO_NULL)
    assert d.route == "code" and not d.fallback
    assert d.confidence == pytest.approx(d.scores["code"] * (1 - d.scores["oos"]))
    low = decide_labelled(sims, np.arange(3), labels, np.ones(3, F), table(0.7), Policy(),
                          NO_NULL)
    assert d.scores["code"] > 0.7 > low.confidence
    assert low.fallback and low.route == "general"


def test_out_of_scope_exemplars_without_a_default_route_raise() -> None:
    sims = np.array([0.9], F)
    with pytest.raises(NoTargetAvailable, match="no default route"):
        decide_labelled(sims, np.arange(1), np.array(["oos"]), np.ones(1, F),
                        table(None, default=None), Policy(), NO_NULL)
