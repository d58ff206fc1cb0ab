"""Build-time tuning of a labelled index, on its own exemplars only.

1. Row-wise stratified folds: each held-out fold is routed against the rest (with the learned
   projection fitted on the rest, when tried) for every (k, temperature); the setting with the
   best out-of-fold accuracy wins (ties: the earlier, simpler grid point).
2. The abstention score (``semroute.abstain``) is fitted on the chosen setting's out-of-fold
   rows (target: routed right) plus leave-routes-out rows: groups of routes are held out whole
   and their exemplars routed against the others (target 0, they have no right route). No
   out-of-scope example is needed. The two kinds weigh the same in the fit.

Embeddings are computed once by the caller and reused by every fold.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import numpy.typing as npt

from semroute.abstain import (
    DENSITY_K,
    FEATURES,
    AbstainModel,
    auroc,
    fit_abstain,
    own_density,
)
from semroute.tune.folds import route_groups, stratified_folds, top_neighbours

Matrix = npt.NDArray[np.float32]
FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

K_GRID: tuple[int, ...] = (5, 10, 20, 40)
TEMPERATURE_GRID: tuple[float, ...] = (0.02, 0.05, 0.1)
UNTUNED = (10, 0.05, False)  # the settings' defaults, reported next to the tuned figure


@dataclass(frozen=True)
class LabelledTuning:
    """What a labelled build chose, and the cross-validated figures behind it."""

    k: int
    temperature: float
    projection: bool
    cv_accuracy: float
    cv_accuracy_untuned: float
    folds: int
    abstain: AbstainModel | None = None
    abstain_auroc: float | None = None  # in-scope CV rows vs leave-routes-out rows
    feature_auroc: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self) -> str:
        text = (
            f"tuned on {self.folds}-fold CV: k={self.k} T={self.temperature:g} "
            f"projection={'learned' if self.projection else 'none'} "
            f"accuracy {self.cv_accuracy:.4f} (untuned {self.cv_accuracy_untuned:.4f})"
        )
        if self.abstain_auroc is not None:
            text += f", leave-routes-out AUROC {self.abstain_auroc:.3f}"
        return text + f" in {self.seconds:.1f}s"


@dataclass(frozen=True)
class _FoldSearch:
    held: IntArray  # row ids of the held-out rows
    sims: Matrix  # (held, kmax) best first
    ids: IntArray  # (held, kmax) global row ids of the neighbours
    densities: FloatArray | None  # (n,) own density of each base row, NaN outside the base


def vote(
    sims: Matrix,
    neighbour_labels: IntArray,
    weights: Matrix,
    n_routes: int,
    temperature: float,
    null_similarity: float | None,
) -> FloatArray:
    """Vote shares (n, routes) for many queries at once; the same sums as
    ``decision.vote_shares`` (softmax relative to the best match, null pseudo-neighbour)."""
    s = np.asarray(sims, dtype=np.float64)
    top = s.max(axis=1, keepdims=True)
    w = np.exp((s - top) / temperature) * weights
    total = w.sum(axis=1)
    if null_similarity is not None:
        total = total + np.exp((null_similarity - top[:, 0]) / temperature)
    shares = np.zeros((len(s), n_routes))
    rows = np.repeat(np.arange(len(s)), s.shape[1])
    np.add.at(shares, (rows, neighbour_labels.ravel()), w.ravel())
    out: FloatArray = shares / total[:, None]
    return out


def features_batch(
    sims: Matrix, shares: FloatArray, neighbour_density: FloatArray
) -> tuple[IntArray, dict[str, FloatArray]]:
    """The winner and ``abstain.neighbour_features`` for many queries at once."""
    winner = np.argmax(shares, axis=1)
    ranked = -np.sort(-shares, axis=1)
    share = ranked[:, 0]
    runner_up = ranked[:, 1] if shares.shape[1] > 1 else np.zeros(len(shares))
    s = np.asarray(sims, dtype=np.float64)
    top1 = s.max(axis=1)
    table = {
        "top1": top1,
        "topk": s.mean(axis=1),
        "share": share,
        "margin": share - runner_up,
        "density": top1 - neighbour_density.mean(axis=1),
    }
    return np.asarray(winner, dtype=np.int64), table


def tune_labelled(
    vectors: Matrix,
    labels: Sequence[str],
    weights: npt.ArrayLike,
    *,
    null_similarity: float | None,
    projection: str = "auto",
    projection_epochs: int = 10,
    n_folds: int = 5,
    n_groups: int = 5,
    seed: int = 0,
) -> LabelledTuning | None:
    """Choose k, temperature and the projection, and fit the abstention score.

    ``projection`` is the index setting: "auto" tries the raw and the learned space, "none" or
    "learned" only that one (the score is always fitted in the space the index will search).

    Returns None when the exemplars are too few to cross-validate (fewer than two routes or
    than two rows per fold).
    """
    started = time.perf_counter()
    names = sorted(set(labels))
    position = {name: i for i, name in enumerate(names)}
    y: IntArray = np.asarray([position[v] for v in labels], dtype=np.int64)
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    w_ex = np.asarray(weights, dtype=np.float32)
    if len(names) < 2 or len(x) < 2 * n_folds:
        return None
    fold = stratified_folds(y, n_folds, seed)
    kmax = max(K_GRID)
    spaces = {"auto": [False, True], "none": [False], "learned": [True]}[projection]
    searches: dict[bool, list[_FoldSearch]] = {}
    scores: dict[tuple[int, float, bool], float] = {}
    for learned in spaces:
        searches[learned] = []
        for f in range(n_folds):
            base, held = np.flatnonzero(fold != f), np.flatnonzero(fold == f)
            xb, xh = _space(x, y, base, held, learned, projection_epochs, seed)
            sims, idx = top_neighbours(xh, xb, kmax)
            searches[learned].append(_FoldSearch(held, sims, base[idx], _densities(xb, base, len(x))))
        for k in K_GRID:
            for t in TEMPERATURE_GRID:
                right = 0
                for fs in searches[learned]:
                    shares = vote(fs.sims[:, :k], y[fs.ids[:, :k]], w_ex[fs.ids[:, :k]],
                                  len(names), t, null_similarity)
                    right += int((np.argmax(shares, axis=1) == y[fs.held]).sum())
                scores[(k, t, learned)] = right / len(x)
    # max() keeps the first of equal values: the grid order puts raw space and small k first
    best = max(scores, key=lambda key: scores[key])
    k, t, learned = best
    model, auroc, per_feature = _fit_score(
        x, y, w_ex, searches[learned], k, t, learned, null_similarity, n_groups,
        projection_epochs, seed,
    )
    return LabelledTuning(
        k=k, temperature=t, projection=learned, cv_accuracy=scores[best],
        cv_accuracy_untuned=scores.get(UNTUNED, float("nan")), folds=n_folds,
        abstain=model, abstain_auroc=auroc, feature_auroc=per_feature,
        seconds=time.perf_counter() - started,
    )


def _space(
    x: Matrix, y: IntArray, base: IntArray, held: IntArray, learned: bool, epochs: int, seed: int
) -> tuple[Matrix, Matrix]:
    """Base and held-out vectors, projected with a projection fitted on the base when asked."""
    if not learned or len(set(y[base].tolist())) < 2:
        return x[base], x[held]
    from semroute.projection import ProjectionParams, apply_projection, fit_projection

    matrix = fit_projection(x[base], [str(v) for v in y[base]],
                            ProjectionParams(epochs=epochs, seed=seed))
    return apply_projection(x[base], matrix), apply_projection(x[held], matrix)


def _densities(xb: Matrix, base: IntArray, n: int) -> FloatArray:
    sims, _ = top_neighbours(xb, xb, DENSITY_K, exclude_self=True)
    out = np.full(n, np.nan)
    out[base] = own_density(sims, DENSITY_K)
    return out


def _recalibrate(
    model: AbstainModel, in_scope: dict[str, FloatArray], right: npt.NDArray[np.bool_]
) -> AbstainModel:
    """Rescale the logit so the score is P(right) on in-scope queries (Platt scaling on the CV
    rows). The fit above weighs out-of-scope rows as much as in-scope ones, which ranks well
    but makes in-scope confidences too low; a monotone rescale keeps the ranking."""
    if right.all() or not right.any():
        return model
    logit = np.log(model.score_many(in_scope)) - np.log1p(-model.score_many(in_scope))
    platt = fit_abstain({"z": logit}, right.astype(np.float64), features=("z",), l2=1e-6)
    a = platt.weights[0] / platt.scale[0]
    b = platt.bias - a * platt.mean[0]
    if a <= 0:
        return model
    return replace(model, weights=tuple(a * w for w in model.weights), bias=a * model.bias + b)


def _fit_score(
    x: Matrix, y: IntArray, w_ex: Matrix, searches: list[_FoldSearch], k: int, t: float,
    learned: bool, null_similarity: float | None, n_groups: int, epochs: int, seed: int,
) -> tuple[AbstainModel | None, float | None, dict[str, float]]:
    n_routes = int(y.max()) + 1
    inside: list[dict[str, FloatArray]] = []
    right: list[npt.NDArray[np.bool_]] = []
    for fs in searches:
        ids = fs.ids[:, :k]
        assert fs.densities is not None
        shares = vote(fs.sims[:, :k], y[ids], w_ex[ids], n_routes, t, null_similarity)
        winner, table = features_batch(fs.sims[:, :k], shares, fs.densities[ids])
        inside.append(table)
        right.append(winner == y[fs.held])
    group = route_groups(y, n_groups, seed)
    outside: list[dict[str, FloatArray]] = []
    for g in sorted(set(group.tolist())):
        base, held = np.flatnonzero(group != g), np.flatnonzero(group == g)
        if len(set(y[base].tolist())) < 2:
            continue
        xb, xh = _space(x, y, base, held, learned, epochs, seed)
        sims, idx = top_neighbours(xh, xb, k)
        dens = _densities(xb, base, len(x))
        ids = base[idx]
        shares = vote(sims, y[ids], w_ex[ids], n_routes, t, null_similarity)
        outside.append(features_batch(sims, shares, dens[ids])[1])
    if not outside:
        return None, None, {}
    table = {f: np.concatenate([*(d[f] for d in inside), *(d[f] for d in outside)])
             for f in FEATURES}
    ok = np.concatenate(right)
    n_in, n_out = len(ok), sum(len(d["top1"]) for d in outside)
    target = np.r_[ok.astype(np.float64), np.zeros(n_out)]
    weight = np.r_[np.full(n_in, 0.5 / n_in), np.full(n_out, 0.5 / n_out)]
    if target.min() == target.max():
        return None, None, {}
    ranked = fit_abstain(table, target, weight)
    model = _recalibrate(ranked, {f: v[:n_in] for f, v in table.items()}, ok)
    in_scope = np.r_[np.ones(n_in, dtype=bool), np.zeros(n_out, dtype=bool)]
    per_feature = {f: round(auroc(table[f], in_scope), 4) for f in FEATURES}
    return model, round(auroc(model.score_many(table), in_scope), 4), per_feature
