"""Leave-one-out threshold sweep over an index's own exemplars (how the starter threshold was set).

    .venv/bin/python scripts/sweep_threshold.py [--index DIR] [--off-topic FILE] [--no-write]

Each exemplar is routed against all the others (its own row removed from the neighbours) with
the router's decision rule and settings, and scored with the confidence the router serves: the
index's abstention score when the build fitted one (``semroute.abstain``), else the vote share.
An off-topic probe file (one query per line, none of which belongs to any route) shows how often
a threshold abstains to the default route. Prints a table and writes docs/ROUTES.md.

Leave-one-out is slightly pessimistic for the abstention score: the neighbours' own densities
stored in the index still count the removed row.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from semroute.abstain import neighbour_features
from semroute.config import DEFAULT_INDEX_DIR
from semroute.decision import DecisionParams, vote_shares, winning_label
from semroute.index import ExemplarIndex
from semroute.router import Router

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "ROUTES.md"
THRESHOLDS = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def confidence(
    sims: np.ndarray, ids: np.ndarray, index: ExemplarIndex, p: DecisionParams
) -> tuple[str, float]:
    """The winning route and the confidence the router would serve for these neighbours."""
    names = [str(x) for x in index.labels[ids]]
    shares = vote_shares(sims, names, index.weights[ids], p)
    route = winning_label(shares, sims, names)
    if p.abstain is not None and index.density is not None:
        return route, p.abstain.score(neighbour_features(sims, shares, route, index.density[ids]))
    return route, shares[route]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", type=Path, default=ROOT / DEFAULT_INDEX_DIR)
    parser.add_argument(
        "--off-topic", type=Path, default=ROOT / "index_data" / "off_topic_probe.txt"
    )
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    router = Router.load(args.index)
    index, d = router.index, router.decision_settings
    params = DecisionParams(temperature=d.temperature, null_similarity=d.null_similarity,
                            abstain=index.manifest.abstain, k=d.k)
    score = "abstention score" if params.abstain is not None else "vote share"
    shipped = index.route_table.threshold
    vectors = router.encoder.encode(index.texts)
    sims, ids = index.search(vectors, d.k + 1)
    loo = []
    for row in range(index.size):
        keep = ids[row] != row
        route, conf = confidence(
            sims[row][keep][: d.k], ids[row][keep][: d.k], index, params
        )
        loo.append((route == index.labels[row], conf))
    probes = [q for q in args.off_topic.read_text().splitlines() if q.strip()]
    psims, pids = index.search(router.encoder.encode(probes), d.k)
    probe_conf = [
        confidence(psims[i], pids[i], index, params)[1] for i in range(len(probes))
    ]

    lines = [
        "| threshold | exemplars routed to their own route | routed to a wrong route "
        "| off-topic probes abstained |",
        "|---|---|---|---|",
    ]
    for t in THRESHOLDS:
        right = np.mean([ok and c >= t for ok, c in loo])
        wrong = np.mean([(not ok) and c >= t for ok, c in loo])
        abstained = np.mean([c < t for c in probe_conf])
        lines.append(f"| {t:.2f} | {right:.3f} | {wrong:.3f} | {abstained:.2f} |")
    table = "\n".join(lines)
    print(table)
    body = (
        "# The starter routes\n\n"
        "`index_data/exemplars.csv` (routes code, math, creative, summarize, chitchat, sensitive)\n"
        "with `index_data/routes.yaml`; `general` is the default route for low confidence.\n\n"
        "## Threshold\n\n"
        "Command: `.venv/bin/python scripts/sweep_threshold.py` (written by it). Leave-one-out over\n"
        f"the {index.size} exemplars with the router's rule (k={d.k}, T={d.temperature}, null\n"
        f"similarity {d.null_similarity}), confidence = the {score}; off-topic probes:\n"
        f"`{args.off_topic.relative_to(ROOT)}` ({len(probes)} questions no route covers). "
        f"Index version {index.version}.\n\n"
        + table
        + f"\n\nThe shipped global threshold (index_data/routes.yaml) is {shipped}. Raising it\n"
        "trades in-scope routing for abstention; `semroute calibrate` picks one for a target\n"
        "precision or in-scope coverage when you have a labelled validation set.\n"
    )
    if not args.no_write:
        DOC.write_text(body)
        print(f"wrote {DOC.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
