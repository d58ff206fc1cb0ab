"""Exemplar CSV validation, semantic-router import and routes.yaml parsing."""

from __future__ import annotations

from pathlib import Path

import pytest

from semroute.errors import ConfigError, ExemplarError
from semroute.exemplars import load_route_table, read_exemplars, read_targets_csv
from semroute.types import ExemplarKind
from tests.conftest import write


def problems_of(*paths: Path) -> list[str]:
    with pytest.raises(ExemplarError) as info:
        read_exemplars(list(paths))
    return [str(p) for p in info.value.problems]


def test_labelled_csv_reads_rows_with_weights_and_sources(tmp_path: Path) -> None:
    """A valid labelled file yields exemplars with label, weight (default 1) and file:line."""
    f = write(tmp_path / "a.csv", "text,label,weight\nhello there,chat,\nsum 2 and 2,math,2.5\n")
    result = read_exemplars([f])
    assert result.kind is ExemplarKind.LABELLED
    assert [(e.text, e.label, e.weight) for e in result.exemplars] == [
        ("hello there", "chat", 1.0),
        ("sum 2 and 2", "math", 2.5),
    ]
    assert result.exemplars[1].source == f"{f}:3"


def test_every_bad_row_is_reported_with_its_line(tmp_path: Path) -> None:
    """All problems come back at once, each as file:line: reason; none is silently skipped."""
    f = write(
        tmp_path / "bad.csv",
        "text,label,weight\n"
        "ok row,chat,1\n"
        ",chat,1\n"  # 3: empty text
        "no label,,1\n"  # 4: empty label
        "spaced,two words,1\n"  # 5: whitespace in label
        "heavy,chat,abc\n"  # 6: weight not a number
        "negative,chat,-1\n"  # 7: weight <= 0
        "too,many,columns,here\n",  # 8: column count
    )
    found = problems_of(f)
    assert found == [
        f"{f}:3: empty text",
        f"{f}:4: empty label",
        f"{f}:5: label 'two words' contains whitespace or control characters",
        f"{f}:6: weight 'abc' is not a number",
        f"{f}:7: weight -1.0 must be a positive number",
        f"{f}:8: 4 columns, header has 3",
    ]


def test_line_numbers_count_physical_lines_of_multiline_records(tmp_path: Path) -> None:
    """A quoted text spanning lines shifts the reported line of later rows correctly."""
    f = write(tmp_path / "m.csv", 'text,label\n"first\nsecond\nthird",chat\n,chat\n')
    assert problems_of(f) == [f"{f}:5: empty text"]


def test_header_must_start_with_text(tmp_path: Path) -> None:
    """A file whose header is not text,... is refused at line 1 with the expected shapes."""
    f = write(tmp_path / "h.csv", "query,label\nhi,chat\n")
    (msg,) = problems_of(f)
    assert msg.startswith(f"{f}:1: header must start with `text`")


def test_not_utf8_names_the_line(tmp_path: Path) -> None:
    """Latin-1 bytes are reported with the line where they occur."""
    f = tmp_path / "latin.csv"
    f.write_bytes(b"text,label\nok,chat\ncaf\xe9,chat\n")
    (msg,) = problems_of(f)
    assert msg.startswith(f"{f}:3: not UTF-8")


def test_outcome_csv_scores_and_blank_unknowns(tmp_path: Path) -> None:
    """An outcomes header (text + target columns) yields per-target scores, blank -> None."""
    f = write(tmp_path / "o.csv", "text,a,b\nq1,0.5,\nq2,1,0\n")
    result = read_exemplars([f])
    assert result.kind is ExemplarKind.OUTCOMES
    assert result.targets == ("a", "b")
    assert dict(result.exemplars[0].scores) == {"a": 0.5, "b": None}


def test_outcome_rows_out_of_range_or_empty_are_errors(tmp_path: Path) -> None:
    """Scores must be numbers in 0..1 and a row needs at least one score."""
    f = write(tmp_path / "o.csv", "text,a,b\nq1,1.5,0\nq2,x,0\nq3,,\n")
    assert problems_of(f) == [
        f"{f}:2: column 'a': score 1.5 outside 0..1",
        f"{f}:3: column 'a': 'x' is not a number (expected 0..1 or blank)",
        f"{f}:4: no target has a score (all cells blank)",
    ]


def test_mixed_kinds_and_mismatched_targets_are_refused(tmp_path: Path) -> None:
    """Labelled and outcome files cannot be mixed; outcome files must share target columns."""
    lab = write(tmp_path / "l.csv", "text,label\nhi,chat\n")
    out1 = write(tmp_path / "o1.csv", "text,a,b\nq,1,0\n")
    out2 = write(tmp_path / "o2.csv", "text,a,c\nq2,1,0\n")
    assert "mixed exemplar kinds" in problems_of(lab, out1)[0]
    assert "target columns ['a', 'c'] differ" in problems_of(out1, out2)[0]


def test_duplicates_dropped_and_conflicts_warned(tmp_path: Path) -> None:
    """Exact duplicates are dropped; the same text with two labels is kept with a warning."""
    f = write(tmp_path / "d.csv", "text,label\nhi,chat\nhi,chat\nhi,greet\n")
    result = read_exemplars([f])
    assert result.dropped_duplicates == 1
    assert [e.label for e in result.exemplars] == ["chat", "greet"]
    assert any(f"{f}:4: same text as {f}:2" in w for w in result.warnings)


def test_semantic_router_configs_import_as_labelled(tmp_path: Path) -> None:
    """aurelio semantic-router route configs (JSON and YAML) become labelled exemplars."""
    j = write(
        tmp_path / "layer.json",
        '{"encoder_type": "huggingface", "routes": [{"name": "politics", "utterances": '
        '["who won the election", "tax policy debate"], "score_threshold": 0.8}]}',
    )
    y = write(
        tmp_path / "layer.yaml", "routes:\n  - name: chitchat\n    utterances: [hi, how are you]\n"
    )
    result = read_exemplars([j, y])
    assert sorted({e.label for e in result.exemplars}) == ["chitchat", "politics"]
    assert len(result.exemplars) == 4


def test_routes_yaml_builds_table(tmp_path: Path) -> None:
    """routes.yaml sets targets with prices/locality, route chains, thresholds and the default."""
    r = write(
        tmp_path / "routes.yaml",
        "version: 1\ndefault: general\nthreshold: 0.4\n"
        "targets:\n  small: {input_cost: 0.1, output_cost: 0.3, local: true}\n  big: {input_cost: 2}\n"
        "routes:\n  code: {targets: [big, small], threshold: 0.6}\n  general: {targets: [small]}\n",
    )
    table = load_route_table(r, ["code"])
    assert table.routes["code"].targets == ("big", "small")
    assert table.threshold_for("code") == 0.6
    assert table.threshold_for("general") == 0.4
    assert table.targets["small"].local and table.targets["small"].cost == pytest.approx(0.2)
    assert table.default_route == "general"


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("routes:\n  code: {targets: [nope]}\n", "routes.code.targets[0]: unknown target 'nope'"),
        ("targets: {a: {}}\nroutes:\n  code: {targets: [a]}\ndefault: x\n", "default: 'x' is not"),
        (
            "targets: {a: {}}\nroutes:\n  code: {targets: [a], threshold: 2}\n",
            "routes.code.threshold",
        ),
        (
            "targets: {a: {input_cost: -1}}\nroutes:\n  code: {targets: [a]}\n",
            "targets.a.input_cost",
        ),
        ("targets: {a: {}}\nroutes:\n  other: {targets: [a]}\n", "label(s) ['code'] have no route"),
        ("routes: [1, 2\n", "invalid YAML"),
    ],
)
def test_routes_yaml_errors_name_the_field(tmp_path: Path, body: str, expected: str) -> None:
    """Each kind of routes.yaml mistake is a ConfigError naming the file and the field."""
    r = write(tmp_path / "routes.yaml", body)
    with pytest.raises(ConfigError) as info:
        load_route_table(r, ["code"])
    assert str(r) in str(info.value)
    assert expected in str(info.value)


def test_without_routes_each_label_is_its_own_route_and_target() -> None:
    """No routes file: every label routes to a target of the same name, with no threshold."""
    table = load_route_table(None, ["a", "b"])
    assert table.routes["a"].targets == ("a",)
    assert table.threshold is None and table.default_route is None


def test_targets_csv_prices(tmp_path: Path) -> None:
    """A models.csv-shaped file gives prices; bad numbers name the line."""
    good = write(
        tmp_path / "m.csv",
        "model,input_usd_per_1m_tokens,output_usd_per_1m_tokens,size\nx,0.2,0.4,7B\n",
    )
    assert read_targets_csv(good)["x"].cost == pytest.approx(0.3)
    bad = write(
        tmp_path / "b.csv", "model,input_usd_per_1m_tokens,output_usd_per_1m_tokens\nx,a,1\n"
    )
    with pytest.raises(ConfigError, match=r"b\.csv:2: prices must be numbers"):
        read_targets_csv(bad)


def test_oos_label_is_out_of_scope_examples_not_a_route(tmp_path: Path) -> None:
    """Label `oos` makes no route or target; it needs a default route (the no-routes-file
    default, or `default:` in routes.yaml); a route named `oos` is refused as reserved."""
    table = load_route_table(None, ["code", "oos"], default_route="default")
    assert "oos" not in table.routes and "oos" not in table.targets
    assert table.default_route == "default"
    with pytest.raises(ConfigError, match=r"need a default route.*--default-route"):
        load_route_table(None, ["code", "oos"], default_route=None)
    no_default = write(tmp_path / "r1.yaml", "targets: {a: {}}\nroutes:\n  code: {targets: [a]}\n")
    with pytest.raises(ConfigError, match=r"r1\.yaml: exemplars labelled 'oos'"):
        load_route_table(no_default, ["code", "oos"])
    with_default = write(tmp_path / "r2.yaml", "default: code\ntargets: {a: {}}\n"
                         "routes:\n  code: {targets: [a]}\n")
    assert "oos" not in load_route_table(with_default, ["code", "oos"]).routes
    reserved = write(tmp_path / "r3.yaml", "targets: {a: {}}\nroutes:\n  oos: {targets: [a]}\n")
    with pytest.raises(ConfigError, match="'oos' is reserved"):
        load_route_table(reserved, ["oos"])
