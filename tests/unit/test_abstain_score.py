"""The abstention score (semroute.abstain) and its use in labelled decisions: features from the
neighbours, the logistic fit, and a threshold on the score sending far queries to the default."""

from __future__ import annotations

import numpy as np
import pytest

from semroute.abstain import AbstainModel, fit_abstain, neighbour_features, own_density
from semroute.decision import DecisionParams, decide_labelled
from semroute.types import Policy, Route, RouteTable, Target

F = np.float32


def test_density_feature_asks_more_of_queries_in_tight_clusters() -> None:
    """The same best match counts as further out when the matched exemplars sit in a tight
    cluster (own density 0.9) than in a loose one (0.5)."""
    sims = np.array([0.7, 0.65], F)
    shares = {"a": 0.9}
    tight = neighbour_features(sims, shares, "a", np.array([0.9, 0.9]))
    loose = neighbour_features(sims, shares, "a", np.array([0.5, 0.5]))
    assert tight["density"] == pytest.approx(0.7 - 0.9)
    assert loose["density"] == pytest.approx(0.7 - 0.5)
    assert tight["top1"] == loose["top1"] == pytest.approx(0.7)
    assert tight["margin"] == pytest.approx(0.9)


def test_own_density_averages_the_nearest_others_and_skips_empty_slots() -> None:
    """Each row's density is the mean of its k best similarities; -inf slots do not count."""
    sims = np.array([[0.9, 0.5, 0.1], [0.8, -np.inf, -np.inf]])
    assert own_density(sims, k=2).tolist() == pytest.approx([0.7, 0.8])


def test_fit_learns_that_far_queries_are_wrong_more_often() -> None:
    """On synthetic rows where right answers have high top-1 similarity, the fitted score
    ranks a close query above a far one and stays a probability."""
    rng = np.random.default_rng(0)
    right = rng.random(400) < 0.5
    top1 = np.where(right, 0.8, 0.4) + rng.normal(0, 0.1, 400)
    table = {"top1": top1, "share": rng.random(400)}
    model = fit_abstain(table, right.astype(float), features=("top1", "share"))
    near, far = model.score({"top1": 0.85, "share": 0.5}), model.score({"top1": 0.35, "share": 0.5})
    assert 0.0 < far < 0.2 < 0.8 < near < 1.0
    assert model.weights[0] > 0


def test_fit_needs_both_outcomes() -> None:
    """All-right rows cannot teach a score: a clear error, not a degenerate model."""
    with pytest.raises(ValueError, match="both outcomes"):
        fit_abstain({"top1": np.ones(3)}, np.ones(3), features=("top1",))


def test_model_round_trips_through_its_json_form() -> None:
    """The manifest form gives back a model with the same scores."""
    model = AbstainModel(("top1", "share"), (0.5, 0.5), (0.1, 0.2), (2.0, 1.0), -0.5)
    again = AbstainModel.from_dict(model.to_dict())
    feats = {"top1": 0.6, "share": 0.9}
    assert again.score(feats) == pytest.approx(model.score(feats))


def _table() -> RouteTable:
    routes = {"a": Route("a", ("a",)), "b": Route("b", ("b",)),
              "default": Route("default", ("default",))}
    targets = {n: Target(n) for n in routes}
    return RouteTable(routes, targets, "default", 0.5)


def test_decision_confidence_is_the_model_score_and_far_queries_fall_back() -> None:
    """With a model, confidence is its score: a unanimous vote of distant neighbours falls
    back to the default route (score well under the threshold), a close one is answered."""
    model = AbstainModel(("top1",), (0.5,), (0.1,), (5.0,), 0.0)  # score = sigmoid(50 (top1 - .5))
    params = DecisionParams(null_similarity=None, abstain=model)
    labels = np.array(["a", "a", "b"])
    ids = np.array([0, 1, 2], dtype=np.int64)
    weights, density = np.ones(3, F), np.full(3, 0.6, F)
    far = decide_labelled(np.array([0.3, 0.29, 0.1], F), ids, labels, weights, _table(), Policy(),
                          params, density)
    near = decide_labelled(np.array([0.8, 0.79, 0.1], F), ids, labels, weights, _table(),
                           Policy(), params, density)
    assert far.fallback and far.route == "default" and far.confidence < 0.01
    assert not near.fallback and near.route == "a" and near.confidence > 0.99
    assert near.scores["a"] > 0.99  # the vote shares are still reported


def test_without_densities_confidence_stays_the_vote_share() -> None:
    """An index without the density file (older builds) keeps the vote share."""
    model = AbstainModel(("top1",), (0.5,), (0.1,), (5.0,), 0.0)
    d = decide_labelled(np.array([0.3, 0.29], F), np.array([0, 1], dtype=np.int64),
                        np.array(["a", "a"]), np.ones(2, F), _table(), Policy(),
                        DecisionParams(null_similarity=None, abstain=model), None)
    assert d.confidence == pytest.approx(1.0) and not d.fallback
