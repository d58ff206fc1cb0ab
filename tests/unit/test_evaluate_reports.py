"""Report assembly and test-file reading (semroute.quality reports, testfiles) on hand-made runs.

Report values are rounded to 4 decimals, hence abs=1e-4."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from semroute.errors import ExemplarError
from semroute.quality.reports import labels_report, outcomes_report
from semroute.quality.runs import LabelledRun
from semroute.quality.testfiles import read_labelled_csv, read_outcome_csv
from tests.conftest import write


def test_labels_report_separates_out_of_scope_rows() -> None:
    """OOS rows (label `oos` or unknown) are left out of accuracy and scored on abstention:
    one of two OOS rows abstained, one in-scope row wrongly abstained."""
    labels = ["a", "a", "b", "oos", "zzz"]
    run = LabelledRun(
        predicted=["a", "a", "b", "a", "b"],
        served=["a", "general", "b", "general", "b"],
        confidence=np.array([0.9, 0.3, 0.8, 0.2, 0.7]),
        fallback=np.array([False, True, False, True, False]),
    )
    r = labels_report(labels, run, ["a", "b", "general"]).to_dict()
    assert r["n_oos"] == 2 and r["n_in_scope"] == 3
    assert r["accuracy"] == pytest.approx(2 / 3, abs=1e-4)  # the abstained in-scope row counts wrong
    assert r["accuracy_no_threshold"] == pytest.approx(1.0, abs=1e-4)
    assert r["coverage"] == pytest.approx(2 / 3, abs=1e-4)
    assert r["answered_accuracy"] == pytest.approx(1.0, abs=1e-4)
    assert r["oos_recall"] == pytest.approx(0.5, abs=1e-4)
    assert r["oos_precision"] == pytest.approx(0.5, abs=1e-4)
    # OOS confidences 0.2, 0.7 vs in-scope 0.9, 0.3, 0.8: 5 of 6 pairs have OOS lower
    assert r["oos_auroc"] == pytest.approx(5 / 6, abs=1e-4)
    assert r["per_route"]["a"]["recall"] == pytest.approx(0.5, abs=1e-4)


def test_labels_report_without_oos_has_no_oos_keys() -> None:
    """When every label is known the abstain metrics are not reported."""
    run = LabelledRun(["a", "b"], ["a", "b"], np.array([0.9, 0.9]), np.array([False, False]))
    r = labels_report(["a", "b"], run, ["a", "b"]).to_dict()
    assert "oos_recall" not in r and r["accuracy"] == 1.0 and r["ece"] == pytest.approx(0.1, abs=1e-4)


def test_outcomes_report_two_targets_has_apgr_and_cost_ratio() -> None:
    """A router that knows which queries need the strong model matches its quality at half its
    cost; best single, oracle, APGR and CPT follow by hand."""
    quality = np.array([[0.0, 1.0], [1.0, 1.0], [0.0, 1.0], [1.0, 1.0]])
    predicted = np.array([[0.1, 0.9], [0.9, 0.9], [0.2, 0.8], [0.8, 0.85]])
    r = outcomes_report(predicted, quality, ["weak", "strong"], [1.0, 10.0]).to_dict()
    assert r["best_single"] == {"target": "strong", "quality": 1.0, "cost": 10.0}
    assert r["oracle"] == {"quality": 1.0, "cost": 5.5}
    assert r["router_max_quality"] == 1.0
    assert r["cost_ratio_at_best_single_quality"] == pytest.approx(0.55, abs=1e-4)
    assert r["apgr"] == pytest.approx(r["apgr_oracle"], abs=1e-4)
    assert r["cpt50"] == pytest.approx(0.25, abs=1e-4)
    assert r["weak"] == "weak" and r["strong"] == "strong"


def test_outcomes_report_never_reaching_best_single_is_null() -> None:
    """A router that always picks the weak target never matches the best single: null ratio."""
    quality = np.array([[0.0, 1.0], [0.0, 1.0]])
    predicted = np.array([[0.9, 0.1], [0.9, 0.1]])
    r = outcomes_report(predicted, quality, ["weak", "strong"], [1.0, 10.0]).to_dict()
    assert r["cost_ratio_at_best_single_quality"] is None
    assert r["router_max_quality"] == 0.0


def test_read_labelled_csv_reports_every_bad_row_with_file_and_line(tmp_path: Path) -> None:
    """Rows with missing fields or empty labels are all listed as file:line."""
    f = write(tmp_path / "t.csv", "text,label\nok,a\nonly one field\n,b\nfine,\n")
    with pytest.raises(ExemplarError) as err:
        read_labelled_csv(f)
    lines = [p.line for p in err.value.problems]
    assert lines == [3, 4, 5]
    assert f"{f}:3" in str(err.value)


def test_read_outcome_csv_checks_scores_and_picks_named_columns(tmp_path: Path) -> None:
    """Extra columns are ignored when targets are named; an out-of-range score is an error."""
    f = write(tmp_path / "o.csv", "text,subject,m1,m2\nq1,math,1,0\nq2,law,0.5,1\n")
    texts, scores, names = read_outcome_csv(f, ["m2", "m1"])
    assert texts == ["q1", "q2"] and names == ("m2", "m1")
    assert scores.tolist() == [[0.0, 1.0], [1.0, 0.5]]
    bad = write(tmp_path / "b.csv", "text,m1\nq1,1.5\n")
    with pytest.raises(ExemplarError, match=r"b.csv:2: m1: 1.5 is outside 0..1"):
        read_outcome_csv(bad)


def test_labels_report_refuses_a_test_file_sharing_no_label_with_the_index() -> None:
    """A test file for another index would score as all-OOS; that is an error that says why."""
    from semroute.errors import ConfigError

    run = LabelledRun(["a"], ["a"], np.array([0.9]), np.array([False]))
    with pytest.raises(ConfigError, match="no test row has a label the index knows"):
        labels_report(["x"], run, ["a", "b"])


def test_labels_report_is_typed_and_names_in_scope_accuracy() -> None:
    """The record carries the figures as attributes; the JSON form adds in_scope_accuracy
    (the same as accuracy: an abstained in-scope row counts wrong) next to the OOS keys."""
    run = LabelledRun(["a", "a", "a"], ["a", "default", "default"], np.array([0.9, 0.2, 0.1]),
                      np.array([False, True, True]))
    report = labels_report(["a", "a", "oos"], run, ["a", "default"])
    assert report.in_scope_accuracy == pytest.approx(0.5)
    assert report.abstain is not None and report.abstain.recall == pytest.approx(1.0)
    data = report.to_dict()
    assert data["in_scope_accuracy"] == data["accuracy"] == pytest.approx(0.5)
    assert {"oos_recall", "oos_precision", "oos_auroc"} <= set(data)
    assert ("OOS abstain recall", "1.0000") in report.table()
