"""Test files for evaluation and calibration: `text,label` and `text,<target>...` CSVs.

Every bad row is reported as file:line in one ExemplarError.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

from semroute.errors import ExemplarError, RowProblem
from semroute.exemplars import read_csv

FloatArray = npt.NDArray[np.float64]


def _open_csv(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    table = read_csv(path)
    if not table.rows:
        raise ExemplarError([RowProblem(str(path), 2, "no test rows")])
    return table.header, table.rows


def read_labelled_csv(path: Path) -> tuple[list[str], list[str]]:
    """Test rows ``text,label`` (extra columns ignored). Raises ExemplarError naming every bad
    row as file:line."""
    header, rows = _open_csv(path)
    if "text" not in header or "label" not in header:
        raise ExemplarError(
            [RowProblem(str(path), 1, f"header must have `text` and `label`, got {header}")]
        )
    ti, li = header.index("text"), header.index("label")
    texts, labels, problems = [], [], []
    for line, row in rows:
        if len(row) != len(header):
            problems.append(RowProblem(str(path), line, f"{len(row)} fields, header has "
                                                         f"{len(header)}"))
            continue
        if not row[ti].strip() or not row[li].strip():
            problems.append(RowProblem(str(path), line, "empty text or label"))
            continue
        texts.append(row[ti])
        labels.append(row[li].strip())
    if problems:
        raise ExemplarError(problems)
    return texts, labels


def read_outcome_csv(
    path: Path, targets: Sequence[str] | None = None
) -> tuple[list[str], FloatArray, tuple[str, ...]]:
    """Test rows ``text,<target>,...`` with each target's true quality (0..1). Non-numeric
    columns other than ``text`` (e.g. ``subject``) are ignored only when ``targets`` names the
    columns to use. Every test row needs every target's score."""
    header, rows = _open_csv(path)
    if not header or header[0] != "text":
        raise ExemplarError([RowProblem(str(path), 1, f"first column must be `text`, got {header}")])
    names = tuple(targets) if targets else tuple(header[1:])
    missing = [t for t in names if t not in header]
    if missing:
        raise ExemplarError([RowProblem(str(path), 1, f"no column for target(s) {missing}")])
    cols = [header.index(t) for t in names]
    texts: list[str] = []
    scores: list[list[float]] = []
    problems: list[RowProblem] = []
    for line, row in rows:
        if len(row) != len(header):
            problems.append(RowProblem(str(path), line, f"{len(row)} fields, header has "
                                                         f"{len(header)}"))
            continue
        vals: list[float] = []
        for name, c in zip(names, cols, strict=True):
            try:
                v = float(row[c])
            except ValueError:
                problems.append(RowProblem(str(path), line, f"{name}: {row[c]!r} is not a score"))
                break
            if not 0.0 <= v <= 1.0:
                problems.append(RowProblem(str(path), line, f"{name}: {v} is outside 0..1"))
                break
            vals.append(v)
        else:
            texts.append(row[0])
            scores.append(vals)
    if problems:
        raise ExemplarError(problems)
    return texts, np.asarray(scores, dtype=np.float64), names
