"""Build-time tuning of an outcome index, on its own exemplars only, with a hull guarantee.

Out-of-fold predicted quality for every exemplar (the core's estimator, vectorised here and
checked against ``decision.predict_quality`` in the tests) is swept over cost weights; the grid
point with the best AIQ wins (k x temperature x shrinkage, then the local step given those).
If that AIQ does not beat the single targets' hull on the same rows, the index is marked to
ignore its neighbours: every query then gets the targets' mean scores, which is the best single
target for each cost weight, so the index never lands below that hull on its own folds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from semroute.tune.folds import random_folds, top_neighbours
from semroute.tune.frontier import aiq, cost_quality_sweep, single_targets

Matrix = npt.NDArray[np.float32]
FloatArray = npt.NDArray[np.float64]

K_GRID: tuple[int, ...] = (10, 20, 40, 80, 160)
TEMPERATURE_GRID: tuple[float, ...] = (0.02, 0.05, 0.1, 0.3, 1.0)
SHRINKAGE_GRID: tuple[float, ...] = (1.0, 3.0, 10.0, 30.0)
LOCAL_K_GRID: tuple[int, ...] = (10, 20, 40)
LOCAL_SHRINKAGE_GRID: tuple[float, ...] = (10.0, 30.0, 100.0, 300.0)
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

    def summary(self) -> str:
        mode = (
            f"k={self.k} T={self.temperature:g} shrinkage={self.shrinkage:g} "
            f"local_k={self.local_k}"
            if self.use_neighbours
            else "neighbours off (best single target per cost level)"
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
) -> FloatArray:
    """``decision.predict_quality`` for many queries: ``sims`` (n, k) best first, ``scores``
    (n, k, targets) with NaN unknown, ``weights`` (n, k) exemplar weights, ``prior`` (n, targets)
    or (targets,)."""
    broad = _shrunk(sims, scores, weights, np.broadcast_to(prior, (len(sims), scores.shape[2])),
                    temperature, shrinkage)
    if 0 < local_k < sims.shape[1]:
        return _shrunk(sims[:, :local_k], scores[:, :local_k], weights[:, :local_k], broad,
                       temperature, local_shrinkage)
    return broad


def _shrunk(
    sims: Matrix, scores: FloatArray, weights: Matrix, prior: FloatArray, temperature: float,
    shrinkage: float,
) -> FloatArray:
    s = np.asarray(sims, dtype=np.float64)
    w = np.exp((s - s.max(axis=1, keepdims=True)) / temperature) * weights
    w = w * (s.shape[1] / np.maximum(w.sum(axis=1, keepdims=True), 1e-12))
    known = np.isfinite(scores)
    filled = np.where(known, scores, 0.0)
    num = np.einsum("nk,nkt->nt", w, filled) + shrinkage * prior
    den = np.einsum("nk,nkt->nt", w, known.astype(np.float64)) + shrinkage
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
    # Unknown scores count at the target's mean, the same place the estimator shrinks them to.
    means = np.nanmean(np.where(np.isfinite(y), y, np.nan), axis=0)
    means = np.where(np.isfinite(means), means, 0.0)
    truth = np.where(np.isfinite(y), y, means)
    fold = random_folds(len(x), n_folds, seed)
    kmax = min(max(K_GRID), int(np.bincount(fold).min() * (n_folds - 1)))
    held_rows, fold_sims, fold_ids, priors = [], [], [], []
    for f in range(n_folds):
        base, held = np.flatnonzero(fold != f), np.flatnonzero(fold == f)
        sims, idx = top_neighbours(x[held], x[base], kmax)
        prior = np.nanmean(y[base], axis=0)
        held_rows.append(held)
        fold_sims.append(sims)
        fold_ids.append(base[idx])
        priors.append(np.where(np.isfinite(prior), prior, 0.0))
    lo_hi = (float(c.min()), float(c.max()))

    def cv_aiq(k: int, t: float, m: float, lk: int = 0, lm: float = 100.0) -> float:
        pred = np.zeros_like(truth)
        for held, sims, ids, prior in zip(held_rows, fold_sims, fold_ids, priors, strict=True):
            pred[held] = predict_batch(sims[:, :k], y[ids[:, :k]], w_ex[ids[:, :k]], prior, t, m,
                                       lk, lm)
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
