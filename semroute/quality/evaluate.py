"""Evaluation runners: route a test CSV through the real core, then report and plot.

``evaluate_labels`` routes every row with the real Router (labelled indexes);
``evaluate_outcomes`` routes an outcome test set and sweeps the cost weight. The maths is in
``semroute.quality.metrics`` (pure), report assembly in ``semroute.quality.reports``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from semroute.errors import ConfigError
from semroute.quality.reports import (
    LabelsReport,
    OutcomesReport,
    Provenance,
    labels_report,
    outcomes_report,
)
from semroute.quality.runs import route_labelled, route_outcomes
from semroute.quality.testfiles import read_labelled_csv, read_outcome_csv

if TYPE_CHECKING:
    from semroute.router import Router
    from semroute.types import Target


@dataclass(frozen=True)
class LabelsEvaluation:
    """A labelled evaluation: the report, where it came from, and the plots written."""

    report: LabelsReport
    provenance: Provenance
    plots: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        """The report.json body."""
        return {**self.report.to_dict(), **self.provenance.to_dict(), "plots": list(self.plots)}


@dataclass(frozen=True)
class OutcomesEvaluation:
    """An outcome evaluation: the report, where it came from, and the plots written."""

    report: OutcomesReport
    provenance: Provenance
    plots: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        """The report.json body."""
        return {**self.report.to_dict(), **self.provenance.to_dict(), "plots": list(self.plots)}


def evaluate_labels(
    router: Router, test_csv: Path, out: Path, *, bins: int = 10, limit: int | None = None
) -> LabelsEvaluation:
    """Route a labelled test CSV, write OUT/report.json and the PNG plots; return the report."""
    import json

    from semroute.quality import plots
    from semroute.types import ExemplarKind

    if router.index.kind is not ExemplarKind.LABELLED:
        raise ConfigError(
            f"{router.index.path}: eval labels needs a labelled index (built from `text,label` "
            "rows); this one holds outcome scores: use `semroute eval outcomes`"
        )
    texts, labels = read_labelled_csv(test_csv)
    if limit:
        texts, labels = texts[:limit], labels[:limit]
    run = route_labelled(router, texts)
    report = labels_report(labels, run, list(router.index.route_table.routes), bins)
    m = report.metrics
    made = [
        plots.confusion_heatmap(m.confusion, m.labels, out / "confusion.png"),
        plots.coverage_plot(report.curve, out / "coverage.png"),
        plots.reliability_diagram(report.bins, report.ece, out / "reliability.png"),
    ]
    result = LabelsEvaluation(report, provenance(router, test_csv), tuple(p.name for p in made))
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return result


def evaluate_outcomes(
    router: Router,
    test_csv: Path,
    out: Path,
    prices: Mapping[str, Target],
    *,
    limit: int | None = None,
) -> OutcomesEvaluation:
    """Route an outcome test CSV (a true score column per target), sweep the cost weight, write
    OUT/report.json and the PNG plots; return the report. Raises ConfigError when a target has
    no price or the index is not an outcome index."""
    import json

    from semroute.quality import plots
    from semroute.types import ExemplarKind

    index = router.index
    if index.kind is not ExemplarKind.OUTCOMES:
        raise ConfigError(
            f"{index.path}: eval outcomes needs an outcome index (built from a CSV with a score "
            f"column per target); this one is {index.kind.value}: use `semroute eval labels`"
        )
    targets = list(index.score_targets)
    missing = [t for t in targets if t not in prices]
    if missing:
        raise ConfigError(
            f"no price for target(s) {missing}; give --targets with a routes YAML or a prices "
            "CSV (model,input_usd_per_1m_tokens,output_usd_per_1m_tokens)"
        )
    if max(prices[t].cost for t in targets) <= 0:
        raise ConfigError(
            f"{index.path}: every target's price is 0, so there is no cost axis; give --targets "
            "with a routes YAML or a prices CSV"
        )
    texts, quality, _ = read_outcome_csv(test_csv, targets)
    if limit:
        texts, quality = texts[:limit], quality[:limit]
    predicted = route_outcomes(router, texts, targets)
    report = outcomes_report(predicted, quality, targets, [prices[t].cost for t in targets])
    made = [plots.cost_quality_plot(list(report.sweep), list(report.singles),
                                    [report.oracle, report.random], out / "cost_quality.png")]
    if report.pgr is not None:
        made.append(plots.pgr_plot(report.pgr.curve, report.pgr.oracle_curve, out / "pgr.png"))
    result = OutcomesEvaluation(report, provenance(router, test_csv), tuple(p.name for p in made))
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return result


def provenance(router: Router, test_csv: Path) -> Provenance:
    """Which index, decision settings (as served) and test file produced a report."""
    d = router.decision_settings
    index = router.index
    return Provenance(
        test_file=str(test_csv), index_path=str(index.path), index_version=index.version,
        exemplars=index.size, projection=index.manifest.projection is not None,
        tuning=dict(index.manifest.tuning), k=d.k, temperature=d.temperature,
        shrinkage=d.shrinkage, null_similarity=d.null_similarity,
    )
