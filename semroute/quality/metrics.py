"""Labelled-routing metrics: pure numpy functions returning frozen records.

Each takes arrays and returns a plain record, so it can be checked by hand. The cost-quality
maths (AIQ, hull, PGR) lives in ``semroute.tune.frontier`` (the build-time tuner uses it too)
and is re-exported here, so ``semroute.quality.metrics`` is the one place reports and plots
read their records from.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from semroute.abstain import auroc
from semroute.tune.frontier import (
    CostQuality,
    PgrCurve,
    aiq,
    apgr,
    choose_targets,
    cost_at_quality,
    cost_quality_sweep,
    cpt,
    hull_value,
    oracle,
    pgr_curve,
    random_router,
    realised,
    single_targets,
    upper_hull,
)
from semroute.types import OUT_OF_SCOPE

__all__ = [
    "AbstainMetrics",
    "AbstentionPoint",
    "CostQuality",
    "CoveragePoint",
    "LabelMetrics",
    "PgrCurve",
    "ReliabilityBin",
    "RouteScore",
    "abstain_metrics",
    "abstention_curve",
    "aiq",
    "apgr",
    "auroc",
    "choose_targets",
    "cost_at_quality",
    "cost_quality_sweep",
    "coverage_curve",
    "cpt",
    "hull_value",
    "label_metrics",
    "oracle",
    "pgr_curve",
    "random_router",
    "realised",
    "reliability",
    "single_targets",
    "upper_hull",
]

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]

OOS_LABEL = OUT_OF_SCOPE

@dataclass(frozen=True)
class RouteScore:
    """Precision, recall and F1 of one route, and how many test rows carry it."""

    precision: float
    recall: float
    f1: float
    support: int


@dataclass(frozen=True)
class LabelMetrics:
    accuracy: float
    macro_f1: float
    per_route: dict[str, RouteScore]
    labels: tuple[str, ...]
    confusion: npt.NDArray[np.int64]  # rows = true label, columns = predicted, order = labels


def label_metrics(
    y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str] | None = None
) -> LabelMetrics:
    """Accuracy, macro-F1 over the true labels, per-route P/R/F1 and the confusion matrix.

    ``labels`` fixes the row/column order of the confusion matrix; labels seen in either
    sequence but missing from it are appended in sorted order. Macro-F1 averages over the
    labels that occur in ``y_true`` (a route never asked for does not drag it down). A route
    never predicted has precision 0.
    """
    if len(y_true) != len(y_pred):
        raise ValueError(f"y_true has {len(y_true)} rows but y_pred has {len(y_pred)}")
    if not y_true:
        raise ValueError("no test rows")
    order = list(labels or [])
    seen = set(order)
    for lab in sorted(set(y_true) | set(y_pred)):
        if lab not in seen:
            order.append(lab)
            seen.add(lab)
    pos = {lab: i for i, lab in enumerate(order)}
    cm = np.zeros((len(order), len(order)), dtype=np.int64)
    for t, p in zip(y_true, y_pred, strict=True):
        cm[pos[t], pos[p]] += 1
    tp = np.diag(cm).astype(np.float64)
    pred_n = cm.sum(axis=0).astype(np.float64)
    true_n = cm.sum(axis=1).astype(np.float64)
    precision = np.divide(tp, pred_n, out=np.zeros_like(tp), where=pred_n > 0)
    recall = np.divide(tp, true_n, out=np.zeros_like(tp), where=true_n > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    per_route = {
        lab: RouteScore(float(precision[i]), float(recall[i]), float(f1[i]), int(true_n[i]))
        for i, lab in enumerate(order)
    }
    present = true_n > 0
    return LabelMetrics(
        accuracy=float(tp.sum() / len(y_true)),
        macro_f1=float(f1[present].mean()),
        per_route=per_route,
        labels=tuple(order),
        confusion=cm,
    )


@dataclass(frozen=True)
class CoveragePoint:
    """Answering only queries with confidence >= threshold: the share answered and their accuracy."""

    threshold: float
    coverage: float
    accuracy: float


def coverage_curve(
    confidence: npt.ArrayLike, correct: npt.ArrayLike, max_points: int = 101
) -> list[CoveragePoint]:
    """Accuracy against coverage as the threshold rises, highest coverage first.

    One point per distinct confidence value (thinned to about ``max_points``), so the curve is
    exact: at threshold t every query with confidence >= t is answered.
    """
    conf = np.asarray(confidence, dtype=np.float64)
    ok = np.asarray(correct, dtype=np.float64)
    n = len(conf)
    if n == 0:
        return []
    order = np.argsort(-conf, kind="stable")
    conf_sorted = conf[order]
    cum_ok = np.cumsum(ok[order])
    # last index of each run of equal confidence: a threshold there answers everything up to it
    ends = np.flatnonzero(np.r_[conf_sorted[1:] != conf_sorted[:-1], True])
    if len(ends) > max_points:
        pick = np.unique(np.linspace(0, len(ends) - 1, max_points).round().astype(int))
        ends = ends[pick]
    points = [
        CoveragePoint(float(conf_sorted[e]), (e + 1) / n, float(cum_ok[e] / (e + 1)))
        for e in ends
    ]
    return points[::-1]


@dataclass(frozen=True)
class ReliabilityBin:
    lower: float
    upper: float
    count: int
    confidence: float  # mean confidence in the bin (nan when empty)
    accuracy: float  # share correct in the bin (nan when empty)


def reliability(
    confidence: npt.ArrayLike, correct: npt.ArrayLike, n_bins: int = 10
) -> tuple[float, list[ReliabilityBin]]:
    """Expected calibration error over equal-width bins of [0, 1], and the bins.

    ECE = sum over bins of (bin count / n) * |accuracy(bin) - mean confidence(bin)|. A
    confidence of exactly 1.0 falls in the last bin.
    """
    conf = np.clip(np.asarray(confidence, dtype=np.float64), 0.0, 1.0)
    ok = np.asarray(correct, dtype=np.float64)
    n = len(conf)
    idx = np.minimum((conf * n_bins).astype(int), n_bins - 1)
    bins: list[ReliabilityBin] = []
    ece = 0.0
    for b in range(n_bins):
        mask = idx == b
        count = int(mask.sum())
        if count:
            c, a = float(conf[mask].mean()), float(ok[mask].mean())
            ece += count / n * abs(a - c)
        else:
            c = a = math.nan
        bins.append(ReliabilityBin(b / n_bins, (b + 1) / n_bins, count, c, a))
    return ece, bins


@dataclass(frozen=True)
class AbstainMetrics:
    """How well abstaining (falling back) picks out the out-of-scope queries."""

    precision: float  # abstained rows that were out of scope / abstained rows
    recall: float  # out-of-scope rows abstained on / out-of-scope rows
    auroc: float  # of (1 - confidence) as an out-of-scope score


def abstain_metrics(
    abstained: npt.ArrayLike, out_of_scope: npt.ArrayLike, confidence: npt.ArrayLike
) -> AbstainMetrics:
    ab = np.asarray(abstained, dtype=bool)
    oos = np.asarray(out_of_scope, dtype=bool)
    n_ab, n_oos = int(ab.sum()), int(oos.sum())
    hit = int((ab & oos).sum())
    return AbstainMetrics(
        precision=hit / n_ab if n_ab else 0.0,
        recall=hit / n_oos if n_oos else math.nan,
        auroc=auroc(-np.asarray(confidence, dtype=np.float64), oos),
    )


@dataclass(frozen=True)
class AbstentionPoint:
    """At ``threshold``: the share of in-scope rows answered and of out-of-scope rows abstained
    on (a row is answered when its confidence >= threshold)."""

    threshold: float
    in_scope_coverage: float
    oos_recall: float


def abstention_curve(
    confidence: npt.ArrayLike, out_of_scope: npt.ArrayLike, max_points: int = 101
) -> list[AbstentionPoint]:
    """In-scope coverage against out-of-scope recall as the threshold rises, one point per
    distinct confidence (thinned to about ``max_points``), highest coverage first."""
    conf = np.asarray(confidence, dtype=np.float64)
    oos = np.asarray(out_of_scope, dtype=bool)
    n_in, n_oos = int((~oos).sum()), int(oos.sum())
    if n_in == 0 or n_oos == 0:
        return []
    levels = np.unique(conf)
    if len(levels) > max_points:
        levels = levels[np.unique(np.linspace(0, len(levels) - 1, max_points).round().astype(int))]
    ins_sorted = np.sort(conf[~oos])
    oos_sorted = np.sort(conf[oos])
    points = []
    for t in levels:
        answered_in = n_in - int(np.searchsorted(ins_sorted, t, side="left"))
        abstained_oos = int(np.searchsorted(oos_sorted, t, side="left"))
        points.append(AbstentionPoint(float(t), answered_in / n_in, abstained_oos / n_oos))
    return points
