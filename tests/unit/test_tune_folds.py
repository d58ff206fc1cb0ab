"""The build-time tuner's fold logic and its vectorised estimators, checked against the core's
one-query decision functions."""

from __future__ import annotations

import numpy as np
import pytest

from semroute.abstain import neighbour_features
from semroute.decision import DecisionParams, predict_quality, vote_shares
from semroute.tune.folds import random_folds, route_groups, stratified_folds, top_neighbours
from semroute.tune.labelled import features_batch, tune_labelled, vote
from semroute.tune.outcomes import predict_batch


def test_stratified_folds_spread_every_label_over_every_fold() -> None:
    """10 rows of each of 3 labels over 5 folds: every fold holds exactly 2 of each label."""
    labels = np.repeat([0, 1, 2], 10)
    fold = stratified_folds(labels, 5, seed=1)
    for lab in range(3):
        assert np.bincount(fold[labels == lab], minlength=5).tolist() == [2] * 5


def test_route_groups_hold_each_route_out_whole() -> None:
    """All rows of a route share one group, and several groups are used."""
    labels = np.repeat(np.arange(7), 3)
    group = route_groups(labels, 3)
    for lab in range(7):
        assert len(set(group[labels == lab].tolist())) == 1
    assert len(set(group.tolist())) == 3


def test_random_folds_are_seeded_and_balanced() -> None:
    """Same seed, same folds; sizes differ by at most one."""
    a, b = random_folds(23, 5, seed=3), random_folds(23, 5, seed=3)
    assert a.tolist() == b.tolist()
    counts = np.bincount(a)
    assert counts.max() - counts.min() <= 1


def test_top_neighbours_are_sorted_and_can_exclude_self() -> None:
    """Best first; with exclude_self row i never finds itself."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    sims, ids = top_neighbours(x, x, 4, exclude_self=True, block=7)
    assert (ids != np.arange(50)[:, None]).all()
    assert (np.diff(sims, axis=1) <= 1e-7).all()
    full = x @ x.T
    np.fill_diagonal(full, -np.inf)
    assert sims[:, 0] == pytest.approx(full.max(axis=1), abs=1e-6)


def test_batch_vote_and_features_match_the_core() -> None:
    """The tuner's vectorised vote and features equal decision.vote_shares and
    abstain.neighbour_features query by query."""
    rng = np.random.default_rng(1)
    sims = np.sort(rng.uniform(0.2, 0.9, size=(6, 5)), axis=1)[:, ::-1].astype(np.float32)
    labels = rng.integers(0, 3, size=(6, 5))
    weights = rng.uniform(0.5, 2.0, size=(6, 5)).astype(np.float32)
    density = rng.uniform(0.3, 0.8, size=(6, 5))
    params = DecisionParams(temperature=0.05, null_similarity=0.35)
    shares = vote(sims, labels, weights, 3, 0.05, 0.35)
    winner, table = features_batch(sims, shares, density)
    for i in range(6):
        core = vote_shares(sims[i], [str(v) for v in labels[i]], weights[i], params)
        for lab, value in core.items():
            assert shares[i, int(lab)] == pytest.approx(value, rel=1e-5)
        feats = neighbour_features(sims[i], core, str(winner[i]), density[i])
        for name, value in feats.items():
            assert table[name][i] == pytest.approx(value, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("local_k", [0, 2])
def test_batch_quality_matches_predict_quality(local_k: int) -> None:
    """The tuner's vectorised estimate equals decision.predict_quality, local step included,
    on fully scored neighbours (what the build's CV sweeps; neighbourhoods with missing
    scores are checked in test_masked_outcomes.py)."""
    rng = np.random.default_rng(2)
    sims = np.sort(rng.uniform(0.2, 0.9, size=(4, 5)), axis=1)[:, ::-1].astype(np.float32)
    scores = rng.random((4, 5, 3))
    weights = np.ones((4, 5), np.float32)
    prior = np.array([0.3, 0.5, 0.7])
    batch = predict_batch(sims, scores, weights, prior, 0.1, 3.0, local_k, 10.0)
    params = DecisionParams(temperature=0.1, shrinkage=3.0, local_k=local_k, local_shrinkage=10.0)
    for i in range(4):
        one = predict_quality(sims[i], scores[i].astype(np.float32), weights[i],
                              prior.astype(np.float32), params)
        assert batch[i] == pytest.approx(one, rel=1e-4)


def test_labelled_tuner_picks_from_the_grid_and_fits_a_score() -> None:
    """Well separated synthetic routes: CV accuracy near 1, a chosen grid point, and an
    abstention score that ranks in-scope rows above held-out routes."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(6, 16))
    labels = np.repeat(np.arange(6), 20)
    x = centres[labels] + rng.normal(scale=0.35, size=(120, 16))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    t = tune_labelled(x, [f"r{v}" for v in labels], np.ones(120), null_similarity=0.35,
                      projection="none")
    assert t is not None
    assert t.cv_accuracy > 0.95 and t.k in (5, 10, 20, 40) and not t.projection
    assert t.abstain is not None and t.abstain_auroc is not None and t.abstain_auroc > 0.7


def test_labelled_tuner_declines_sets_too_small_to_fold() -> None:
    """Fewer than two rows per fold: no tuning (the build keeps the defaults)."""
    x = np.eye(4, dtype=np.float32)
    assert tune_labelled(x, ["a", "a", "b", "b"], np.ones(4), null_similarity=0.35) is None


def test_an_explicit_projection_setting_is_the_only_space_tried() -> None:
    """index.projection "learned" or "none" fixes the space: the tuner does not overrule it,
    so the score is fitted in the space the index will search."""
    rng = np.random.default_rng(3)
    labels = np.repeat(np.arange(4), 15)
    x = rng.normal(size=(4, 12))[labels] + rng.normal(scale=0.5, size=(60, 12))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    names = [f"r{v}" for v in labels]
    learned = tune_labelled(x, names, np.ones(60), null_similarity=0.35, projection="learned",
                            projection_epochs=2)
    plain = tune_labelled(x, names, np.ones(60), null_similarity=0.35, projection="none")
    assert learned is not None and learned.projection
    assert plain is not None and not plain.projection


def test_tuner_records_the_projection_strength_the_final_fit_uses() -> None:
    """The learned space is tried at the strength ``choose_strength`` picks, and the build's
    final ``fit_projection`` (strength left to CV) picks the same one on the same exemplars, so
    the manifest's figure describes the map the index serves."""
    from semroute.projection import (
        STRENGTH_GRID,
        ProjectionParams,
        choose_strength,
        fit_projection,
        shrink_toward_identity,
    )
    from semroute.tune.labelled import K_GRID, TEMPERATURE_GRID

    rng = np.random.default_rng(5)
    labels = np.repeat(np.arange(4), 15)
    x = rng.normal(size=(4, 12))[labels] + rng.normal(scale=0.8, size=(60, 12))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    names = [f"r{v}" for v in labels]
    t = tune_labelled(x, names, np.ones(60), null_similarity=0.35, projection="learned",
                      projection_epochs=2)
    assert t is not None and t.projection
    assert set(t.strength_cv_accuracy) == set(STRENGTH_GRID)
    assert t.projection_strength == max(STRENGTH_GRID, key=lambda s: t.strength_cv_accuracy[s])
    assert f"strength {t.projection_strength:g}" in t.summary()
    params = ProjectionParams(epochs=2)
    assert choose_strength(x, names, params).strength == t.projection_strength
    served = fit_projection(x, names, params)
    full = fit_projection(x, names, ProjectionParams(epochs=2, strength=1.0))
    assert np.array_equal(served, shrink_toward_identity(full, t.projection_strength))
    # the strength's CV searches the tuner's own (k, temperature) grid
    defaults = choose_strength.__kwdefaults__
    assert defaults is not None
    assert tuple(defaults["k_grid"]) == K_GRID
    assert tuple(defaults["temperatures"]) == TEMPERATURE_GRID
