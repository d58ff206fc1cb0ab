"""Probe margins and the `index lint --probes` check, on hand-made vectors: a probe that wins
clearly passes, one near a tie or routed elsewhere is an error naming its file:line."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from semroute.cli import main as cli_main
from semroute.config import Settings
from semroute.decision import DecisionParams
from semroute.errors import ExemplarError
from semroute.quality.lint import ERROR, LintSettings, probe_findings
from semroute.quality.probes import Probe, probe_margins, read_probes
from semroute.types import Exemplar

# Two routes in 3-D: "a" around x, "b" around y; z is the direction of nothing.
EXEMPLARS = {
    "a1": ([1.0, 0.05, 0.0], "a"),
    "a2": ([1.0, -0.05, 0.0], "a"),
    "a3": ([1.0, 0.0, 0.05], "a"),
    "b1": ([0.05, 1.0, 0.0], "b"),
    "b2": ([-0.05, 1.0, 0.0], "b"),
    "b3": ([0.0, 1.0, 0.05], "b"),
}
PROBE_VECTORS = {
    "clearly a": [1.0, 0.1, 0.0],
    "between": [1.0, 0.97, 0.0],  # a hair closer to a than to b
    "really b": [0.1, 1.0, 0.0],
}


def _unit(rows: Sequence[Sequence[float]]) -> np.ndarray:
    v = np.asarray(rows, dtype=np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _exemplar_arrays() -> tuple[np.ndarray, list[str]]:
    return _unit([v for v, _ in EXEMPLARS.values()]), [lab for _, lab in EXEMPLARS.values()]


class DictEncoder:
    """Texts to fixed vectors (an Encoder without a model)."""

    dimension = 3
    fingerprint = "sha256:dict"
    max_tokens = 256

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        return _unit([PROBE_VECTORS[t] for t in texts])


def test_margins_separate_clear_wins_near_ties_and_wrong_routes() -> None:
    """A probe among its route's exemplars leads by nearly the whole vote with a positive
    similarity gap; one midway leads by little; one among the other route's exemplars has a
    negative margin and names the winner."""
    vectors, labels = _exemplar_arrays()
    probes = [Probe("clearly a", "a", "p:2"), Probe("between", "a", "p:3"),
              Probe("really b", "a", "p:4")]
    got = probe_margins(
        probes, DictEncoder().encode([p.text for p in probes]), vectors, labels, k=4,
        params=DecisionParams(temperature=0.05, null_similarity=None),
    )
    clear, between, wrong = got
    assert clear.correct and clear.vote_margin > 0.9 and clear.similarity_gap > 0.1
    assert between.correct and 0 < between.vote_margin < 0.3
    assert 0 < between.similarity_gap < 0.05
    assert not wrong.correct and wrong.winner == "b" and wrong.runner_up == "b"
    assert wrong.vote_margin < -0.9 and wrong.similarity_gap < 0


def test_unknown_label_is_always_below_the_bound() -> None:
    """A probe for a route no exemplar has gets share 0 and a negative margin."""
    vectors, labels = _exemplar_arrays()
    (m,) = probe_margins(
        [Probe("clearly a", "nope", "p:2")], DictEncoder().encode(["clearly a"]), vectors, labels
    )
    assert m.share == 0.0 and m.vote_margin < 0 and m.similarity_gap < 0


def test_lint_reports_only_probes_below_the_bound(tmp_path: Path) -> None:
    """probe_findings flags the near tie and the wrong route (errors, file:line, both margins
    and the bound in the message) and passes the clear one."""
    probes = tmp_path / "probes.csv"
    probes.write_text("text,label\nclearly a,a\nbetween,a\nreally b,a\n")
    vectors, _ = _exemplar_arrays()
    exemplars = [Exemplar(text=name, label=lab) for name, (_, lab) in EXEMPLARS.items()]
    found = probe_findings(
        probes, DictEncoder(), vectors, exemplars, Settings().decision,
        LintSettings(probe_margin=0.3),
    )
    assert [(f.severity, f.code, f.where) for f in found] == [
        (ERROR, "probe-margin", f"{probes}:3"),
        (ERROR, "probe-margin", f"{probes}:4"),
    ]
    assert "wins over 'b'" in found[0].message and "(bound 0.30)" in found[0].message
    assert "routes to 'b'" in found[1].message and "similarity gap -" in found[1].message


def test_similarity_gap_bound_flags_a_probe_the_vote_alone_passes(tmp_path: Path) -> None:
    """With a gap bound above the near tie's similarity gap it is flagged even with no vote
    margin bound."""
    probes = tmp_path / "probes.csv"
    probes.write_text("text,label\nclearly a,a\nbetween,a\n")
    vectors, _ = _exemplar_arrays()
    exemplars = [Exemplar(text=name, label=lab) for name, (_, lab) in EXEMPLARS.items()]
    found = probe_findings(
        probes, DictEncoder(), vectors, exemplars, Settings().decision,
        LintSettings(probe_margin=-1.0, probe_gap=0.1),
    )
    assert [f.where for f in found] == [f"{probes}:3"]


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("query,route\nhi,a\n", r"probes\.csv:1: expected a header with columns text,label"),
        ("text,label\nhi,a\n,b\n", r"probes\.csv:3: a probe needs both text and label"),
        ("text,label\nhi,\n", r"probes\.csv:2: a probe needs both text and label"),
    ],
)
def test_bad_probe_files_name_file_and_line(tmp_path: Path, content: str, match: str) -> None:
    """A probe file without the header or with an empty field is refused at file:line."""
    path = tmp_path / "probes.csv"
    path.write_text(content)
    with pytest.raises(ExemplarError, match=match):
        read_probes(path)


def test_probes_file_reads_in_order_with_sources(tmp_path: Path) -> None:
    """Rows come back in file order, text and label stripped, each with its file:line."""
    path = tmp_path / "probes.csv"
    path.write_text('text,label\n" Solve 2x = 10 ",math\n"hi, you",chitchat\n')
    assert read_probes(path) == [
        Probe("Solve 2x = 10", "math", f"{path}:2"),
        Probe("hi, you", "chitchat", f"{path}:3"),
    ]


def test_cli_refuses_probes_without_embeddings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`index lint --no-embed --probes F` exits 2 and says why (probes need the encoder)."""
    exemplars = tmp_path / "ex.csv"
    exemplars.write_text("text,label\nhello,a\n")
    probes = tmp_path / "probes.csv"
    probes.write_text("text,label\nhello,a\n")
    code = cli_main(["index", "lint", "--exemplars", str(exemplars), "--no-embed",
                     "--probes", str(probes)])
    assert code == 2
    assert "--probes needs embeddings" in capsys.readouterr().err
