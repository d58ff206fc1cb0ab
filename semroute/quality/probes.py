"""Probe queries and their decision margins: how far each one is from a tie.

A probe is a query with the route it must get (``text,label`` CSV, e.g. index_data/probes.csv).
Its margins, over the exemplars' embeddings:

* ``vote margin``  the expected route's vote share minus the best other route's share (the
                   kNN softmax vote of ``semroute.decision``, null pseudo-neighbour included);
                   negative when another route wins;
* ``similarity gap`` the best similarity to an exemplar of the expected route minus the best
                   similarity to an exemplar of any other route.

Why margins: the int8 encoder's kernels differ between CPUs (VNNI/AMX vs AVX2-only paths round
differently), so a query whose decision hangs on a few hundredths of a vote can flip between
machines. A probe with a comfortable margin gives the same decision on every CPU.

Pure numpy over L2-normalised vectors (exact inner product, like the Flat index the starter
build uses), so it is testable without the encoder.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from semroute.decision import DecisionParams, vote_shares, winning_label
from semroute.errors import ExemplarError, RowProblem
from semroute.exemplars import read_csv


@dataclass(frozen=True)
class Probe:
    text: str
    label: str
    source: str  # file:line


@dataclass(frozen=True)
class ProbeMargin:
    """One probe's decision and how far it is from flipping."""

    probe: Probe
    winner: str  # the route with the largest vote share
    share: float  # the expected route's vote share
    vote_margin: float  # expected share minus the best other route's share
    similarity_gap: float  # best expected-route similarity minus best other-route similarity
    runner_up: str  # the strongest other route

    @property
    def correct(self) -> bool:
        return self.winner == self.probe.label


def read_probes(path: Path) -> list[Probe]:
    """Probes from a ``text,label`` CSV. Raises ExemplarError listing, as file:line, every row
    without text or label (or the header, if it lacks those columns)."""
    probes: list[Probe] = []
    problems: list[RowProblem] = []
    table = read_csv(path)
    if not {"text", "label"} <= set(table.header):
        raise ExemplarError(
            [RowProblem(str(path), 1, "expected a header with columns text,label")]
        )
    for line, cells in table.rows:
        row = dict(zip(table.header, cells, strict=False))
        text, label = (row.get("text") or "").strip(), (row.get("label") or "").strip()
        if not text or not label:
            problems.append(RowProblem(str(path), line, "a probe needs both text and label"))
        else:
            probes.append(Probe(text, label, f"{path}:{line}"))
    if problems:
        raise ExemplarError(problems)
    return probes


def probe_margins(
    probes: Sequence[Probe],
    probe_vectors: npt.NDArray[np.float32],
    exemplar_vectors: npt.NDArray[np.float32],
    exemplar_labels: Sequence[str],
    exemplar_weights: npt.NDArray[np.float32] | None = None,
    *,
    k: int = 10,
    params: DecisionParams | None = None,
) -> list[ProbeMargin]:
    """Each probe's margins against the exemplars (see the module docstring), in input order.

    A probe whose label no exemplar has gets share 0 and a similarity gap of -1 minus the best
    similarity, so it is always below any bound."""
    params = params or DecisionParams()
    labels = np.asarray(list(exemplar_labels))
    weights = (
        np.ones(len(labels), dtype=np.float32)
        if exemplar_weights is None
        else np.asarray(exemplar_weights, dtype=np.float32)
    )
    sims_all = np.asarray(probe_vectors, dtype=np.float32) @ np.asarray(
        exemplar_vectors, dtype=np.float32
    ).T
    kk = min(k, len(labels))
    out: list[ProbeMargin] = []
    for probe, sims in zip(probes, sims_all, strict=True):
        top = np.argsort(-sims, kind="stable")[:kk]
        top_sims = sims[top]
        top_labels = [str(x) for x in labels[top]]
        shares = vote_shares(top_sims, top_labels, weights[top], params)
        winner = winning_label(shares, top_sims, top_labels)
        others = {r: s for r, s in shares.items() if r != probe.label}
        runner_up = max(others, key=lambda r: (others[r], r)) if others else ""
        share = shares.get(probe.label, 0.0)
        own = labels == probe.label
        best_own = float(sims[own].max()) if own.any() else -1.0
        best_other = float(sims[~own].max()) if (~own).any() else -1.0
        out.append(
            ProbeMargin(
                probe=probe,
                winner=winner,
                share=share,
                vote_margin=share - (others[runner_up] if runner_up else 0.0),
                similarity_gap=best_own - best_other,
                runner_up=runner_up,
            )
        )
    return out
