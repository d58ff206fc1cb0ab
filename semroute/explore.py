"""Exploration: now and then serve a plausible alternative target, so the targets a router
rarely chooses still get feedback to learn from (``semroute learn``; docs/LOOP.md).

Off by default. With rate ``r`` (``dispatcher.explore_rate``), a share ``r`` of decisions put
another target of their chain first: only a target the route already lists after policy, and,
when the decision predicts quality per target (an outcome index), only one predicted within
``tolerance`` of the chosen target. Among those the alternative is drawn by Thompson sampling:
each one's quality is drawn from a Beta distribution centred on its prediction, worth
``strength`` observations, and the highest draw serves, so a near-tie is explored more often
than a long shot. A labelled decision's scores are route shares, not per-target quality: any
other target of the route may serve. The rest of the chain keeps its order behind it (a
failing alternative falls back to the decided target first).

Each result carries its ``propensity``: the probability that the target it serves first had of
being served first, given the decision (1 - ``rate`` for the decided target when an alternative
was near, ``rate`` times its Thompson win probability for an alternative, 1 when nothing could
be explored). The win probability is computed, not sampled (``win_probabilities``: the Beta
densities integrated on a grid), so the same decision always logs the same propensity.

Pure and seeded by the caller's ``random.Random``: the dispatcher records ``explored`` and the
propensity in the decision log, where ``learn`` can tell served-by-exploration rows apart and
weigh each feedback row by how unlikely its target was to be served.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Explored:
    """The chain to serve (``chain[0]`` answers first) and whether exploration changed it."""

    chain: tuple[str, ...]
    explored: bool
    propensity: float = 1.0  # P(chain[0] served first | the decision); see the module docstring


def alternatives(
    chain: Sequence[str], scores: Mapping[str, float], tolerance: float
) -> list[str]:
    """The targets after ``chain[0]`` that exploration may serve instead (order kept)."""
    if len(chain) < 2:
        return []
    chosen = chain[0]
    if chosen not in scores:  # no per-target quality (labelled): the route's targets
        return list(chain[1:])
    floor = scores[chosen] - tolerance - 1e-12
    return [t for t in chain[1:] if t in scores and scores[t] >= floor]


def explore(
    chain: Sequence[str],
    scores: Mapping[str, float],
    *,
    rate: float,
    tolerance: float,
    rng: random.Random,
    strength: float = 10.0,
) -> Explored:
    """With probability ``rate``, ``chain`` with a Thompson-drawn alternative (see the module
    docstring) moved to the front; otherwise, or when there is none, ``chain`` as it was."""
    chain = tuple(chain)
    if rate <= 0 or rng.random() >= rate:
        stays = 1.0 if rate <= 0 or not alternatives(chain, scores, tolerance) else 1.0 - rate
        return Explored(chain, False, stays)
    near = alternatives(chain, scores, tolerance)
    if not near:
        return Explored(chain, False)
    pick = max(near, key=lambda t: _draw(scores.get(t, 0.5), strength, rng))
    win = win_probabilities([scores.get(t, 0.5) for t in near], strength)[near.index(pick)]
    return Explored((pick, *(t for t in chain if t != pick)), True, rate * win)


def win_probabilities(
    qualities: Sequence[float], strength: float = 10.0, points: int = 2048
) -> list[float]:
    """P(each draw is the highest) when each quality q is drawn from Beta(1 + q * strength,
    1 + (1 - q) * strength), as ``explore`` draws them: sum over a grid of x of density_a(x)
    times the product of the others' cumulative distributions at x (exact up to the grid)."""
    q = np.clip(np.asarray(qualities, dtype=np.float64), 0.0, 1.0)
    if q.size == 1:
        return [1.0]
    x = (np.arange(points) + 0.5) / points
    a, b = 1.0 + q * strength, 1.0 + (1.0 - q) * strength
    log_pdf = (a[:, None] - 1) * np.log(x) + (b[:, None] - 1) * np.log1p(-x)
    pdf = np.exp(log_pdf - log_pdf.max(axis=1, keepdims=True))
    pdf /= pdf.sum(axis=1, keepdims=True)  # per grid cell: P(draw in that cell)
    below = np.cumsum(pdf, axis=1) - pdf  # P(draw in an earlier cell)
    cdf_mid = below + 0.5 * pdf  # a tie within a cell counts half
    log_cdf = np.log(np.maximum(cdf_mid, 1e-300))
    others = log_cdf.sum(axis=0, keepdims=True) - log_cdf
    win = (pdf * np.exp(others)).sum(axis=1)
    return [float(v) for v in win / win.sum()]


def _draw(quality: float, strength: float, rng: random.Random) -> float:
    q = min(max(quality, 0.0), 1.0)
    return rng.betavariate(1.0 + q * strength, 1.0 + (1.0 - q) * strength)
