"""The starter routes decide their probe queries (index_data/probes.csv, which holds every query
the starter-index tests, the demo and the e2e suite assert a route for) by a clear margin, with
the served int8 encoder and with the fp32 reference: a decision that clear does not flip between
CPUs whose int8 kernels round differently (issue 17: AVX-512/VNNI vs AVX2-only)."""

from __future__ import annotations

from pathlib import Path

import pytest

from semroute.config import Settings
from semroute.decision import DecisionParams
from semroute.encoder import OnnxEncoder, embed_many
from semroute.exemplars import read_exemplars
from semroute.quality.lint import LintSettings, lint_files
from semroute.quality.probes import probe_margins, read_probes

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
EXEMPLARS = REPO / "index_data" / "exemplars.csv"
PROBES = REPO / "index_data" / "probes.csv"
BOUND = LintSettings().probe_margin


@pytest.mark.parametrize("which", ["int8", "fp32"])
def test_every_probe_wins_by_the_lint_bound(
    which: str, encoder_dir: Path, fp32_encoder_dir: Path
) -> None:
    """`index lint --probes` finds no probe under the default bound, for either encoder."""
    encoder = encoder_dir if which == "int8" else fp32_encoder_dir
    report = lint_files([EXEMPLARS], encoder_path=encoder, probes=PROBES)
    found = [str(f) for f in report.findings if f.code == "probe-margin"]
    assert found == []


def test_probes_cover_every_route_and_margins_agree_across_encoders(
    encoder_dir: Path, fp32_encoder_dir: Path
) -> None:
    """Each starter route has probes, and int8 and fp32 agree on each probe's winner with vote
    margins within 0.15 of each other (the int8 error a decision must absorb)."""
    probes = read_probes(PROBES)
    exemplars = read_exemplars([EXEMPLARS]).exemplars
    routes = {e.label for e in exemplars}
    assert {p.label for p in probes} == routes
    decision = Settings().decision
    params = DecisionParams(
        temperature=decision.temperature, null_similarity=decision.null_similarity
    )
    results = []
    for path in (encoder_dir, fp32_encoder_dir):
        encoder = OnnxEncoder.load(path)
        results.append(
            probe_margins(
                probes,
                encoder.encode([p.text for p in probes]),
                embed_many(encoder, [e.text for e in exemplars]),
                [e.label for e in exemplars],
                k=decision.k,
                params=params,
            )
        )
    for int8, fp32 in zip(*results, strict=True):
        assert int8.winner == fp32.winner == int8.probe.label, int8.probe.source
        assert abs(int8.vote_margin - fp32.vote_margin) < 0.15, int8.probe.source
