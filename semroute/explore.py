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

Pure and seeded by the caller's ``random.Random``: the dispatcher records ``explored`` in the
decision log, where ``learn`` can tell served-by-exploration rows apart.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Explored:
    """The chain to serve (``chain[0]`` answers first) and whether exploration changed it."""

    chain: tuple[str, ...]
    explored: bool


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
        return Explored(chain, False)
    near = alternatives(chain, scores, tolerance)
    if not near:
        return Explored(chain, False)
    pick = max(near, key=lambda t: _draw(scores.get(t, 0.5), strength, rng))
    return Explored((pick, *(t for t in chain if t != pick)), True)


def _draw(quality: float, strength: float, rng: random.Random) -> float:
    q = min(max(quality, 0.0), 1.0)
    return rng.betavariate(1.0 + q * strength, 1.0 + (1.0 - q) * strength)
