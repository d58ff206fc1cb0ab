"""The exemplar lint checks on hand-made vectors: each kind of problem is found, clean data is not
flagged."""

from __future__ import annotations

import numpy as np
import pytest

from semroute.quality.lint import (
    ERROR,
    WARNING,
    LintSettings,
    exact_duplicates,
    leave_one_out_votes,
    lint,
    similar_pairs,
)


def _unit(*rows: list[float]) -> np.ndarray:
    v = np.asarray(rows, dtype=np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_exact_duplicates_warn_and_conflicts_error_with_file_line() -> None:
    """Same text same label -> duplicate warning; same text other label -> label-conflict error."""
    texts = ["Hello there", "hello   THERE", "hello there", "bye"]
    labels = ["greet", "greet", "bye", "bye"]
    sources = ["a.csv:2", "a.csv:3", "a.csv:4", "a.csv:5"]
    found = exact_duplicates(texts, labels, sources)
    assert [(f.severity, f.code, f.where) for f in found] == [
        (WARNING, "duplicate", "a.csv:3"),
        (ERROR, "label-conflict", "a.csv:4"),
    ]
    assert "a.csv:2" in found[1].message and "'greet'" in found[1].message


def test_similar_pairs_finds_only_pairs_above_threshold_across_blocks() -> None:
    """Pairs are found even when they fall in different blocks; each pair once, i < j."""
    v = _unit([1, 0, 0], [0, 1, 0], [0.99, 0.05, 0], [0, 0, 1])
    pairs = similar_pairs(v, 0.95, block=1)
    assert [(i, j) for i, j, _ in pairs] == [(0, 2)]
    assert pairs[0][2 - 0] > 0.95


def test_near_conflict_is_an_error_and_near_duplicate_a_warning() -> None:
    """Nearly the same vector under two labels is an error; under one label, a warning."""
    texts = ["reset my password", "reset my pasword", "password reset pls", "weather today",
             "rain tomorrow", "sunny?"]
    labels = ["account", "account", "billing", "weather", "weather", "weather"]
    sources = [f"x.csv:{i + 2}" for i in range(6)]
    v = _unit([1, 0, 0.001], [1, 0, 0.0], [1, 0.01, 0], [0, 1, 0], [0, 1, 0.3], [0, 1, -0.3])
    report = lint(texts, labels, sources, v, LintSettings(min_per_route=1))
    codes = {(f.code, f.where) for f in report.findings}
    assert ("near-duplicate", "x.csv:3") in codes
    assert ("near-conflict", "x.csv:4") in codes
    assert any(f.severity == ERROR for f in report.findings if f.code == "near-conflict")


def test_too_few_exemplars_is_an_error_naming_the_route() -> None:
    """A route below the minimum is an error pointing at its first row."""
    labels = ["a"] * 5 + ["b"] * 2
    sources = [f"r.csv:{i + 2}" for i in range(7)]
    report = lint([f"t{i}" for i in range(7)], labels, sources, None, LintSettings(min_per_route=5))
    [err] = report.errors
    assert err.code == "too-few" and err.where == "r.csv:7" and "'b' has 2" in err.message


def test_leave_one_out_excludes_the_row_itself() -> None:
    """A lone exemplar in the other cluster is voted back to the cluster it sits in, not itself."""
    v = _unit([1, 0], [1, 0.1], [1, -0.1], [0, 1], [0.1, 1])
    names, shares = leave_one_out_votes(v, ["a", "a", "b", "b", "b"], k=2, temperature=0.05)
    assert names == ["a", "b"]
    # row 2 (label b) sits among the a's: its two nearest others are both a
    assert shares[2].tolist() == pytest.approx([1.0, 0.0])
    assert np.allclose(shares.sum(axis=1), 1.0)


def test_mislabelled_exemplar_is_flagged_low_margin_and_route_loo_accuracy_reported() -> None:
    """One 'b' inside cluster 'a' gets a low-margin warning; clean data gets none."""
    rng = np.random.default_rng(0)
    a = rng.normal([5, 0, 0], 0.3, (8, 3))
    b = rng.normal([0, 5, 0], 0.3, (8, 3))
    v = _unit(*np.vstack([a, b]).tolist())
    labels = ["a"] * 8 + ["b"] * 8
    sources = [f"d.csv:{i + 2}" for i in range(16)]
    texts = [f"text {i}" for i in range(16)]
    s = LintSettings(k=3, near_duplicate=1.01, conflict=1.01)
    clean = lint(texts, labels, sources, v, s)
    assert clean.findings == []
    assert clean.loo_accuracy == {"a": 1.0, "b": 1.0}
    bad_labels = labels.copy()
    bad_labels[0] = "b"
    report = lint(texts, bad_labels, sources, v, s)
    low = [f for f in report.findings if f.code == "low-margin"]
    assert [f.where for f in low] == ["d.csv:2"]
    assert report.loo_accuracy["b"] < 1.0
    assert report.errors == []
