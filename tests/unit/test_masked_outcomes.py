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
from semroute.tune.outcomes import feedback_batch, predict_batch, tune_outcomes
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


def test_a_feedback_row_never_changes_the_differences_between_targets_it_did_not_observe(
) -> None:
    """Adding rows that observed target 0 only shifts every other target by the same amount
    (their shared residual), so their differences, hence the choice among them, stay exactly
    as the fully scored rows say (broad and local step, any k); target 0 moves against them."""
    rng = np.random.default_rng(0)
    for trial in range(30):
        n, t = 40, 4
        sims = np.sort(rng.uniform(0.2, 0.9, n)).astype(F)[::-1].copy()
        scores = rng.uniform(0, 1, (n, t)).astype(F)
        means = rng.uniform(0.3, 0.7, t).astype(F)
        params = DecisionParams(temperature=0.1, shrinkage=3.0, k=int(rng.integers(3, 15)),
                                local_k=int(rng.integers(0, 3)), local_shrinkage=5.0,
                                feedback_shrinkage=float(rng.choice([0.5, 5.0, 50.0])))
        before = predict_quality(sims, scores, np.ones(n, F), means, params)
        more_sims, more_scores = _with_feedback_rows(rng, sims, scores, 25, target=0)
        after = predict_quality(more_sims, more_scores, np.ones(len(more_sims), F), means,
                                params)
        shift = after - before
        np.testing.assert_allclose(shift[1:], shift[1], atol=1e-6, err_msg=f"trial {trial}")
        assert abs(shift[0] - shift[1]) > 1e-6


def test_without_fully_scored_rows_each_target_uses_its_k_closest_observations() -> None:
    """No neighbour has every score: with k = 2, target 1 (observed only by the third and
    fourth neighbours) is estimated from those two, not from an empty neighbourhood."""
    sims = np.array([0.9, 0.8, 0.7, 0.6], F)
    scores = np.array([[1.0, np.nan], [1.0, np.nan], [np.nan, 0.2], [np.nan, 0.2]], F)
    q = predict_quality(sims, scores, np.ones(4, F), np.array([0.5, 0.5], F),
                        DecisionParams(shrinkage=0.0, k=2))
    assert q[0] == 1.0 and abs(float(q[1]) - 0.2) < 1e-6


def _corrected(fb_sims: list[float], fb_scores: list[list[float]],
               params: DecisionParams) -> np.ndarray:
    """Three targets all estimated 0.5 by two fully scored rows at 0.8 and 0.7, corrected by
    feedback rows at ``fb_sims`` with ``fb_scores`` (NaN: not observed)."""
    sims = np.concatenate([np.array([0.8, 0.7], F), np.array(fb_sims, F)])
    scores = np.concatenate([np.full((2, 3), 0.5, F), np.array(fb_scores, F).reshape(-1, 3)])
    return predict_quality(sims, scores, np.ones(len(sims), F), np.full(3, 0.5, F), params)


def test_feedback_residuals_move_a_target_against_the_others_only_where_they_differ() -> None:
    """Feedback rows where target 0 scored 1 and target 1 scored 0 (different queries) rank
    0 above the fully scored estimate and 1 below; rows that all observed target 0 at 1 say
    mostly that these queries are easy: every target rises, 0 only a little more. Distant rows
    hardly count, and nothing moves with the feedback correction off."""
    n = np.nan
    params = DecisionParams(temperature=0.05, shrinkage=0.0, k=20, feedback_shrinkage=2.0)
    mixed = _corrected([0.8] * 10, [[1.0, n, n]] * 5 + [[n, 0.0, n]] * 5, params)
    assert mixed[0] > 0.6 and mixed[1] < 0.4 and abs(float(mixed[2]) - 0.5) < 1e-6
    easy = _corrected([0.8] * 10, [[1.0, n, n]] * 10, params)
    assert 0.9 < easy[2] == easy[1] < easy[0] < 1.0
    assert easy[0] - easy[1] < mixed[0] - mixed[1]
    far = _corrected([0.8] + [0.3] * 10, [[1.0, n, n]] + [[n, 0.0, n]] * 10, params)
    near = _corrected([0.8] * 11, [[1.0, n, n]] + [[n, 0.0, n]] * 10, params)
    assert far[1] - 0.5 > 0.5 * (near[1] - 0.5)  # the ten distant zeros barely count
    off = _corrected([0.8] * 10, [[1.0, n, n]] * 10, DecisionParams(shrinkage=0.0, k=20))
    np.testing.assert_allclose(off, 0.5)


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


def test_the_tuner_judges_the_feedback_correction_the_core_applies() -> None:
    """``tune.outcomes.feedback_batch`` on the fully scored rows' estimate (what the build's
    CV scores) equals ``decision.predict_quality`` on the same neighbours, feedback included."""
    rng = np.random.default_rng(4)
    k, t = 6, 3
    for _ in range(20):
        sims = rng.uniform(0.2, 0.9, 2 * k).astype(F)
        scores = rng.uniform(0, 1, (2 * k, t))
        partial = rng.permutation(2 * k)[:k]
        observed = rng.integers(0, t, k)
        for row, target in zip(partial, observed, strict=True):
            keep = scores[row, target]
            scores[row] = np.nan
            scores[row, target] = keep
        weights = rng.uniform(0.5, 1.5, 2 * k).astype(F)
        prior = rng.uniform(0.3, 0.7, t)
        params = DecisionParams(temperature=0.1, shrinkage=2.0, k=k, feedback_shrinkage=3.0,
                                feedback_temperature=0.05)
        core = predict_quality(sims, scores.astype(F), weights, prior.astype(F), params)
        whole = np.setdiff1d(np.arange(2 * k), partial)
        order_w = whole[np.argsort(-sims[whole])]
        order_p = partial[np.argsort(-sims[partial])]
        base = predict_batch(sims[order_w][None], scores[order_w][None], weights[order_w][None],
                             prior, 0.1, 2.0, k=k)
        batch = feedback_batch(sims[order_p][None], scores[order_p][None],
                               weights[order_p][None], sims[order_w][:1], base, 3.0, 0.05,
                               0.1)
        np.testing.assert_allclose(batch[0], core, rtol=1e-5, atol=1e-6)


def test_tuning_holds_out_only_fully_scored_rows() -> None:
    """Feedback rows (one score each) are never scored as held-out rows of the decision
    settings: those, the CV figures and the single-target hull are the complete rows' own."""
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
    assert (tuned.k, tuned.cv_aiq) == (complete_only.k, complete_only.cv_aiq)
    # the feedback correction was judged on held-out feedback rows, kept only if it helped:
    # here the feedback follows the same smooth truth the 100 fully scored rows see too coarsely
    assert tuned.feedback_error is not None and tuned.feedback_error_without is not None
    assert tuned.feedback_error < tuned.feedback_error_without
    assert tuned.feedback_shrinkage is not None
    # chosen by the AIQ of its choices replayed on held-out feedback rows, which it improves
    assert tuned.cv_aiq_feedback is not None and tuned.cv_aiq_feedback_without is not None
    assert tuned.cv_aiq_feedback > tuned.cv_aiq_feedback_without
    assert "replay AIQ" in tuned.summary()


def test_feedback_that_only_repeats_what_the_scored_rows_know_is_kept_out() -> None:
    """Feedback drawn as coin flips from the very probabilities the fully scored rows already
    estimate well carries no correction: held out, it is predicted no better with the
    correction than without, and the build leaves the feedback rows out of the decision (even
    when the best of the replayed settings beats no correction by chance)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1000, 8)).astype(F)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    mix = np.array([[1.0, -1.0, 0.0], [0.5, 1.0, 0.0], [0.0, 0.0, 1.0]])
    truth = np.clip(0.5 + 0.1 * x[:, :3] @ mix, 0, 1)
    y = truth.copy()
    y[400:] = np.nan
    y[400:, 0] = rng.uniform(size=600) < truth[400:, 0]
    tuned = tune_outcomes(x, y, [1.0, 0.1, 0.5])
    assert tuned is not None and tuned.feedback_error is not None
    assert tuned.feedback_error_without is not None
    assert tuned.feedback_error >= tuned.feedback_error_without
    assert tuned.feedback_shrinkage is None
    assert "feedback rows off" in tuned.summary()


def test_router_predictions_for_unobserved_targets_survive_learnt_rows(tmp_path: Path) -> None:
    """End to end through the index and the router's widened search: an index with many rows
    that observed ``cheap`` only ranks ``strong`` against ``mid`` exactly as the index without
    them (both shift by the same shared residual), and does move ``cheap``."""
    head = "text,cheap,strong,mid\n"
    base = "".join(f"exemplar {i},{(i % 3) / 2},{(i % 4) / 4},{(i % 5) / 4}\n" for i in range(60))
    learnt = "".join(f"feedback {i},{i % 2},,\n" for i in range(400))
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
        assert math.isclose(new["strong"] - new["mid"], old["strong"] - old["mid"],
                            abs_tol=1e-5), q
        moved += not math.isclose(new["cheap"] - new["mid"], old["cheap"] - old["mid"],
                                  abs_tol=1e-5)
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
