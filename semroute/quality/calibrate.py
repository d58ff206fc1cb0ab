"""`semroute calibrate`: pick confidence thresholds from a labelled validation set.

Three goals: a target *precision* (the lowest threshold at which the queries still answered are
routed correctly at least that often: the abstain operating point users ask for), a target
*coverage* (answer that share of queries, fall back on the rest), or a target *in-scope
coverage* (answer that share of the in-scope rows; rows labelled ``oos`` or with a label the
index does not know are out of scope and everything above the threshold they fall under is
abstained on). Globally, or per route (each route's threshold set from the validation rows the
router sends to it; routes with too few such rows keep the global threshold).

Validation rows whose label the index does not know (e.g. ``oos``) count as wrong answers when
answered, so a precision target also makes the router abstain on out-of-scope queries.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from semroute.errors import ConfigError
from semroute.logs import get_logger
from semroute.types import OUT_OF_SCOPE

if TYPE_CHECKING:
    from semroute.config import Settings
    from semroute.index import ExemplarIndex
    from semroute.router import Router
    from semroute.static_encoder import StaticEncoder

log = get_logger(__name__)


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
    added_out_of_scope: int = 0  # validation rows added to the index as out-of-scope exemplars


def choose_thresholds(
    predicted: Sequence[str],
    confidence: npt.ArrayLike,
    correct: npt.ArrayLike,
    *,
    precision: float | None = None,
    coverage: float | None = None,
    in_scope_coverage: float | None = None,
    in_scope: npt.ArrayLike | None = None,
    per_route: bool = False,
    min_rows: int = 10,
) -> Calibration:
    """Thresholds for exactly one of ``precision``, ``coverage`` or ``in_scope_coverage``.

    ``predicted`` is the route the router would choose before any threshold, ``confidence`` its
    confidence, ``correct`` whether that route is the validation label, ``in_scope`` whether
    the row has a route at all (default: every row). With ``in_scope_coverage`` the threshold
    is the highest that answers that share of the in-scope rows; the out-of-scope rows only
    show up in the reported precision. Raises ConfigError when a global precision target
    cannot be met (saying the best reachable) or no row is in scope.
    """
    goals = [g for g in (precision, coverage, in_scope_coverage) if g is not None]
    if len(goals) != 1:
        raise ConfigError(
            "calibrate: give exactly one of --precision, --coverage or --in-scope-coverage"
        )
    target = goals[0]
    if not 0.0 < target <= 1.0:
        raise ConfigError(f"calibrate: target must be in (0, 1], got {target}")
    conf = np.asarray(confidence, dtype=np.float64)
    ok = np.asarray(correct, dtype=bool)
    pred = np.asarray(list(predicted), dtype=object)
    inside = np.ones(len(conf), dtype=bool) if in_scope is None else np.asarray(in_scope, bool)
    if in_scope_coverage is not None and not inside.any():
        raise ConfigError(
            "calibrate: --in-scope-coverage needs in-scope validation rows (labels the index "
            "knows); every row is out of scope"
        )

    def pick(mask: npt.NDArray[np.bool_]) -> OperatingPoint | None:
        if precision is not None:
            return threshold_for_precision(conf[mask], ok[mask], precision)
        counted = mask & inside if in_scope_coverage is not None else mask
        if not counted.any():
            return None
        point = threshold_for_coverage(conf[counted], target)
        answered = mask & (conf >= point.threshold)
        accuracy = float(ok[answered].mean()) if answered.any() else math.nan
        return OperatingPoint(point.threshold, accuracy, point.coverage, int(counted.sum()))

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
        for route in sorted(set(pred.tolist()) - {OUT_OF_SCOPE}):  # examples are no route
            mask = pred == route
            if mask.sum() < min_rows:
                result.skipped[route] = f"{int(mask.sum())} validation rows < {min_rows}"
                continue
            p = pick(mask)
            if p is None and precision is None:
                result.skipped[route] = "no in-scope validation rows"
                continue
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
    settings: Settings,
    *,
    precision: float | None = None,
    coverage: float | None = None,
    in_scope_coverage: float | None = None,
    per_route: bool = False,
    min_rows: int = 10,
    encoder_path: Path | None = None,
    add_out_of_scope: bool = True,
) -> tuple[Calibration, Path]:
    """Load the index with its encoder (under the caller's ``settings``) and run
    ``calibrate_router``."""
    from semroute.router import Router

    # Thresholds are set on the full decision's confidence: the two-stage encoder's static
    # stage estimates it and consults them, so it must not be what they are fitted on.
    settings = settings.model_copy(update={
        "encoder": settings.encoder.model_copy(update={"two_stage": False})})
    router = Router.load(index_path, settings, encoder_path=encoder_path)
    return calibrate_router(router, val_csv, precision=precision, coverage=coverage,
                            in_scope_coverage=in_scope_coverage, per_route=per_route,
                            min_rows=min_rows, add_out_of_scope=add_out_of_scope)


def calibrate_router(
    router: Router,
    val_csv: Path,
    *,
    precision: float | None = None,
    coverage: float | None = None,
    in_scope_coverage: float | None = None,
    per_route: bool = False,
    min_rows: int = 10,
    add_out_of_scope: bool = True,
) -> tuple[Calibration, Path]:
    """Route the validation CSV, choose thresholds and write them into the manifest of the
    router's index version. Returns the calibration and the version directory written.

    The confidence a threshold is compared with does not depend on the threshold, and the
    pre-threshold winner is kept on fallbacks, so the index's current thresholds do not matter.
    Rows labelled ``oos`` or with a label the index has no route for are out of scope.

    With ``add_out_of_scope`` (the default) the rows labelled ``oos`` are first added to the
    index as out-of-scope exemplars (``add_out_of_scope_exemplars``: a new version, switched
    to), and the thresholds are chosen on the remaining rows, which the new exemplars have not
    seen. Rows the router falls back on because out-of-scope exemplars won their vote are never
    answered, whatever the threshold.
    """
    from semroute.index import write_thresholds
    from semroute.quality.metrics import OOS_LABEL
    from semroute.quality.runs import route_labelled
    from semroute.quality.testfiles import read_labelled_csv

    texts, labels = read_labelled_csv(val_csv)
    added = 0
    if add_out_of_scope and OOS_LABEL in labels:
        examples = [t for t, lab in zip(texts, labels, strict=True) if lab == OOS_LABEL]
        grown = add_out_of_scope_exemplars(router, examples, str(val_csv))
        if grown is not None:
            router, added = grown
            kept = [i for i, lab in enumerate(labels) if lab != OOS_LABEL]
            texts, labels = [texts[i] for i in kept], [labels[i] for i in kept]
    if not texts:
        raise ConfigError(f"calibrate: {val_csv}: no validation rows left to choose thresholds on")
    run = route_labelled(router, texts)
    known = set(router.index.route_table.routes)
    correct = np.array([p == t for p, t in zip(run.predicted, labels, strict=True)])
    in_scope = np.array([t != OOS_LABEL and t in known for t in labels])
    # out-of-scope exemplars won the vote: a fallback at any threshold
    confidence = np.where(np.asarray(run.predicted) == OOS_LABEL, -np.inf, run.confidence)
    cal = choose_thresholds(
        run.predicted, confidence, correct,
        precision=precision, coverage=coverage, in_scope_coverage=in_scope_coverage,
        in_scope=in_scope, per_route=per_route, min_rows=min_rows,
    )
    cal.added_out_of_scope = added
    _finite_thresholds(cal)
    version_dir = router.index.path
    write_thresholds(version_dir, cal.global_threshold, cal.per_route)
    log.info("calibrated", index=str(version_dir), threshold=cal.global_threshold,
             per_route=len(cal.per_route), added_out_of_scope=added)
    return cal, version_dir


def _finite_thresholds(cal: Calibration) -> None:
    """A coverage goal that reaches into the rows out-of-scope exemplars took gives -inf:
    answer everything else (threshold 0) and say so."""
    if cal.global_threshold is not None and not math.isfinite(cal.global_threshold):
        cal.global_threshold = 0.0
        cal.skipped["*"] = "coverage not reachable: out-of-scope exemplars take more rows"
    for route, value in list(cal.per_route.items()):
        if not math.isfinite(value):
            cal.per_route[route] = 0.0
            cal.skipped[route] = "coverage not reachable: out-of-scope exemplars take more rows"
    for name, point in list(cal.points.items()):
        if not math.isfinite(point.threshold):
            cal.points[name] = replace(point, threshold=0.0)


def add_out_of_scope_exemplars(
    router: Router, examples: Sequence[str], source: str
) -> tuple[Router, int] | None:
    """A new version of the router's index with ``examples`` added as out-of-scope exemplars
    (label ``oos``), built like the original (same route table, FAISS kind and tuning), with
    ``current`` switched to it; the router on it and how many rows were added. None (with a
    warning) when the index cannot take them: an outcome index, or no default route."""
    from semroute.index import ExemplarIndex, build_from_exemplars
    from semroute.types import OUT_OF_SCOPE, Exemplar, ExemplarKind

    index = router.index
    manifest = index.manifest
    if manifest.kind is not ExemplarKind.LABELLED or manifest.route_table.default_route is None:
        log.warning(
            "out_of_scope_rows_not_added",
            why="outcome index" if manifest.kind is not ExemplarKind.LABELLED
            else "the index has no default route to fall back to",
        )
        return None
    from semroute.exemplars import ExemplarSet

    rows = [
        Exemplar(text=str(t), label=str(lab), weight=float(w), source=f"{index.path}:{i + 1}")
        for i, (t, lab, w) in enumerate(zip(index.texts, index.labels, index.weights, strict=True))
    ]
    seen = {e.text for e in rows}
    new = [t for t in dict.fromkeys(examples) if t not in seen]
    rows += [Exemplar(text=t, label=OUT_OF_SCOPE, source=source) for t in new]
    settings = router.settings.index.model_copy(update={
        "faiss": manifest.faiss.kind,
        "projection": "auto" if manifest.tuning else (
            "learned" if manifest.projection is not None else "none"),
    })
    version_dir = build_from_exemplars(
        ExemplarSet(ExemplarKind.LABELLED, rows), manifest.route_table, index.path.parent.parent,
        router.encoder, settings=settings, decision=router.settings.decision, progress=False,
        encoder_path=Path(manifest.encoder.path) if manifest.encoder.path else None,
        tune=bool(manifest.tuning), static_model=_static_model_of(index, router),
    )
    log.info("out_of_scope_exemplars_added", rows=len(new), index=str(version_dir))
    return router.with_index(ExemplarIndex.load(version_dir)), len(new)


def _static_model_of(index: ExemplarIndex, router: Router) -> StaticEncoder | None:
    """The static model ``index`` was built with (two-stage encoder), so a version grown from
    it keeps its static stage; None when it has none or that model is gone or no longer fits
    (the new version is then built without one, as ``index build --no-static`` would)."""
    from semroute.errors import SemrouteError
    from semroute.two_stage import recorded_static_model

    record = index.manifest.static
    if record is None:
        return None
    try:
        return recorded_static_model(index.path, record, router.settings,
                                     router.encoder.fingerprint)
    except SemrouteError as exc:
        log.warning("static_stage_not_kept", why=f"{exc}; the new version has no static stage "
                    "(two-stage off for it)")
        return None
