"""Outcome estimates with missing scores: a row learnt from feedback knows one target's score,
and must add evidence for that target only (no model: the hash encoder)."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from semroute.config import DecisionSettings, Settings
from semroute.decision import DecisionParams, predict_quality, search_width
from semroute.index import ExemplarIndex, build_index
from semroute.loop.learn import LearnedRow, merge_feedback
from semroute.router import Router
from semroute.tune.outcomes import predict_batch, tune_outcomes
from tests.conftest import HashEncoder, write

F = np.float32


class SpreadEncoder(HashEncoder):
    """Each text a pseudo-random unit vector (seeded by its hash): no tied similarities, so a
    neighbourhood is the same whatever else the index holds."""

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        out = np.stack([
            np.random.default_rng(int.from_bytes(hashlib.sha256(t.encode()).digest()[:8],
                                                 "little")).normal(size=self.dimension)
            for t in texts
        ]).astype(F)
        normed: np.ndarray = out / np.linalg.norm(out, axis=1, keepdims=True)
        return normed


def _with_feedback_rows(
    rng: np.random.Generator, sims: np.ndarray, scores: np.ndarray, extra: int, target: int
) -> tuple[np.ndarray, np.ndarray]:
    """The neighbours plus ``extra`` rows observing ``target`` only, at random similarities,
    all sorted most similar first as a search returns them."""
    new_sims = rng.uniform(sims.min() - 0.05, 1.0, extra).astype(F)
    new_scores = np.full((extra, scores.shape[1]), np.nan, F)
    new_scores[:, target] = rng.uniform(0, 1, extra)
    all_sims = np.concatenate([sims, new_sims])
    all_scores = np.concatenate([scores, new_scores])
    order = np.argsort(-all_sims, kind="stable")
    return all_sims[order], all_scores[order]


def test_a_feedback_row_never_moves_the_targets_it_did_not_observe() -> None:
    """Adding rows that observed target 0 only leaves every other target's estimate exactly as
    it was (broad and local step, any k), and does move target 0's."""
    rng = np.random.default_rng(0)
    for trial in range(30):
        n, t = 40, 4
        sims = np.sort(rng.uniform(0.2, 0.9, n)).astype(F)[::-1].copy()
        scores = rng.uniform(0, 1, (n, t)).astype(F)
        scores[rng.uniform(size=(n, t)) < 0.3] = np.nan  # some exemplars miss scores too
        means = rng.uniform(0.3, 0.7, t).astype(F)
        params = DecisionParams(temperature=0.1, shrinkage=3.0, k=int(rng.integers(3, 15)),
                                local_k=int(rng.integers(0, 3)), local_shrinkage=5.0,
                                feedback_shrinkage=float(rng.choice([0.5, 5.0, 50.0])))
        before = predict_quality(sims, scores, np.ones(n, F), means, params)
        more_sims, more_scores = _with_feedback_rows(rng, sims, scores, 25, target=0)
        after = predict_quality(more_sims, more_scores, np.ones(len(more_sims), F), means,
                                params)
        np.testing.assert_allclose(after[1:], before[1:], rtol=1e-6, err_msg=f"trial {trial}")
        assert after[0] != before[0]


def test_without_fully_scored_rows_each_target_uses_its_k_closest_observations() -> None:
    """No neighbour has every score: with k = 2, target 1 (observed only by the third and
    fourth neighbours) is estimated from those two, not from an empty neighbourhood."""
    sims = np.array([0.9, 0.8, 0.7, 0.6], F)
    scores = np.array([[1.0, np.nan], [1.0, np.nan], [np.nan, 0.2], [np.nan, 0.2]], F)
    q = predict_quality(sims, scores, np.ones(4, F), np.array([0.5, 0.5], F),
                        DecisionParams(shrinkage=0.0, k=2))
    assert q[0] == 1.0 and abs(float(q[1]) - 0.2) < 1e-6


def test_feedback_rows_move_their_target_by_closeness_and_count() -> None:
    """The fully scored rows' estimate moves toward the feedback rows' scores: more for many
    close rows than for one, hardly for distant ones, not at all when feedback is off."""
    scored_sims = np.array([0.8, 0.7], F)
    scored = np.array([[0.5, 0.5], [0.5, 0.5]], F)
    means = np.full(2, 0.5, F)
    params = DecisionParams(temperature=0.05, shrinkage=0.0, k=2, feedback_shrinkage=2.0)

    def with_feedback(sims: list[float], p: DecisionParams = params) -> float:
        fb = np.array([[1.0, np.nan]] * len(sims), F)
        all_sims = np.concatenate([scored_sims, np.array(sims, F)])
        q = predict_quality(all_sims, np.concatenate([scored, fb]), np.ones(len(all_sims), F),
                            means, p)
        assert q[1] == 0.5  # never observed by a feedback row
        return float(q[0])

    one, many, far = with_feedback([0.8]), with_feedback([0.8] * 10), with_feedback([0.3] * 10)
    assert 0.5 < far < 0.51 < one < many < 1.0
    assert with_feedback([0.8] * 10, DecisionParams(shrinkage=0.0, k=2)) == 0.5


def test_fully_scored_neighbours_give_the_same_estimate_as_before() -> None:
    """On a fully scored neighbourhood the per-target limit is the plain first k."""
    rng = np.random.default_rng(1)
    sims = np.sort(rng.uniform(0.2, 0.9, 30)).astype(F)[::-1].copy()
    scores = rng.uniform(0, 1, (30, 3)).astype(F)
    means = np.full(3, 0.5, F)
    limited = predict_quality(sims, scores, np.ones(30, F), means, DecisionParams(k=10))
    cut = predict_quality(sims[:10], scores[:10], np.ones(10, F), means, DecisionParams())
    np.testing.assert_allclose(limited, cut, rtol=1e-6)


def test_search_width_reaches_past_k_only_when_scores_are_missing() -> None:
    """A fully scored index searches k; one where a target is observed by a tenth of the rows
    searches about twenty times wider, never past the index."""
    full = np.ones((1000, 3), F)
    assert search_width(10, full) == 10
    sparse = full.copy()
    sparse[100:, 1] = np.nan
    assert search_width(10, sparse) == 200
    assert search_width(80, sparse) == 1000


def test_the_vectorised_tuner_estimate_matches_the_core_on_missing_scores() -> None:
    """``tune.outcomes.predict_batch`` (what the build's CV sweeps) agrees with
    ``decision.predict_quality`` when no neighbour has every score, local step included."""
    rng = np.random.default_rng(2)
    n, w, t = 6, 50, 3
    sims = -np.sort(-rng.uniform(0.1, 0.9, (n, w)), axis=1).astype(F)
    scores = rng.uniform(0, 1, (n, w, t))
    scores[rng.uniform(size=(n, w, t)) < 0.6] = np.nan
    scores[:, :, 2][np.isfinite(scores).all(axis=2)] = np.nan
    weights = np.ones((n, w), F)
    prior = rng.uniform(0.3, 0.7, t)
    batch = predict_batch(sims, scores, weights, prior, 0.1, 3.0, 4, 10.0, k=8)
    for i in range(n):
        core = predict_quality(sims[i], scores[i].astype(F), weights[i], prior.astype(F),
                               DecisionParams(temperature=0.1, shrinkage=3.0, k=8, local_k=4,
                                              local_shrinkage=10.0))
        np.testing.assert_allclose(batch[i], core, rtol=1e-5, atol=1e-6)


def test_tuning_holds_out_only_fully_scored_rows() -> None:
    """Feedback rows (one score each) join the neighbours but are never scored as held-out
    rows: the CV figures stay finite and the single-target hull is the complete rows' one."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(300, 8)).astype(F)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y = np.clip(0.5 + 0.3 * x[:, :2] @ np.array([[1.0, -1.0], [0.5, 1.0]]), 0, 1)
    y = np.concatenate([y, np.full((300, 1), 0.4)], axis=1)
    y[100:, 1:] = np.nan  # 200 feedback rows that observed target 0 only
    tuned = tune_outcomes(x, y, [1.0, 0.1, 0.5])
    assert tuned is not None and math.isfinite(tuned.cv_aiq_knn)
    complete_only = tune_outcomes(x[:100], y[:100], [1.0, 0.1, 0.5])
    assert complete_only is not None
    assert tuned.cv_aiq_single_targets == complete_only.cv_aiq_single_targets
    # the feedback rows' pseudo-count was tried on the same folds, kept only if it helped
    assert tuned.cv_aiq_feedback is not None
    assert (tuned.feedback_shrinkage is not None) == (tuned.cv_aiq > complete_only.cv_aiq)


def test_router_predictions_for_unobserved_targets_survive_learnt_rows(tmp_path: Path) -> None:
    """End to end through the index and the router's widened search: an index with many rows
    that observed ``cheap`` only predicts ``strong`` exactly as the index without them."""
    head = "text,cheap,strong\n"
    base = "".join(f"exemplar {i},{(i % 3) / 2},{(i % 4) / 4}\n" for i in range(60))
    learnt = "".join(f"feedback {i},{i % 2},\n" for i in range(400))
    encoder = SpreadEncoder(dimension=8)
    plain = build_index([write(tmp_path / "a.csv", head + base)], tmp_path / "a", encoder,
                        progress=False, tune=False)
    grown = build_index([write(tmp_path / "b.csv", head + base + learnt)], tmp_path / "b",
                        encoder, progress=False, tune=False)
    settings = Settings(decision=DecisionSettings(k=8, temperature=0.1, shrinkage=2.0,
                                                  feedback_shrinkage=1.0))
    before = Router(encoder, ExemplarIndex.load(plain), settings)
    after = Router(encoder, ExemplarIndex.load(grown), settings)
    moved = 0
    for q in (f"query {i}" for i in range(40)):
        old, new = before.route(q).scores, after.route(q).scores
        assert math.isclose(new["strong"], old["strong"], rel_tol=1e-6), q
        moved += not math.isclose(new["cheap"], old["cheap"], rel_tol=1e-6)
    assert moved > 30  # the learnt rows did change the target they observed


def test_merge_keeps_measured_scores_and_fills_only_blanks() -> None:
    """Learn's merge: an exemplar keeps its measured scores, feedback fills its blank cells;
    a new text gets the mean feedback per target that answered it and NaN elsewhere."""
    texts = ["known", "half"]
    scores = np.array([[0.9, 0.1], [np.nan, 0.5]])
    rows = [
        LearnedRow("r1", "known", "a", "a", 0.0, 1.0),  # measured: stays 0.9
        LearnedRow("r2", "half", "a", "a", 0.2, 2.0),  # blank: filled
        LearnedRow("r3", "new", "b", "b", 1.0, 3.0),
        LearnedRow("r4", "new", "b", "b", 0.0, 4.0),  # the same text again: averaged
        LearnedRow("r5", "new", "a", "a", 0.7, 5.0),  # explored: another target's score
        LearnedRow("r6", "only-b", "b", "b", 0.3, 6.0),
    ]
    merged = merge_feedback(texts, scores, ["a", "b"], rows)
    assert list(merged) == ["known", "half", "new", "only-b"]
    assert merged["known"] == [0.9, 0.1]
    assert merged["half"] == [0.2, 0.5]
    assert merged["new"] == [0.7, 0.5]
    assert math.isnan(merged["only-b"][0]) and merged["only-b"][1] == 0.3
