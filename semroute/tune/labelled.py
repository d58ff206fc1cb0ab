"""Build-time tuning of a labelled index, on its own exemplars only.

1. Row-wise stratified folds: each held-out fold is routed against the rest (with the learned
   projection fitted on the rest, when tried) for every (k, temperature); the setting with the
   best out-of-fold accuracy wins (ties: the earlier, simpler grid point). The learned space is
   tried at the strength ``projection.choose_strength`` picks on these same folds, which is
   what the build's final fit picks too.
2. The abstention score (``semroute.abstain``) is fitted on the chosen setting's out-of-fold
   rows (target: routed right) plus leave-routes-out rows: groups of routes are held out whole
   and their exemplars routed against the others (target 0, they have no right route). No
   out-of-scope example is needed. The two kinds weigh the same in the fit. Exemplars labelled
   ``oos`` (out-of-scope examples, ``decision``) are a class like the routes in the CV, but a
   held-out one is never a right answer (target 0).

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
from semroute.types import OUT_OF_SCOPE

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
    projection_strength: float = 1.0  # ``projection.choose_strength``'s pick, when learned
    # CV accuracy of the learned space per strength (empty when it was not tried)
    strength_cv_accuracy: dict[float, float] = field(default_factory=dict)

    def summary(self) -> str:
        strength = ""
        if self.projection and self.strength_cv_accuracy:
            strength = f" strength {self.projection_strength:g} (CV accuracy " + ", ".join(
                f"{s:g}: {a:.4f}" for s, a in self.strength_cv_accuracy.items()) + ")"
        text = (
            f"tuned on {self.folds}-fold CV: k={self.k} T={self.temperature:g} "
            f"projection={'learned' if self.projection else 'none'}{strength} "
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
    choice = None
    for learned in spaces:
        searches[learned] = []
        if learned:
            # the strength the build's final fit will choose (same call, same folds), and the
            # maps it fitted on these folds
            from semroute.projection import ProjectionParams, choose_strength

            choice = choose_strength(x, labels, ProjectionParams(epochs=projection_epochs,
                                                                 seed=seed),
                                     n_folds=n_folds, k_grid=K_GRID, temperatures=TEMPERATURE_GRID)
            assert not choice.fits or np.array_equal(choice.fold, fold)
        strength = choice.strength if choice is not None else 1.0
        for f in range(n_folds):
            base, held = np.flatnonzero(fold != f), np.flatnonzero(fold == f)
            fitted = choice.fits[f] if learned and choice is not None and choice.fits else None
            xb, xh = _space(x, y, base, held, learned, projection_epochs, seed, strength, fitted)
            if fitted is not None and choice is not None and choice.neighbours:
                sims, idx = choice.neighbours[f]  # the same search, done while choosing
            else:
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
        projection_epochs, seed, position.get(OUT_OF_SCOPE),
        strength=choice.strength if choice is not None else 1.0,
    )
    return LabelledTuning(
        k=k, temperature=t, projection=learned, cv_accuracy=scores[best],
        cv_accuracy_untuned=scores.get(UNTUNED, float("nan")), folds=n_folds,
        abstain=model, abstain_auroc=auroc, feature_auroc=per_feature,
        seconds=time.perf_counter() - started,
        projection_strength=choice.strength if choice is not None else 1.0,
        strength_cv_accuracy=dict(choice.cv_accuracy) if choice is not None else {},
    )


def _space(
    x: Matrix, y: IntArray, base: IntArray, held: IntArray, learned: bool, epochs: int, seed: int,
    strength: float = 1.0, fitted: Matrix | None = None,
) -> tuple[Matrix, Matrix]:
    """Base and held-out vectors, projected when asked with a projection fitted on the base
    (``fitted`` when given) at ``strength``."""
    if not learned or len(set(y[base].tolist())) < 2:
        return x[base], x[held]
    from semroute.projection import (
        ProjectionParams,
        apply_projection,
        fit_projection,
        shrink_toward_identity,
    )

    if fitted is None:
        fitted = fit_projection(x[base], [str(v) for v in y[base]],
                                ProjectionParams(epochs=epochs, seed=seed, strength=1.0))
    matrix = shrink_toward_identity(fitted, strength)
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
    out_of_scope_code: int | None = None, *, strength: float = 1.0,
) -> tuple[AbstainModel | None, float | None, dict[str, float]]:
    n_routes = int(y.max()) + 1
    out_of_scope = -1 if out_of_scope_code is None else out_of_scope_code
    inside: list[dict[str, FloatArray]] = []
    right: list[npt.NDArray[np.bool_]] = []
    for fs in searches:
        ids = fs.ids[:, :k]
        assert fs.densities is not None
        shares = vote(fs.sims[:, :k], y[ids], w_ex[ids], n_routes, t, null_similarity)
        winner, table = features_batch(fs.sims[:, :k], shares, fs.densities[ids])
        inside.append(table)
        # a held-out out-of-scope example is never a right answer: it should be abstained on
        right.append((winner == y[fs.held]) & (y[fs.held] != out_of_scope))
    group = route_groups(y, n_groups, seed)
    outside: list[dict[str, FloatArray]] = []
    for g in sorted(set(group.tolist())):
        base, held = np.flatnonzero(group != g), np.flatnonzero(group == g)
        if len(set(y[base].tolist())) < 2:
            continue
        xb, xh = _space(x, y, base, held, learned, epochs, seed, strength)
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
