"""The outcome tuner's hull guarantee: on its own CV folds an outcome index never scores an AIQ
below always picking the best single target per cost level."""

from __future__ import annotations

import numpy as np
import pytest

from semroute.decision import DecisionParams, predict_quality
from semroute.tune.outcomes import tune_outcomes


def _clustered(n: int, informative: bool, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two clusters of queries; when informative, the cheap target is right on cluster 0 and
    the dear one on cluster 1, otherwise scores are noise unrelated to the vectors."""
    rng = np.random.default_rng(seed)
    cluster = rng.integers(0, 2, n)
    centres = np.array([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    x = centres[cluster] + rng.normal(scale=0.2, size=(n, 4))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    if informative:
        cheap = (cluster == 0).astype(float)
        dear = np.where(cluster == 1, 1.0, 0.5)
    else:
        cheap = (rng.random(n) < 0.4).astype(float)
        dear = (rng.random(n) < 0.6).astype(float)
    return x, np.column_stack([cheap, dear])


def test_misleading_neighbours_degrade_to_the_single_target_hull() -> None:
    """Queries come in near-identical twins with opposite right targets, so a query's nearest
    neighbour always points the wrong way: the default kNN falls below the hull, no setting
    beats it, so the index ignores its neighbours and its CV AIQ is exactly the hull's."""
    rng = np.random.default_rng(0)
    base = rng.normal(size=(100, 16))
    x = np.repeat(base, 2, axis=0) + rng.normal(scale=1e-3, size=(200, 16))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    # twin 0: the cheap target is right (the dear one half right); twin 1: only the dear one
    first = np.tile([1.0, 0.0], 100)
    scores = np.column_stack([first, np.where(first == 1.0, 0.5, 1.0)])
    t = tune_outcomes(x, scores, [1.0, 10.0])
    assert t is not None
    assert t.cv_aiq_untuned < t.cv_aiq_single_targets - 0.05
    assert t.cv_aiq_knn <= t.cv_aiq_single_targets
    assert not t.use_neighbours
    assert t.cv_aiq == pytest.approx(t.cv_aiq_single_targets)


def test_the_chosen_decision_is_never_below_the_hull() -> None:
    """Whatever the data, the recorded CV AIQ is at least the single-target hull's."""
    for seed in range(3):
        x, scores = _clustered(120, informative=False, seed=seed)
        t = tune_outcomes(x, scores, [1.0, 10.0])
        assert t is not None and t.cv_aiq >= t.cv_aiq_single_targets


def test_informative_neighbours_beat_the_hull_and_are_kept() -> None:
    """When neighbours say which target is right, the tuned index is above the hull."""
    x, scores = _clustered(200, informative=True)
    t = tune_outcomes(x, scores, [1.0, 10.0])
    assert t is not None
    assert t.use_neighbours and t.cv_aiq > t.cv_aiq_single_targets + 0.05


def test_neighbours_off_gives_every_query_the_target_means() -> None:
    """A degraded index predicts the prior means whatever the neighbours say."""
    prior = np.array([0.4, 0.6], np.float32)
    q = predict_quality(np.array([0.9, 0.8], np.float32), np.array([[1.0, 0.0], [1.0, 0.0]], np.float32),
                        np.ones(2, np.float32), prior, DecisionParams(use_neighbours=False))
    assert q.tolist() == pytest.approx(prior.tolist())


def test_no_cost_axis_means_no_tuning() -> None:
    """Targets of equal price give AIQ no range: the build keeps the defaults."""
    x, scores = _clustered(60, informative=True)
    assert tune_outcomes(x, scores, [1.0, 1.0]) is None
