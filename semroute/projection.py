"""A learned linear projection of embeddings, fitted on labelled exemplars at index build time.

Frozen sentence embeddings place some routes' exemplars close to other routes' (on Banking77,
kNN on raw all-MiniLM-L6-v2 vectors tops out near 0.92-0.925). A linear map ``W`` trained so
that projected exemplars sit near their own route's prototype (a cosine softmax over learned
prototypes, i.e. normalised-softmax metric learning) pulls routes apart; kNN then runs in the
projected space. Serving stays an embedding + FAISS lookup: the index stores ``W`` and
projects (and re-normalises) query vectors before searching.

Pure numpy (no torch at build or serve time); deterministic for a given seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import numpy.typing as npt

Matrix = npt.NDArray[np.float32]


@dataclass(frozen=True)
class ProjectionParams:
    epochs: int = 10
    scale: float = 16.0  # logit scale of the cosine softmax
    learning_rate: float = 0.003
    batch_size: int = 512
    seed: int = 0
    # How far the map moves from the raw space, kept as I + strength * (W - I): 1 is the fit
    # itself, smaller values pull it back toward the identity. None: chosen by cross-validated
    # nearest-neighbour accuracy on the exemplars (``choose_strength``), as an index build
    # does, so the build's tuner and its final fit choose the same strength.
    strength: float | None = None


def apply_projection(vectors: npt.NDArray[np.float32], matrix: Matrix) -> Matrix:
    """Project row vectors and L2-normalise them again (so inner product stays cosine)."""
    out = np.asarray(vectors, dtype=np.float32) @ matrix
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    result: Matrix = np.ascontiguousarray(out / np.maximum(norms, 1e-12), dtype=np.float32)
    return result


def shrink_toward_identity(matrix: Matrix, strength: float) -> Matrix:
    """``I + strength * (matrix - I)``: 1 keeps the map, 0 gives the raw space back."""
    if strength == 1.0:
        return matrix
    eye = np.eye(matrix.shape[0], matrix.shape[1], dtype=np.float32)
    out: Matrix = (eye + np.float32(strength) * (matrix - eye)).astype(np.float32)
    return out


def fit_projection(
    vectors: npt.NDArray[np.float32],
    labels: Sequence[str],
    params: ProjectionParams | None = None,
) -> Matrix:
    """Fit a square projection on labelled, L2-normalised vectors; returns (d, d) float32.

    Starts from the identity and minimises the cross-entropy of
    ``scale * cos(x W, p_route)`` over routes with Adam, prototypes ``p`` learned alongside
    (initialised at route means). Few epochs on purpose: the map should sharpen the space
    around the exemplars, not memorise them (10 epochs was best on a Banking77 train-split
    holdout). The result is shrunk toward the identity by ``params.strength``; when that is
    None the strength is chosen by cross-validation on these exemplars (deterministic for the
    same vectors, labels and params).
    """
    p = params or ProjectionParams()
    if len(set(labels)) < 2:
        raise ValueError("a learned projection needs at least two routes")
    if p.strength is None:
        strength = choose_strength(vectors, labels, p).strength
        return shrink_toward_identity(fit_projection(vectors, labels, replace(p, strength=1.0)),
                                      strength)
    x = np.asarray(vectors, dtype=np.float32)
    n, d = x.shape
    names = sorted(set(labels))
    index = {name: i for i, name in enumerate(names)}
    y = np.fromiter((index[lab] for lab in labels), dtype=np.int64, count=n)
    w = np.eye(d, dtype=np.float32)
    protos = np.stack([x[y == c].mean(axis=0) for c in range(len(names))]).astype(np.float32)
    state = [(np.zeros_like(w), np.zeros_like(w)), (np.zeros_like(protos), np.zeros_like(protos))]
    rng = np.random.default_rng(p.seed)
    step = 0
    for _ in range(p.epochs):
        order = rng.permutation(n)
        for start in range(0, n, p.batch_size):
            batch = order[start : start + p.batch_size]
            grads = _gradients(x[batch], y[batch], w, protos, p.scale)
            step += 1
            for param, grad, (m, v) in zip((w, protos), grads, state, strict=True):
                m *= 0.9
                m += 0.1 * grad
                v *= 0.999
                v += 0.001 * grad * grad
                m_hat = m / (1 - 0.9**step)
                v_hat = v / (1 - 0.999**step)
                param -= p.learning_rate * m_hat / (np.sqrt(v_hat) + 1e-8)
    return w if p.strength == 1.0 else shrink_toward_identity(w, p.strength)


STRENGTH_GRID: tuple[float, ...] = (1.0, 0.75, 0.5, 0.25)  # the fit itself first: ties keep it


@dataclass(frozen=True)
class StrengthChoice:
    """The strength ``choose_strength`` picked, the evidence, and its fold fits (reusable)."""

    strength: float
    cv_accuracy: dict[float, float]  # per strength, at its best (k, temperature); {} if no CV
    fold: npt.NDArray[np.int64]  # fold of each row
    fits: tuple[Matrix, ...]  # the full-strength map fitted on each fold's other rows
    # per fold, at the chosen strength: the held-out rows' top max(k_grid) neighbours among
    # the fold's other rows, (sims, positions in those rows), best first
    neighbours: tuple[tuple[Matrix, npt.NDArray[np.int64]], ...] = ()


def choose_strength(
    vectors: npt.NDArray[np.float32],
    labels: Sequence[str],
    params: ProjectionParams | None = None,
    *,
    n_folds: int = 5,
    k_grid: Sequence[int] = (5, 10, 20, 40),
    temperatures: Sequence[float] = (0.02, 0.05, 0.1),
) -> StrengthChoice:
    """The projection's strength from ``STRENGTH_GRID`` by stratified n-fold CV on the
    exemplars: the map is fitted on each fold's other rows; each held-out row is routed by an
    unweighted kNN vote (every k and temperature of the grids, which are the labelled tuner's)
    in the space shrunk by each strength; the strength whose best (k, temperature) routes the
    most rows right wins. A full-strength map fitted on few exemplars overshoots (it sharpens
    the space around them beyond what carries to new queries); how much, only held-out rows
    tell. Folds are seeded with ``params.seed``; with too few rows for CV the strength is 1.
    """
    from semroute.tune.folds import stratified_folds, top_neighbours

    p = replace(params or ProjectionParams(), strength=1.0)
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    names = sorted(set(labels))
    code = {name: i for i, name in enumerate(names)}
    y = np.fromiter((code[lab] for lab in labels), dtype=np.int64, count=len(x))
    fold = stratified_folds(y, n_folds, p.seed)
    if len(x) < 2 * n_folds or any(len(set(y[fold != f].tolist())) < 2 for f in range(n_folds)):
        return StrengthChoice(1.0, {}, fold, ())
    right = {s: np.zeros((len(k_grid), len(temperatures))) for s in STRENGTH_GRID}
    fits, found = [], []
    for f in range(n_folds):
        base, held = np.flatnonzero(fold != f), np.flatnonzero(fold == f)
        fitted = fit_projection(x[base], [names[v] for v in y[base]], p)
        fits.append(fitted)
        for s in STRENGTH_GRID:
            m = shrink_toward_identity(fitted, s)
            sims, idx = top_neighbours(apply_projection(x[held], m), apply_projection(x[base], m),
                                       max(k_grid))
            found.append((s, sims, idx))
            for a, k in enumerate(k_grid):
                for b, t in enumerate(temperatures):
                    winner = _knn_winner(sims[:, :k], y[base][idx[:, :k]], len(names), t)
                    right[s][a, b] += int((winner == y[held]).sum())
    accuracy = {s: float(right[s].max()) / len(x) for s in STRENGTH_GRID}
    best = max(STRENGTH_GRID, key=lambda s: accuracy[s])  # first of equals: the stronger map
    kept = tuple((sims, idx) for s, sims, idx in found if s == best)
    return StrengthChoice(best, accuracy, fold, tuple(fits), kept)


def _knn_winner(
    sims: Matrix, neighbour_labels: npt.NDArray[np.int64], n_routes: int, temperature: float
) -> npt.NDArray[np.int64]:
    """The route with the largest softmax-weighted vote per row (``decision.vote_shares``)."""
    s = np.asarray(sims, dtype=np.float64)
    w = np.exp((s - s.max(axis=1, keepdims=True)) / temperature)
    votes = np.zeros((len(s), n_routes))
    np.add.at(votes, (np.repeat(np.arange(len(s)), s.shape[1]), neighbour_labels.ravel()),
              w.ravel())
    return np.asarray(np.argmax(votes, axis=1), dtype=np.int64)


def _gradients(
    xb: Matrix, yb: npt.NDArray[np.int64], w: Matrix, protos: Matrix, scale: float
) -> tuple[Matrix, Matrix]:
    """d(mean cross-entropy)/dW and d/dprotos for the cosine softmax."""
    b = len(xb)
    z = xb @ w
    z_len = np.linalg.norm(z, axis=1, keepdims=True) + 1e-12
    zn = z / z_len
    p_len = np.linalg.norm(protos, axis=1, keepdims=True) + 1e-12
    pn = protos / p_len
    logits = scale * (zn @ pn.T)
    logits -= logits.max(axis=1, keepdims=True)
    prob = np.exp(logits)
    prob /= prob.sum(axis=1, keepdims=True)
    prob[np.arange(b), yb] -= 1.0
    g = prob / b
    d_zn = scale * (g @ pn)
    d_pn = scale * (g.T @ zn)
    # back through the L2 normalisations: d/dz (z/|z|) applied to an upstream gradient u
    d_z = (d_zn - zn * (d_zn * zn).sum(axis=1, keepdims=True)) / z_len
    d_p = (d_pn - pn * (d_pn * pn).sum(axis=1, keepdims=True)) / p_len
    return (xb.T @ d_z).astype(np.float32), d_p.astype(np.float32)
