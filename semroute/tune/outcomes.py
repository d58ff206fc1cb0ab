"""Build-time tuning of an outcome index, on its own exemplars only, with a hull guarantee.

Out-of-fold predicted quality for every exemplar (the core's estimator, vectorised here and
checked against ``decision.predict_quality`` in the tests) is swept over cost weights; the grid
point with the best AIQ wins (k x temperature x shrinkage, then the local step given those).
If that AIQ does not beat the single targets' hull on the same rows, the index is marked to
ignore its neighbours: every query then gets the targets' mean scores, which is the best single
target for each cost weight, so the index never lands below that hull on its own folds.

Rows with missing scores (learnt from feedback: only the target that answered is known) are
never held out: a route can only be scored where every target's outcome is known. With enough
fully scored rows, the settings above are tuned on those alone (the decision's estimate runs
over them, ``decision.predict_quality``), then the feedback rows' correction
(``feedback_shrinkage`` and ``feedback_temperature``, ``decision.feedback_step``) is chosen on
folds of the feedback rows by the AIQ of its choices replayed on the held-out ones (the score a
row observed where a choice picks its target, the fully scored rows' estimate elsewhere); it is
kept only when it beats the fully scored rows alone on that replay and on the held-out observed
scores' squared error. With too few fully scored rows
every row is held out, unknown scores counted at the target's mean.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import numpy as np
import numpy.typing as npt

from semroute.decision import feedback_correction, observed_first, search_width
from semroute.tune.folds import random_folds, top_neighbours
from semroute.tune.frontier import aiq, cost_quality_sweep, single_targets

Matrix = npt.NDArray[np.float32]
FloatArray = npt.NDArray[np.float64]

K_GRID: tuple[int, ...] = (10, 20, 40, 80, 160)
TEMPERATURE_GRID: tuple[float, ...] = (0.02, 0.05, 0.1, 0.3, 1.0)
SHRINKAGE_GRID: tuple[float, ...] = (1.0, 3.0, 10.0, 30.0)
LOCAL_K_GRID: tuple[int, ...] = (10, 20, 40)
LOCAL_SHRINKAGE_GRID: tuple[float, ...] = (10.0, 30.0, 100.0, 300.0)
FEEDBACK_SHRINKAGE_GRID: tuple[float, ...] = (1.0, 3.0, 10.0, 30.0, 100.0)
FEEDBACK_TEMPERATURE_GRID: tuple[float, ...] = (0.01, 0.02, 0.05, 0.1, 0.3)
UNTUNED = {"k": 10, "temperature": 0.05, "shrinkage": 1.0, "local_k": 0}


@dataclass(frozen=True)
class OutcomeTuning:
    """What an outcome build chose, and the cross-validated AIQ behind it."""

    k: int
    temperature: float
    shrinkage: float
    local_k: int
    local_shrinkage: float
    use_neighbours: bool
    cv_aiq: float  # of the chosen decision (the hull's when the neighbours are ignored)
    cv_aiq_knn: float  # of the best kNN setting
    cv_aiq_untuned: float
    cv_aiq_single_targets: float
    folds: int
    seconds: float = 0.0
    grid: tuple[tuple[int, float, float, int, float, float], ...] = field(default=(), repr=False)
    feedback_shrinkage: float | None = None  # None: rows learnt from feedback are ignored
    feedback_temperature: float = 0.05
    # replay AIQ on held-out feedback rows (``_with_feedback``) of the chosen correction and
    # of none (None: no feedback rows)
    cv_aiq_feedback: float | None = None
    cv_aiq_feedback_without: float | None = None
    # held-out feedback rows' mean squared error on their observed targets, with the chosen
    # correction and without any (shown, not the criterion)
    feedback_error: float | None = None
    feedback_error_without: float | None = None

    def summary(self) -> str:
        mode = (
            f"k={self.k} T={self.temperature:g} shrinkage={self.shrinkage:g} "
            f"local_k={self.local_k}"
            if self.use_neighbours
            else "neighbours off (best single target per cost level)"
        )
        if self.feedback_error is not None:
            used = (
                "off" if self.feedback_shrinkage is None
                else f"shrinkage {self.feedback_shrinkage:g} T {self.feedback_temperature:g}"
            )
            mode += (
                f"; feedback rows {used} (held-out feedback replay AIQ "
                f"{self.cv_aiq_feedback or 0.0:.4f} with them, "
                f"{self.cv_aiq_feedback_without or 0.0:.4f} without; squared error "
                f"{self.feedback_error:.4f} / {self.feedback_error_without:.4f})"
            )
        return (
            f"tuned on {self.folds}-fold CV: {mode}; AIQ {self.cv_aiq:.4f} (kNN "
            f"{self.cv_aiq_knn:.4f}, untuned {self.cv_aiq_untuned:.4f}, single-target hull "
            f"{self.cv_aiq_single_targets:.4f}) in {self.seconds:.1f}s"
        )


def predict_batch(
    sims: Matrix,
    scores: FloatArray,
    weights: Matrix,
    prior: FloatArray,
    temperature: float,
    shrinkage: float,
    local_k: int = 0,
    local_shrinkage: float = 100.0,
    k: int = 0,
) -> FloatArray:
    """``decision.predict_quality`` for many queries: ``sims`` (n, w) best first, ``scores``
    (n, w, targets) with NaN unknown, ``weights`` (n, w) exemplar weights, ``prior``
    (n, targets) or (targets,); per target the first ``k`` neighbours that observed it count
    (all when 0)."""
    broad = _shrunk(sims, scores, weights, np.broadcast_to(prior, (len(sims), scores.shape[2])),
                    temperature, shrinkage, k)
    if 0 < local_k < (k or sims.shape[1]):
        return _shrunk(sims, scores, weights, broad, temperature, local_shrinkage, local_k)
    return broad


def _shrunk(
    sims: Matrix, scores: FloatArray, weights: Matrix, prior: FloatArray, temperature: float,
    shrinkage: float, limit: int = 0,
) -> FloatArray:
    known = np.isfinite(scores)
    if limit and known.all():  # fully scored: the first ``limit`` neighbours, as before
        sims, scores, weights, known = (sims[:, :limit], scores[:, :limit], weights[:, :limit],
                                        known[:, :limit])
        limit = 0
    s = np.asarray(sims, dtype=np.float64)
    w = np.exp((s - s.max(axis=1, keepdims=True)) / temperature) * weights
    used = observed_first(known, limit, axis=1).astype(np.float64)
    count = used.sum(axis=1)
    wt = w[:, :, None] * used
    scale = count / np.maximum(wt.sum(axis=1), 1e-300)
    filled = np.where(known, scores, 0.0)
    num = np.einsum("nkt,nkt->nt", wt, filled) * scale + shrinkage * prior
    den = count + shrinkage
    out: FloatArray = np.where(den > 0, num / np.maximum(den, 1e-12), prior)
    return out


def tune_outcomes(
    vectors: Matrix,
    scores: npt.ArrayLike,
    costs: npt.ArrayLike,
    weights: npt.ArrayLike | None = None,
    *,
    n_folds: int = 5,
    seed: int = 0,
) -> OutcomeTuning | None:
    """Choose the outcome decision settings by cross-validated AIQ; None when the exemplars
    are too few to cross-validate or every target costs the same (no cost axis)."""
    started = time.perf_counter()
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    y = np.asarray(scores, dtype=np.float64)
    c = np.asarray(costs, dtype=np.float64)
    w_ex = np.ones(len(x), np.float32) if weights is None else np.asarray(weights, np.float32)
    if len(x) < 4 * n_folds or y.shape[1] < 2 or float(c.max() - c.min()) <= 0:
        return None
    whole: npt.NDArray[np.bool_] = np.asarray(np.isfinite(y).all(axis=1), dtype=bool)
    if not whole.all() and whole.sum() >= 4 * n_folds:
        scored = tune_outcomes(x[whole], y[whole], c, w_ex[whole], n_folds=n_folds, seed=seed)
        if scored is None or not scored.use_neighbours:
            return scored
        return _with_feedback(x, y, c, w_ex, whole, scored, seed, started)
    # Held out: the fully scored rows (the only ones whose every choice can be scored), or, when
    # they are too few, every row with its unknown scores counted at the target's mean (the
    # place the estimator shrinks them to). The other rows are neighbours in every fold.
    complete = np.flatnonzero(np.isfinite(y).all(axis=1))
    rows = complete if len(complete) >= 4 * n_folds else np.arange(len(x))
    means = np.nanmean(np.where(np.isfinite(y), y, np.nan), axis=0)
    means = np.where(np.isfinite(means), means, 0.0)
    truth = np.where(np.isfinite(y[rows]), y[rows], means)
    fold = np.full(len(x), -1, dtype=np.int64)
    fold[rows] = random_folds(len(rows), n_folds, seed)
    always_base = len(x) - len(rows)
    kmax = min(max(K_GRID),
               int(np.bincount(fold[rows]).min() * (n_folds - 1)) + always_base)
    width = search_width(kmax, y.astype(np.float32))
    held_rows, fold_sims, fold_ids, priors = [], [], [], []
    for f in range(n_folds):
        base, held = np.flatnonzero(fold != f), np.flatnonzero(fold[rows] == f)
        sims, idx = top_neighbours(x[rows[held]], x[base], width)
        prior = np.nanmean(y[base], axis=0)
        held_rows.append(held)
        fold_sims.append(sims)
        fold_ids.append(base[idx])
        priors.append(np.where(np.isfinite(prior), prior, 0.0))
    lo_hi = (float(c.min()), float(c.max()))

    def cv_aiq(k: int, t: float, m: float, lk: int = 0, lm: float = 100.0) -> float:
        pred = np.zeros_like(truth)
        w = search_width(k, y.astype(np.float32))
        for held, sims, ids, prior in zip(held_rows, fold_sims, fold_ids, priors, strict=True):
            pred[held] = predict_batch(sims[:, :w], y[ids[:, :w]], w_ex[ids[:, :w]], prior, t, m,
                                       lk, lm, k)
        return aiq(cost_quality_sweep(pred, truth, c), lo_hi)

    grid: list[tuple[int, float, float, int, float, float]] = []
    for k in (k for k in K_GRID if k <= kmax):
        for t in TEMPERATURE_GRID:
            for m in SHRINKAGE_GRID:
                grid.append((k, t, m, 0, 100.0, cv_aiq(k, t, m)))
    k, t, m, _, _, best = max(grid, key=lambda g: g[5])
    lk, lm = 0, 100.0
    for local_k in (v for v in LOCAL_K_GRID if v < k):
        for local_m in LOCAL_SHRINKAGE_GRID:
            value = cv_aiq(k, t, m, local_k, local_m)
            grid.append((k, t, m, local_k, local_m, value))
            if value > best:  # strictly: the local step must earn its place
                best, lk, lm = value, local_k, local_m
    untuned = next((g[5] for g in grid if g[:4] == (10, 0.05, 1.0, 0)), float("nan"))
    hull = aiq(single_targets(truth, c, [str(j) for j in range(len(c))]), lo_hi)
    use = best > hull + 1e-9
    return OutcomeTuning(
        k=k, temperature=t, shrinkage=m, local_k=lk, local_shrinkage=lm, use_neighbours=use,
        cv_aiq=best if use else hull, cv_aiq_knn=best, cv_aiq_untuned=untuned,
        cv_aiq_single_targets=hull, folds=n_folds, seconds=time.perf_counter() - started,
        grid=tuple(grid),
    )


def feedback_batch(
    sims: Matrix, values: FloatArray, weights: Matrix, best_scored: Matrix, base: FloatArray,
    shrinkage: float, temperature: float, shared_temperature: float,
) -> FloatArray:
    """``decision.feedback_step`` for many queries: ``sims`` (n, f) the nearest feedback rows'
    similarities, ``values`` (n, f, targets) their scores (NaN unknown), ``weights`` (n, f)
    their exemplar weights, ``best_scored`` (n,) the closest fully scored row's similarity and
    ``base`` (n, targets) the fully scored rows' estimate; ``temperature`` weighs a target's own
    residuals, ``shared_temperature`` (the fully scored rows' own) the shared one."""
    top = np.maximum(best_scored, sims.max(axis=1)).astype(np.float64)  # best of any kind
    gap = sims.astype(np.float64) - top[:, None]
    w = np.exp(gap / temperature) * weights
    v = np.exp(gap / shared_temperature) * weights
    return np.asarray(feedback_correction(w, values, base, shrinkage, v), dtype=np.float64)


def _with_feedback(
    x: Matrix, y: FloatArray, c: FloatArray, w_ex: Matrix, complete: npt.NDArray[np.bool_],
    scored: OutcomeTuning, seed: int, started: float,
) -> OutcomeTuning:
    """``scored`` (tuned on the fully scored rows) plus the feedback rows' correction
    (``decision.feedback_step``), its pseudo-count and temperature chosen by replay on held-out
    feedback rows.

    The fully scored rows cannot judge it: the feedback was logged by a serving index fitted on
    them, so near a held-out row the served targets are the ones that row scored well on, and
    any use of the feedback looks good. A held-out feedback row's observed score is honest, but
    predicting it well is not the goal: choosing well is. So each setting's predictions on the
    held-out rows (the fully scored rows' estimate there, corrected by the other folds'
    feedback rows) are swept over cost weights like the decision settings above, each choice
    credited with the row's observed score when it picks the target that was observed and with
    the fully scored rows' estimate of the target it picks otherwise (a replay, doubly robust
    with every propensity taken as 1; the logged propensities did no better, docs/LOOP.md). The
    setting with the highest AIQ wins; it is kept only when it beats the fully scored rows'
    estimate alone on the same replay and predicts the held-out observed scores better."""
    xc, yc, wc = x[complete], y[complete], w_ex[complete]
    part = np.flatnonzero(~complete)
    xp, yp, wp = x[part], y[part], w_ex[part]
    k = scored.k
    sims, idx = top_neighbours(xp, xc, k)
    base = predict_batch(sims, yc[idx], wc[idx], np.nanmean(yc, axis=0), scored.temperature,
                         scored.shrinkage, scored.local_k, scored.local_shrinkage, k)
    known = np.isfinite(yp)
    fold = random_folds(len(part), scored.folds, seed)
    preds = {(m, tf): base.copy() for tf in FEEDBACK_TEMPERATURE_GRID
             for m in FEEDBACK_SHRINKAGE_GRID}
    for f in range(scored.folds):
        held, rest = np.flatnonzero(fold == f), np.flatnonzero(fold != f)
        if len(held) == 0 or len(rest) == 0:
            continue
        fsims, fidx = top_neighbours(xp[held], xp[rest], k)
        values = yp[rest][fidx]
        for (m, tf), pred in preds.items():
            pred[held] = feedback_batch(fsims, values, wp[rest][fidx], sims[held, 0], base[held],
                                        m, tf, scored.temperature)
    lo_hi = (float(c.min()), float(c.max()))
    credit = np.where(known, yp, base)

    def replayed(pred: FloatArray) -> float:
        return aiq(cost_quality_sweep(pred, credit, c), lo_hi)

    tried = {key: replayed(pred) for key, pred in preds.items()}
    (m, tf), value = max(tried.items(), key=lambda kv: kv[1])
    without = replayed(base)
    cells = max(int(known.sum()), 1)
    error = float(np.square(preds[(m, tf)] - yp)[known].sum()) / cells
    error_without = float(np.square(base - yp)[known].sum()) / cells
    # Strictly, and on both counts: the best of many replays beats the one without by chance
    # (and the replay credits the estimate it is compared with), so the chosen correction must
    # also predict the held-out observed scores better than no correction does.
    keep = value > without + 1e-12 and error < error_without - 1e-12
    return replace(
        scored, feedback_shrinkage=m if keep else None, feedback_temperature=tf,
        cv_aiq_feedback=value, cv_aiq_feedback_without=without,
        feedback_error=error, feedback_error_without=error_without,
        seconds=time.perf_counter() - started,
    )
