"""The cost-quality frontier: pure numpy maths shared by the build-time tuner and evaluation.

Definitions follow the papers users compare against:

* AIQ (RouterBench, Hu et al. 2024): area under the non-decreasing upper convex hull of the
  router's (cost, quality) points, divided by the cost range.
* PGR / APGR / CPT (RouteLLM, Ong et al. 2024), two targets ``weak`` and ``strong``:
  PGR(x) = (quality(x) - q_weak) / (q_strong - q_weak) where x is the share of queries sent to
  ``strong``; APGR is the area under PGR over x in [0, 1]; CPT(p) is the smallest x with
  PGR(x) >= p.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class CostQuality:
    """A router operating point: mean price of the chosen targets and mean realised quality."""

    cost: float
    quality: float
    label: str = ""


def choose_targets(
    predicted: npt.ArrayLike, costs: npt.ArrayLike, cost_weight: float
) -> npt.NDArray[np.int64]:
    """Per query, the target maximising predicted quality - cost_weight * cost; ties go to the
    cheaper target, then the earlier column (as ``decision.rank_by_quality`` orders them).

    ``costs`` should be on the scale the weight is meant for; the runners divide prices by the
    most expensive target's so a weight of 1 trades the full price range for one quality unit.
    """
    p = np.asarray(predicted, dtype=np.float64)
    c = np.asarray(costs, dtype=np.float64)
    utility = p - cost_weight * c[None, :]
    best = utility.max(axis=1, keepdims=True)
    masked = np.where(utility >= best - 1e-9, c[None, :], np.inf)
    return np.asarray(np.argmin(masked, axis=1), dtype=np.int64)


def realised(
    quality: npt.ArrayLike, costs: npt.ArrayLike, choice: npt.ArrayLike, label: str = ""
) -> CostQuality:
    """Mean true quality and mean price of a per-query choice of target."""
    q = np.asarray(quality, dtype=np.float64)
    c = np.asarray(costs, dtype=np.float64)
    ch = np.asarray(choice, dtype=np.int64)
    return CostQuality(float(c[ch].mean()), float(q[np.arange(len(ch)), ch].mean()), label)


def cost_quality_sweep(
    predicted: npt.ArrayLike,
    quality: npt.ArrayLike,
    costs: npt.ArrayLike,
    weights: Sequence[float] | None = None,
) -> list[CostQuality]:
    """The router's curve: one point per cost weight, from quality-only (0) to near cheapest."""
    c = np.asarray(costs, dtype=np.float64)
    scale = float(c.max()) if c.max() > 0 else 1.0
    if weights is None:
        weights = [0.0, *np.geomspace(1e-3, 10.0, 60).tolist()]
    return [
        realised(quality, c, choose_targets(predicted, c / scale, w), f"w={w:.4g}")
        for w in weights
    ]


def single_targets(
    quality: npt.ArrayLike, costs: npt.ArrayLike, names: Sequence[str]
) -> list[CostQuality]:
    q = np.asarray(quality, dtype=np.float64)
    return [
        CostQuality(float(costs_i), float(q[:, j].mean()), name)
        for j, (name, costs_i) in enumerate(zip(names, np.asarray(costs), strict=True))
    ]


def oracle(quality: npt.ArrayLike, costs: npt.ArrayLike) -> CostQuality:
    """Best target per query, the cheapest among equally good ones."""
    q = np.asarray(quality, dtype=np.float64)
    c = np.asarray(costs, dtype=np.float64)
    best = q.max(axis=1, keepdims=True)
    # among targets reaching the best quality take the cheapest
    masked = np.where(q >= best - 1e-12, c[None, :], np.inf)
    return realised(q, c, np.argmin(masked, axis=1), "oracle")


def random_router(quality: npt.ArrayLike, costs: npt.ArrayLike) -> CostQuality:
    """Expected point of picking a target uniformly at random per query."""
    q = np.asarray(quality, dtype=np.float64)
    return CostQuality(float(np.asarray(costs, dtype=np.float64).mean()), float(q.mean()), "random")


def upper_hull(points: Sequence[CostQuality]) -> list[tuple[float, float]]:
    """The non-decreasing upper convex hull of (cost, quality) points, cheapest first.

    Mixing two operating points reaches any point on the segment between them (convex), and
    spending more never has to lose quality (non-decreasing): past the best point the hull is
    flat.
    """
    pts = sorted({(p.cost, p.quality) for p in points})
    hull: list[tuple[float, float]] = []
    for x, y in pts:
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            # drop the middle point when it lies on or below the segment from hull[-2] to (x, y)
            if (x2 - x1) * (y - y1) - (y2 - y1) * (x - x1) >= 0:
                hull.pop()
            else:
                break
        if hull and hull[-1][0] == x:
            hull[-1] = (x, max(y, hull[-1][1]))
        else:
            hull.append((x, y))
    # keep the rising part only; after the peak the curve is flat at the peak
    peak = max(range(len(hull)), key=lambda i: (hull[i][1], -i))
    return hull[: peak + 1]


def hull_value(hull: Sequence[tuple[float, float]], cost: float) -> float:
    """Quality reachable at ``cost`` on a hull from ``upper_hull``: 0 below the cheapest point,
    flat after the last one."""
    if not hull or cost < hull[0][0]:
        return 0.0
    xs = [h[0] for h in hull]
    ys = [h[1] for h in hull]
    return float(np.interp(cost, xs, ys))


def aiq(points: Sequence[CostQuality], cost_range: tuple[float, float] | None = None) -> float:
    """RouterBench's AIQ: mean height of the non-decreasing upper hull over the cost range.

    ``cost_range`` defaults to the points' own cheapest and dearest cost. Below the cheapest
    point the hull is 0 (nothing reachable), above the dearest it stays at its maximum.
    """
    hull = upper_hull(points)
    lo, hi = cost_range or (min(p.cost for p in points), max(p.cost for p in points))
    if hi <= lo:
        return hull_value(hull, lo)
    # Zero below the cheapest point; piecewise linear above it, so trapezoids over the
    # breakpoints are exact.
    start = max(lo, hull[0][0])
    if start >= hi:
        return 0.0
    xs = sorted({start, hi, *(x for x, _ in hull if start < x < hi)})
    ys = [hull_value(hull, x) for x in xs]
    area = sum((b - a) * (ya + yb) / 2.0 for (a, ya), (b, yb) in pairwise(zip(xs, ys, strict=True)))
    return area / (hi - lo)


def cost_at_quality(points: Sequence[CostQuality], quality: float) -> float | None:
    """Cheapest cost at which the hull of ``points`` reaches ``quality``; None if never."""
    hull = upper_hull(points)
    if not hull or hull[-1][1] < quality:
        return None
    for (x1, y1), (x2, y2) in pairwise(hull):
        if y1 >= quality:
            return x1
        if y2 >= quality:
            return x1 + (quality - y1) * (x2 - x1) / (y2 - y1)
    return hull[0][0] if hull[0][1] >= quality else None


@dataclass(frozen=True)
class PgrCurve:
    """PGR against the share of queries sent to the strong target (both from 0 to 1)."""

    strong_share: FloatArray
    pgr: FloatArray


def pgr_curve(advantage: npt.ArrayLike, weak: npt.ArrayLike, strong: npt.ArrayLike) -> PgrCurve:
    """Route the queries with the highest predicted ``advantage`` of strong over weak first.

    Returns n + 1 points (0, 1, ..., n queries sent to strong). Ties in ``advantage`` are
    broken by row order. Raises ValueError when both targets have the same mean quality.
    """
    adv = np.asarray(advantage, dtype=np.float64)
    w = np.asarray(weak, dtype=np.float64)
    s = np.asarray(strong, dtype=np.float64)
    n = len(adv)
    gap = s.mean() - w.mean()
    if n == 0 or abs(gap) < 1e-12:
        raise ValueError("PGR needs test rows and targets of different mean quality")
    order = np.argsort(-adv, kind="stable")
    gain = np.r_[0.0, np.cumsum((s - w)[order])]  # quality gained by sending the top m to strong
    quality = w.mean() + gain / n
    return PgrCurve(np.arange(n + 1) / n, (quality - w.mean()) / gap)


def apgr(curve: PgrCurve) -> float:
    """Area under PGR over the strong share in [0, 1] (trapezoidal; random routing gives 0.5)."""
    x, y = curve.strong_share, curve.pgr
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2.0))


def cpt(curve: PgrCurve, target_pgr: float) -> float | None:
    """Smallest share of strong calls whose PGR reaches ``target_pgr`` (None if never)."""
    hit = np.flatnonzero(curve.pgr >= target_pgr - 1e-12)
    return float(curve.strong_share[hit[0]]) if len(hit) else None
