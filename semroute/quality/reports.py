"""Report assembly: every metric of a labelled or outcome run, as typed records.

Pure: takes the runs (what the router did) and the truth, returns frozen records; no router, no
I/O. ``to_dict()`` gives the report.json body, ``table()`` the lines the CLI prints.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from semroute.errors import ConfigError
from semroute.quality.metrics import (
    OOS_LABEL,
    AbstainMetrics,
    CostQuality,
    CoveragePoint,
    FloatArray,
    LabelMetrics,
    PgrCurve,
    ReliabilityBin,
    abstain_metrics,
    aiq,
    apgr,
    cost_at_quality,
    cost_quality_sweep,
    coverage_curve,
    cpt,
    label_metrics,
    oracle,
    pgr_curve,
    random_router,
    reliability,
    single_targets,
    upper_hull,
)
from semroute.quality.runs import LabelledRun

Row = tuple[str, str]


def _r(x: float | None, digits: int = 4) -> float | None:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return None
    return round(float(x), digits)


@dataclass(frozen=True)
class LabelsReport:
    """Labelled metrics. ``accuracy`` and ``in_scope_accuracy`` are the same figure (right
    answers over in-scope rows, an abstention counting as wrong); ``abstain`` is None when the
    test set has no out-of-scope row."""

    n_test: int
    n_in_scope: int
    n_oos: int
    accuracy: float
    accuracy_no_threshold: float
    macro_f1: float
    coverage: float
    answered_accuracy: float
    ece: float
    metrics: LabelMetrics
    curve: tuple[CoveragePoint, ...]
    bins: tuple[ReliabilityBin, ...]
    abstain: AbstainMetrics | None
    seconds: float = 0.0

    @property
    def in_scope_accuracy(self) -> float:
        return self.accuracy

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "n_test": self.n_test,
            "n_in_scope": self.n_in_scope,
            "n_oos": self.n_oos,
            "accuracy": _r(self.accuracy),
            "in_scope_accuracy": _r(self.accuracy),
            "accuracy_no_threshold": _r(self.accuracy_no_threshold),
            "macro_f1": _r(self.macro_f1),
            "coverage": _r(self.coverage),
            "answered_accuracy": _r(self.answered_accuracy),
            "ece": _r(self.ece),
            "per_route": {
                k: {"precision": _r(v.precision), "recall": _r(v.recall), "f1": _r(v.f1),
                    "support": v.support}
                for k, v in self.metrics.per_route.items()
            },
            "coverage_curve": [
                {"threshold": _r(p.threshold), "coverage": _r(p.coverage),
                 "accuracy": _r(p.accuracy)}
                for p in self.curve
            ],
            "reliability": [
                {"lower": b.lower, "upper": b.upper, "count": b.count,
                 "confidence": _r(b.confidence), "accuracy": _r(b.accuracy)}
                for b in self.bins
            ],
            "confusion": {"labels": list(self.metrics.labels),
                          "matrix": self.metrics.confusion.tolist()},
            "seconds": _r(self.seconds, 2),
            "queries_per_second": _r(self.n_test / self.seconds, 1) if self.seconds else None,
        }
        if self.abstain is not None:
            data.update(oos_recall=_r(self.abstain.recall),
                        oos_precision=_r(self.abstain.precision),
                        oos_auroc=_r(self.abstain.auroc))
        return data

    def table(self) -> list[Row]:
        rows = [
            ("test rows", f"{self.n_test} ({self.n_oos} out of scope)"),
            ("accuracy (in scope)", f"{self.accuracy:.4f}"),
            ("accuracy (no threshold)", f"{self.accuracy_no_threshold:.4f}"),
            ("macro-F1", f"{self.macro_f1:.4f}"),
            ("coverage", f"{self.coverage:.4f}"),
            ("accuracy of answered", f"{self.answered_accuracy:.4f}"),
            ("ECE", f"{self.ece:.4f}"),
        ]
        if self.abstain is not None:
            rows += [("OOS abstain recall", f"{self.abstain.recall:.4f}"),
                     ("OOS abstain precision", f"{self.abstain.precision:.4f}"),
                     ("OOS AUROC", f"{self.abstain.auroc:.4f}")]
        return rows


def labels_report(
    labels: Sequence[str], run: LabelledRun, known_routes: Sequence[str], n_bins: int = 10
) -> LabelsReport:
    """Every labelled metric from a run. Rows labelled ``oos`` or with a label the index does
    not know are out of scope: they must be abstained on (fallback) and are left out of
    accuracy, F1, coverage and calibration."""
    known = set(known_routes)
    oos = np.array([lab == OOS_LABEL or lab not in known for lab in labels], dtype=bool)
    ins = ~oos
    if not ins.any():
        raise ConfigError(
            f"no test row has a label the index knows (its routes: {sorted(known)[:10]}...); "
            "check that the test file and the index use the same labels"
        )
    y = [lab for lab, o in zip(labels, oos, strict=True) if not o]
    served = [s for s, o in zip(run.served, oos, strict=True) if not o]
    predicted = [p for p, o in zip(run.predicted, oos, strict=True) if not o]
    m = label_metrics(y, served, labels=sorted(known))
    raw_correct = np.array([p == t for p, t in zip(predicted, y, strict=True)])
    conf = run.confidence[ins]
    ece, bins = reliability(conf, raw_correct, n_bins)
    answered = ~run.fallback[ins]
    served_ok = np.array([s == t for s, t in zip(served, y, strict=True)])
    return LabelsReport(
        n_test=len(labels),
        n_in_scope=int(ins.sum()),
        n_oos=int(oos.sum()),
        accuracy=m.accuracy,
        accuracy_no_threshold=float(raw_correct.mean()),
        macro_f1=m.macro_f1,
        coverage=float(1.0 - run.fallback[ins].mean()),
        answered_accuracy=float(served_ok[answered].mean()) if answered.any() else math.nan,
        ece=ece,
        metrics=m,
        curve=tuple(coverage_curve(conf, raw_correct)),
        bins=tuple(bins),
        abstain=abstain_metrics(run.fallback, oos, run.confidence) if oos.any() else None,
        seconds=run.seconds,
    )


@dataclass(frozen=True)
class PgrSummary:
    """Two-target figures (RouteLLM): the weak and strong target, APGR and CPT."""

    weak: str
    strong: str
    apgr: float
    cpt50: float | None
    cpt80: float | None
    apgr_oracle: float
    cpt50_oracle: float | None
    curve: PgrCurve
    oracle_curve: PgrCurve


@dataclass(frozen=True)
class OutcomesReport:
    """Cost-quality metrics of an outcome run; ``pgr`` only with exactly two targets."""

    n_test: int
    singles: tuple[CostQuality, ...]
    best_single: CostQuality
    oracle: CostQuality
    random: CostQuality
    sweep: tuple[CostQuality, ...]
    router_max_quality: float
    router_max_quality_cost: float
    cost_ratio: float | None  # hull cost to reach the best single's quality / its cost
    cost_ratio_single_point: float | None
    aiq: float
    aiq_single_targets: float
    aiq_oracle: float
    cost_range: tuple[float, float]
    pgr: PgrSummary | None = None

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "n_test": self.n_test,
            "targets": [{"target": p.label, "cost": p.cost, "quality": _r(p.quality)}
                        for p in self.singles],
            "best_single": {"target": self.best_single.label,
                            "quality": _r(self.best_single.quality),
                            "cost": self.best_single.cost},
            "oracle": {"quality": _r(self.oracle.quality), "cost": _r(self.oracle.cost)},
            "random": {"quality": _r(self.random.quality), "cost": _r(self.random.cost)},
            "router_max_quality": _r(self.router_max_quality),
            "router_max_quality_cost": _r(self.router_max_quality_cost),
            "cost_ratio_at_best_single_quality": _r(self.cost_ratio),
            "cost_ratio_at_best_single_quality_single_point": _r(self.cost_ratio_single_point),
            "aiq": _r(self.aiq),
            "aiq_single_targets": _r(self.aiq_single_targets),
            "aiq_oracle": _r(self.aiq_oracle),
            "aiq_cost_range": list(self.cost_range),
            "router_curve": [{"weight": p.label, "cost": _r(p.cost), "quality": _r(p.quality)}
                             for p in self.sweep],
            "router_hull": [{"cost": _r(x), "quality": _r(y)} for x, y in upper_hull(self.sweep)],
        }
        if self.pgr is not None:
            g = self.pgr
            data.update(weak=g.weak, strong=g.strong, apgr=_r(g.apgr), cpt50=_r(g.cpt50),
                        cpt80=_r(g.cpt80), apgr_oracle=_r(g.apgr_oracle),
                        cpt50_oracle=_r(g.cpt50_oracle))
        return data

    def table(self) -> list[Row]:
        b = self.best_single
        ratio = _r(self.cost_ratio)
        rows = [
            ("test rows", str(self.n_test)),
            ("best single", f"{b.label}: {b.quality:.4f} at ${b.cost:.3g}"),
            ("oracle", f"{self.oracle.quality:.4f} at ${self.oracle.cost:.3g}"),
            ("random", f"{self.random.quality:.4f} at ${self.random.cost:.3g}"),
            ("router max quality", f"{self.router_max_quality:.4f}"),
            ("cost to match best single",
             "never" if ratio is None
             else f"{ratio:.3f} of its cost (hull); single point "
                  f"{_r(self.cost_ratio_single_point)}"),
            ("AIQ", f"{self.aiq:.4f} (single targets {self.aiq_single_targets:.4f})"),
        ]
        if self.pgr is not None:
            g = self.pgr
            rows += [("APGR", f"{g.apgr:.4f} (oracle {g.apgr_oracle:.4f}, random 0.5)"),
                     ("CPT(50%) / CPT(80%)", f"{_r(g.cpt50)} / {_r(g.cpt80)}")]
        return rows


def outcomes_report(
    predicted: FloatArray,
    quality: FloatArray,
    names: Sequence[str],
    costs: Sequence[float],
    weights: Sequence[float] | None = None,
) -> OutcomesReport:
    """Cost-quality metrics of a router that predicted ``predicted`` (n, targets) on test rows
    whose true quality is ``quality``; ``costs`` are prices in the same column order.

    AIQ is taken over the price range of the targets (cheapest to dearest), so it is
    comparable across routers on the same targets.
    """
    c = np.asarray(costs, dtype=np.float64)
    sweep = cost_quality_sweep(predicted, quality, c, weights)
    singles = single_targets(quality, c, names)
    best = max(singles, key=lambda p: (p.quality, -p.cost))
    lo, hi = float(c.min()), float(c.max())
    hull_cost = cost_at_quality(sweep, best.quality)
    reached = [p.cost for p in sweep if p.quality >= best.quality - 1e-12]
    pgr = None
    if len(names) == 2:
        weak, strong = (0, 1) if c[0] <= c[1] else (1, 0)
        curve = pgr_curve(predicted[:, strong] - predicted[:, weak], quality[:, weak],
                          quality[:, strong])
        ocurve = pgr_curve(quality[:, strong] - quality[:, weak], quality[:, weak],
                           quality[:, strong])
        pgr = PgrSummary(names[weak], names[strong], apgr(curve), cpt(curve, 0.5),
                         cpt(curve, 0.8), apgr(ocurve), cpt(ocurve, 0.5), curve, ocurve)
    return OutcomesReport(
        n_test=int(quality.shape[0]),
        singles=tuple(singles),
        best_single=best,
        oracle=oracle(quality, c),
        random=random_router(quality, c),
        sweep=tuple(sweep),
        router_max_quality=max(p.quality for p in sweep),
        router_max_quality_cost=max(sweep, key=lambda p: (p.quality, -p.cost)).cost,
        cost_ratio=hull_cost / best.cost if hull_cost is not None and best.cost > 0 else None,
        cost_ratio_single_point=min(reached) / best.cost if reached and best.cost > 0 else None,
        aiq=aiq(sweep, (lo, hi)),
        aiq_single_targets=aiq(singles, (lo, hi)),
        aiq_oracle=aiq([oracle(quality, c)], (lo, hi)),
        cost_range=(lo, hi),
        pgr=pgr,
    )


@dataclass(frozen=True)
class Provenance:
    """Which index, decision settings and test file produced a report."""

    test_file: str
    index_path: str
    index_version: str
    exemplars: int
    projection: bool
    tuning: Mapping[str, Any]
    k: int
    temperature: float
    shrinkage: float
    null_similarity: float | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "test_file": self.test_file,
            "index": {"path": self.index_path, "version": self.index_version,
                      "exemplars": self.exemplars, "projection": self.projection,
                      "tuning": dict(self.tuning)},
            "settings": {"k": self.k, "temperature": self.temperature,
                         "shrinkage": self.shrinkage, "null_similarity": self.null_similarity},
        }
