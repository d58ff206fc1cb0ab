"""`semroute calibrate`: pick confidence thresholds from a labelled validation set.

Two goals: a target *precision* (the lowest threshold at which the queries still answered are
routed correctly at least that often: the abstain operating point users ask for), or a target
*coverage* (answer that share of queries, fall back on the rest). Globally, or per route (each
route's threshold set from the validation rows the router sends to it; routes with too few such
rows keep the global threshold).

Validation rows whose label the index does not know (e.g. ``oos``) count as wrong answers when
answered, so a precision target also makes the router abstain on out-of-scope queries.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from semroute.errors import ConfigError

if TYPE_CHECKING:
    from semroute.router import Router


@dataclass(frozen=True)
class OperatingPoint:
    threshold: float
    precision: float  # share correct among answered rows
    coverage: float  # share of rows answered
    rows: int


def threshold_for_precision(
    confidence: npt.ArrayLike, correct: npt.ArrayLike, precision: float
) -> OperatingPoint | None:
    """The lowest threshold whose answered rows (confidence >= threshold) reach ``precision``.

    Lowest means most coverage. Returns None when no threshold reaches it (not even answering
    only the most confident rows).
    """
    conf = np.asarray(confidence, dtype=np.float64)
    ok = np.asarray(correct, dtype=np.float64)
    n = len(conf)
    if n == 0:
        return None
    order = np.argsort(-conf, kind="stable")
    c = conf[order]
    cum = np.cumsum(ok[order]) / np.arange(1, n + 1)
    ends = np.flatnonzero(np.r_[c[1:] != c[:-1], True])  # a threshold cannot split a tie
    good = ends[cum[ends] >= precision - 1e-12]
    if len(good) == 0:
        return None
    e = int(good[-1])
    return OperatingPoint(float(c[e]), float(cum[e]), (e + 1) / n, n)


def threshold_for_coverage(confidence: npt.ArrayLike, coverage: float) -> OperatingPoint:
    """The highest threshold that still answers at least ``coverage`` of the rows."""
    conf = np.sort(np.asarray(confidence, dtype=np.float64))[::-1]
    n = len(conf)
    if n == 0:
        raise ValueError("no validation rows")
    m = max(1, math.ceil(coverage * n - 1e-9))
    t = float(conf[m - 1])
    return OperatingPoint(t, math.nan, float((conf >= t).sum() / n), n)


@dataclass
class Calibration:
    """Thresholds chosen, and the operating points behind them (for the printed table)."""

    global_threshold: float | None
    per_route: dict[str, float] = field(default_factory=dict)
    points: dict[str, OperatingPoint] = field(default_factory=dict)  # "*" = global
    skipped: dict[str, str] = field(default_factory=dict)  # route -> why it kept the global


def choose_thresholds(
    predicted: Sequence[str],
    confidence: npt.ArrayLike,
    correct: npt.ArrayLike,
    *,
    precision: float | None = None,
    coverage: float | None = None,
    per_route: bool = False,
    min_rows: int = 10,
) -> Calibration:
    """Thresholds for exactly one of ``precision`` or ``coverage``.

    ``predicted`` is the route the router would choose before any threshold, ``confidence`` its
    confidence, ``correct`` whether that route is the validation label. Raises ConfigError
    when a global precision target cannot be met, saying the best reachable.
    """
    if (precision is None) == (coverage is None):
        raise ConfigError("calibrate: give exactly one of --precision or --coverage")
    target = precision if precision is not None else coverage
    assert target is not None
    if not 0.0 < target <= 1.0:
        raise ConfigError(f"calibrate: target must be in (0, 1], got {target}")
    conf = np.asarray(confidence, dtype=np.float64)
    ok = np.asarray(correct, dtype=bool)
    pred = np.asarray(list(predicted), dtype=object)

    def pick(mask: npt.NDArray[np.bool_]) -> OperatingPoint | None:
        if precision is not None:
            return threshold_for_precision(conf[mask], ok[mask], precision)
        point = threshold_for_coverage(conf[mask], target)
        answered = mask & (conf >= point.threshold)
        return OperatingPoint(point.threshold, float(ok[answered].mean()), point.coverage,
                              point.rows)

    everything = np.ones(len(conf), dtype=bool)
    g = pick(everything)
    if g is None:
        best = float(ok[conf >= conf.max()].mean()) if len(conf) else 0.0
        raise ConfigError(
            f"calibrate: no threshold reaches precision {precision} on the validation set "
            f"(best: {best:.3f} answering only the most confident rows); lower --precision "
            "or add exemplars"
        )
    result = Calibration(global_threshold=g.threshold, points={"*": g})
    if per_route:
        for route in sorted(set(pred.tolist())):
            mask = pred == route
            if mask.sum() < min_rows:
                result.skipped[route] = f"{int(mask.sum())} validation rows < {min_rows}"
                continue
            p = pick(mask)
            if p is None:
                # nothing reaches the target for this route: answer it never rather than badly
                result.per_route[route] = 1.0 + 1e-6
                result.points[route] = OperatingPoint(1.0 + 1e-6, math.nan, 0.0, int(mask.sum()))
                result.skipped[route] = "target not reachable: route always falls back"
                continue
            result.per_route[route] = p.threshold
            result.points[route] = p
    return result


def calibrate_index(
    index_path: Path,
    val_csv: Path,
    *,
    precision: float | None = None,
    coverage: float | None = None,
    per_route: bool = False,
    min_rows: int = 10,
    encoder_path: Path | None = None,
    config: Path | None = None,
) -> tuple[Calibration, Path]:
    """Load the index with its encoder and run ``calibrate_router``."""
    from semroute.config import load_settings
    from semroute.router import Router

    settings = load_settings(config, limits__max_query_chars=16 * 1024 * 1024)
    router = Router.load(index_path, settings, encoder_path=encoder_path)
    return calibrate_router(router, val_csv, precision=precision, coverage=coverage,
                            per_route=per_route, min_rows=min_rows)


def calibrate_router(
    router: Router,
    val_csv: Path,
    *,
    precision: float | None = None,
    coverage: float | None = None,
    per_route: bool = False,
    min_rows: int = 10,
) -> tuple[Calibration, Path]:
    """Route the validation CSV, choose thresholds and write them into the manifest of the
    router's index version. Returns the calibration and the version directory written.

    The confidence a threshold is compared with does not depend on the threshold, and the
    pre-threshold winner is kept on fallbacks, so the index's current thresholds do not matter.
    """
    from semroute.evaluate import read_labelled_csv, route_labelled
    from semroute.index import write_thresholds

    texts, labels = read_labelled_csv(val_csv)
    run = route_labelled(router, texts)
    correct = np.array([p == t for p, t in zip(run.predicted, labels, strict=True)])
    cal = choose_thresholds(
        run.predicted, run.confidence, correct,
        precision=precision, coverage=coverage, per_route=per_route, min_rows=min_rows,
    )
    version_dir = router.index.path
    write_thresholds(version_dir, cal.global_threshold, cal.per_route)
    return cal, version_dir
