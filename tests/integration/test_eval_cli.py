"""`semroute eval labels|outcomes`, `calibrate` and `index lint` on small real data (a few hundred
Banking77 and LLMRouter rows) with the real encoder."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from semroute.cli import main
from tests.conftest import SHARED_DATA, write

LABELS = ("card_arrival", "exchange_rate", "lost_or_stolen_card", "top_up_failed", "age_limit")


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


@pytest.fixture(scope="module")
def banking(tmp_path_factory: pytest.TempPathFactory, encoder_dir: Path) -> Iterator[dict[str, Path]]:
    """A 5-route Banking77 index with a `general` default route, plus val/test CSVs where other
    Banking77 intents stand in as out-of-scope queries."""
    if not SHARED_DATA.exists():
        pytest.skip(f"shared datasets not found at {SHARED_DATA}")
    tmp = tmp_path_factory.mktemp("banking")
    train = [r for r in _rows(SHARED_DATA / "banking77" / "train.csv") if r["label"] in LABELS]
    test = _rows(SHARED_DATA / "banking77" / "test.csv")
    ins = [r for r in test if r["label"] in LABELS]
    oos = [r for r in test if r["label"] not in LABELS][::60]
    exemplars = _write_csv(tmp / "train.csv", ["text", "label"],
                           [[r["text"], r["label"]] for r in train[::2]])
    val = _write_csv(tmp / "val.csv", ["text", "label"],
                     [[r["text"], r["label"]] for r in ins[::2]]
                     + [[r["text"], "oos"] for r in oos[::2]])
    test_csv = _write_csv(tmp / "test.csv", ["text", "label"],
                          [[r["text"], r["label"]] for r in ins[1::2]]
                          + [[r["text"], "oos"] for r in oos[1::2]])
    routes = "\n".join(
        ["version: 1", "default: general", "targets:", "  local: {input_cost: 0, output_cost: 0}",
         "routes:"]
        + [f"  {lab}: {{targets: [local]}}" for lab in (*LABELS, "general")]
    )
    routes_file = write(tmp / "routes.yaml", routes + "\n")
    assert main(["index", "build", "--exemplars", str(exemplars), "--routes", str(routes_file),
                 "--encoder", str(encoder_dir), "--out", str(tmp / "idx"), "--quiet"]) == 0
    yield {"index": tmp / "idx", "val": val, "test": test_csv, "tmp": tmp}


def test_eval_labels_writes_report_plots_and_table(
    banking: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """The report has the issue's keys with sane values, three PNGs are written, a table printed;
    with no threshold yet nothing is abstained on, but AUROC already separates OOS rows."""
    out = banking["tmp"] / "eval0"
    assert main(["eval", "labels", "--index", str(banking["index"]), "--test",
                 str(banking["test"]), "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    for key in ("accuracy", "macro_f1", "per_route", "coverage", "ece",
                "oos_recall", "oos_precision", "oos_auroc"):
        assert key in report, key
    assert report["accuracy"] > 0.85
    assert report["n_oos"] > 0
    assert report["coverage"] == 1.0 and report["oos_recall"] == 0.0
    assert report["oos_auroc"] > 0.7
    assert set(report["per_route"]) >= set(LABELS)
    assert 0 <= report["ece"] < 0.3
    for name in ("confusion.png", "coverage.png", "reliability.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "accuracy" in printed and "OOS AUROC" in printed


def test_calibrate_for_precision_makes_the_router_abstain_on_oos(
    banking: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """Calibrating on the validation half writes a threshold into the manifest; evaluating the
    test half afterwards shows abstentions, most of them on out-of-scope queries."""
    assert main(["calibrate", "--index", str(banking["index"]), "--val", str(banking["val"]),
                 "--precision", "0.97"]) == 0
    manifest = json.loads((banking["index"] / "current" / "manifest.json").read_text())
    threshold = manifest["thresholds"]["global"]
    assert 0 < threshold < 1
    assert "(global)" in capsys.readouterr().out
    out = banking["tmp"] / "eval1"
    assert main(["eval", "labels", "--index", str(banking["index"]), "--test",
                 str(banking["test"]), "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["oos_recall"] > 0.3
    assert report["oos_precision"] > 0.3
    assert report["coverage"] < 1.0


def test_calibrate_refuses_an_unreachable_precision(banking: dict[str, Path],
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """Asking for both goals is a usage error; an impossible precision is a clear error."""
    with pytest.raises(SystemExit):
        main(["calibrate", "--index", str(banking["index"]), "--val", str(banking["val"]),
              "--precision", "0.9", "--coverage", "0.5"])
    bad = write(banking["tmp"] / "bad_val.csv",
                "text,label\nhow old must I be,card_arrival\nwhere is my card,age_limit\n")
    assert main(["calibrate", "--index", str(banking["index"]), "--val", str(bad),
                 "--precision", "1.0"]) == 2
    assert "no threshold reaches precision" in capsys.readouterr().err


def test_eval_outcomes_on_llmrouter_rows(
    tmp_path: Path, encoder_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A small LLMRouter outcome index: the report has AIQ, best single, max quality and the
    cost ratio; the curve lies between the cheapest target and the oracle."""
    if not SHARED_DATA.exists():
        pytest.skip(f"shared datasets not found at {SHARED_DATA}")
    data = SHARED_DATA / "llmrouter"
    with (data / "train.csv").open(newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    header, body = rows[0], rows[1:]
    train = _write_csv(tmp_path / "train.csv", header, body[::20])
    with (data / "test.csv").open(newline="", encoding="utf-8") as fh:
        test_rows = list(csv.reader(fh))
    test = _write_csv(tmp_path / "test.csv", test_rows[0], test_rows[1:121])
    assert main(["index", "build", "--exemplars", str(train), "--targets",
                 str(data / "models.csv"), "--encoder", str(encoder_dir),
                 "--out", str(tmp_path / "idx"), "--quiet"]) == 0
    out = tmp_path / "eval"
    assert main(["eval", "outcomes", "--index", str(tmp_path / "idx"), "--test", str(test),
                 "--targets", str(data / "models.csv"), "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    for key in ("aiq", "best_single", "router_max_quality", "cost_ratio_at_best_single_quality"):
        assert key in report, key
    assert set(report["best_single"]) == {"target", "quality", "cost"}
    cheapest = min(report["targets"], key=lambda t: t["cost"])
    assert cheapest["quality"] - 0.05 <= report["router_max_quality"] <= report["oracle"]["quality"]
    assert 0 < report["aiq"] < 1
    assert (out / "cost_quality.png").exists()
    assert "AIQ" in capsys.readouterr().out


def test_index_lint_fails_on_conflicts_and_passes_clean_data(
    tmp_path: Path, encoder_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Label conflicts and a thin route fail the lint with file:line; clean data exits 0."""
    bad = write(tmp_path / "bad.csv", "text,label\n" + "".join(
        f"{t},{lab}\n" for t, lab in [
            ("where is my new card", "cards"), ("my card has not arrived yet", "cards"),
            ("when will my card come", "cards"), ("card still not delivered", "cards"),
            ("how long does card delivery take", "cards"),
            ("Where is my new card", "cards"),
            ("where is my new card", "refunds"),
            ("I want my money back", "refunds"),
        ]
    ))
    code = main(["index", "lint", "--exemplars", str(bad), "--encoder", str(encoder_dir)])
    printed = capsys.readouterr().out
    assert code == 1
    assert f"{bad}:7: warning: [duplicate]" in printed
    assert f"{bad}:8: error: [label-conflict]" in printed
    assert "[too-few]" in printed and "'refunds' has 2" in printed
    clean = write(tmp_path / "clean.csv", "text,label\n" + "".join(
        [f"card question number {i} about delivery,cards\n" for i in range(5)]
        + [f"refund request {i} for a payment,refunds\n" for i in range(5)]
    ))
    code = main(["index", "lint", "--exemplars", str(clean), "--encoder", str(encoder_dir),
                 "--near-duplicate", "0.999", "--conflict", "0.999"])
    assert code == 0, capsys.readouterr().out
