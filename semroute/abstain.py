"""The abstention score: how likely a labelled decision is right, from distance and agreement.

The vote share alone says how much the neighbours *agree*; a query far from every exemplar can
still get a unanimous vote. So the score combines what the neighbourhood says into one number
in [0, 1]:

* ``top1``: cosine similarity of the closest exemplar;
* ``topk``: mean similarity of the k neighbours;
* ``share``: the winning route's share of the vote (``decision.vote_shares``);
* ``margin``: that share minus the runner-up's;
* ``density``: ``top1`` minus the mean *own* density of the neighbours (each exemplar's mean
  similarity to its nearest other exemplars, stored in the index). A query in a tight cluster
  must come closer than one in a loose cluster to count as in scope.

A logistic regression on standardised features turns them into P(answer is right). It is
fitted at build time (``semroute.tune.labelled``) without any out-of-scope examples:
in-scope rows come from row-wise cross-validation folds of the exemplars (target: the fold's
prediction was right), out-of-scope rows from leave-routes-out folds (a held-out route's
exemplars queried against the others, target 0). Which features enter was chosen on evidence
(docs/EVAL.md, "Abstention"). Pure numpy; no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]

FEATURES: tuple[str, ...] = ("top1", "topk", "share", "margin", "density")
DENSITY_K = 10  # neighbours an exemplar's own density is measured over


@dataclass(frozen=True)
class AbstainModel:
    """Logistic weights over standardised features; ``score`` maps features to P(right)."""

    features: tuple[str, ...]
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    weights: tuple[float, ...]
    bias: float

    def score(self, feats: Mapping[str, float]) -> float:
        x = np.array([feats[f] for f in self.features], dtype=np.float64)
        z = float(((x - np.array(self.mean)) / np.array(self.scale)) @ np.array(self.weights))
        return _sigmoid(z + self.bias)

    def score_many(self, table: Mapping[str, FloatArray]) -> FloatArray:
        """Scores for many rows; ``table`` maps each feature name to a column."""
        x = np.column_stack([np.asarray(table[f], dtype=np.float64) for f in self.features])
        z = ((x - np.array(self.mean)) / np.array(self.scale)) @ np.array(self.weights)
        return _sigmoid_array(z + self.bias)

    def to_dict(self) -> dict[str, object]:
        return {
            "features": list(self.features),
            "mean": [round(v, 8) for v in self.mean],
            "scale": [round(v, 8) for v in self.scale],
            "weights": [round(v, 8) for v in self.weights],
            "bias": round(self.bias, 8),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> AbstainModel:
        def floats(key: str) -> tuple[float, ...]:
            raw = data[key]
            assert isinstance(raw, list)
            return tuple(float(v) for v in raw)

        features = data["features"]
        assert isinstance(features, list)
        bias = data["bias"]
        assert isinstance(bias, (int, float))
        return cls(tuple(str(f) for f in features), floats("mean"), floats("scale"),
                   floats("weights"), float(bias))


def _sigmoid(z: float) -> float:
    return float(1.0 / (1.0 + np.exp(-np.clip(z, -50.0, 50.0))))


def _sigmoid_array(z: FloatArray) -> FloatArray:
    out: FloatArray = 1.0 / (1.0 + np.exp(-np.clip(z, -50.0, 50.0)))
    return out


def neighbour_features(
    sims: npt.ArrayLike, shares: Mapping[str, float], winner: str, densities: npt.ArrayLike
) -> dict[str, float]:
    """The features of one query from its neighbours' similarities, the vote shares, the
    winning route and the neighbours' own densities (same order as ``sims``)."""
    s = np.asarray(sims, dtype=np.float64)
    d = np.asarray(densities, dtype=np.float64)
    top1 = float(s.max()) if s.size else 0.0
    ranked = sorted(shares.values(), reverse=True)
    share = float(shares.get(winner, 0.0))
    runner_up = ranked[1] if len(ranked) > 1 else 0.0
    return {
        "top1": top1,
        "topk": float(s.mean()) if s.size else 0.0,
        "share": share,
        "margin": share - runner_up,
        "density": top1 - (float(d.mean()) if d.size else 0.0),
    }


def own_density(sims: npt.ArrayLike, k: int = DENSITY_K) -> FloatArray:
    """Each exemplar's mean similarity to its ``k`` nearest *other* exemplars.

    ``sims`` is (n, m): row i holds exemplar i's similarities to its nearest neighbours with
    itself already removed (any order; NaN or -inf slots are ignored).
    """
    s = np.asarray(sims, dtype=np.float64)
    if s.size == 0:
        return np.zeros(s.shape[0], dtype=np.float64)
    s = np.where(np.isfinite(s), s, -np.inf)
    k = max(1, min(k, s.shape[1]))
    top = -np.sort(-s, axis=1)[:, :k]
    valid = np.isfinite(top)
    total = np.where(valid, top, 0.0).sum(axis=1)
    count = np.maximum(valid.sum(axis=1), 1)
    out: FloatArray = total / count
    return out


def fit_abstain(
    table: Mapping[str, FloatArray],
    target: npt.ArrayLike,
    sample_weight: npt.ArrayLike | None = None,
    features: Sequence[str] = FEATURES,
    l2: float = 1e-2,
    iterations: int = 50,
) -> AbstainModel:
    """Weighted L2-regularised logistic regression by Newton's method.

    ``table`` maps feature names to columns, ``target`` is 1 for a right answer and 0 for a
    wrong one or an out-of-scope query. Deterministic; converges in a handful of steps on
    standardised features (the problem is convex).
    """
    x = np.column_stack([np.asarray(table[f], dtype=np.float64) for f in features])
    y = np.asarray(target, dtype=np.float64)
    n, d = x.shape
    if n == 0 or y.min() == y.max():
        raise ValueError("fitting the abstention score needs rows of both outcomes")
    w_rows = np.ones(n) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    w_rows = w_rows * (n / w_rows.sum())
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale = np.where(scale > 1e-9, scale, 1.0)
    z = np.column_stack([(x - mean) / scale, np.ones(n)])
    beta = np.zeros(d + 1)
    penalty = np.r_[np.full(d, l2 * n), 0.0]  # no penalty on the bias
    for _ in range(iterations):
        p = _sigmoid_array(z @ beta)
        grad = z.T @ (w_rows * (p - y)) + penalty * beta
        hess = (z * (w_rows * p * (1 - p))[:, None]).T @ z + np.diag(penalty + 1e-9)
        step = np.linalg.solve(hess, grad)
        beta -= step
        if float(np.abs(step).max()) < 1e-8:
            break
    return AbstainModel(
        tuple(features),
        tuple(float(v) for v in mean),
        tuple(float(v) for v in scale),
        tuple(float(v) for v in beta[:d]),
        float(beta[d]),
    )


def auroc(scores: npt.ArrayLike, positive: npt.ArrayLike) -> float:
    """Area under the ROC curve: the chance a random positive scores above a random negative
    (ties count one half). NaN when either class is empty."""
    s = np.asarray(scores, dtype=np.float64)
    pos = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    # Mann-Whitney U from average ranks handles ties exactly.
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_s = s[order]
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    u = ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))
