"""What the router did with each test query (the runs that reports are computed from)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from semroute.quality.metrics import BoolArray, FloatArray

if TYPE_CHECKING:
    from semroute.router import Router


@dataclass
class LabelledRun:
    """What the router did with each test query: the route it would pick with no threshold,
    the route it served, its confidence and whether it fell back."""

    predicted: list[str]
    served: list[str]
    confidence: FloatArray
    fallback: BoolArray
    seconds: float = 0.0


def _batches(texts: Sequence[str], size: int) -> list[Sequence[str]]:
    return [texts[i : i + size] for i in range(0, len(texts), size)]


def route_labelled(router: Router, texts: Sequence[str], batch_size: int = 256) -> LabelledRun:
    """Route every text with the real Router (index thresholds applied)."""
    import time

    from semroute.types import Query

    started = time.perf_counter()
    predicted, served, conf, fb = [], [], [], []
    for chunk in _batches(texts, batch_size):
        for d in router.route_batch([Query(t) for t in chunk]):
            # On a fallback the pre-threshold winner is the top vote share.
            predicted.append(next(iter(d.scores)) if d.fallback else d.route)
            served.append(d.route)
            conf.append(d.confidence)
            fb.append(d.fallback)
    return LabelledRun(predicted, served, np.asarray(conf, dtype=np.float64),
                       np.asarray(fb, dtype=bool), time.perf_counter() - started)


def route_outcomes(
    router: Router, texts: Sequence[str], targets: Sequence[str], batch_size: int = 128
) -> FloatArray:
    """Predicted quality per target (columns in ``targets`` order) for every text."""
    from semroute.types import Query

    rows: list[list[float]] = []
    for chunk in _batches(texts, batch_size):
        for d in router.route_batch([Query(t) for t in chunk]):
            rows.append([float(d.scores[t]) for t in targets])
    return np.asarray(rows, dtype=np.float64)


