"""Out-of-scope exemplars: rows labelled `oos` in the build or in calibrate's validation file
become examples the router falls back on (real encoder, Banking77 rows, no routes file)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from semroute.cli import main
from semroute.config import load_settings
from semroute.router import Router
from semroute.types import Query
from tests.conftest import SHARED_DATA

IN_SCOPE = ("card_arrival", "exchange_rate", "lost_or_stolen_card", "top_up_failed", "age_limit")
# Out-of-scope topics next to in-scope ones (a distance score alone lets many through): the
# examples stand for them in validation, their test rows must then fall back.
OUT_OF_SCOPE = ("card_delivery_estimate", "exchange_charge", "pending_top_up", "compromised_card")


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label"])
        w.writerows(rows)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[tuple[str, str]]]:
    if not SHARED_DATA.exists():
        pytest.skip(f"shared datasets not found at {SHARED_DATA}")
    train = _rows(SHARED_DATA / "banking77" / "train.csv")
    test = _rows(SHARED_DATA / "banking77" / "test.csv")
    ins = [(r["text"], r["label"]) for r in train if r["label"] in IN_SCOPE]
    outs = [(r["text"], "oos") for r in train if r["label"] in OUT_OF_SCOPE]
    return {
        "exemplars": ins[::3],
        "val": ins[1::6] + outs[::4],
        "test_oos": [(r["text"], "oos") for r in test if r["label"] in OUT_OF_SCOPE],
        "test_in": [(r["text"], r["label"]) for r in test if r["label"] in IN_SCOPE],
    }


def _router(index: Path, encoder_dir: Path) -> Router:
    return Router.load(index, load_settings(None), encoder_path=encoder_dir)


def _fallback_share(router: Router, rows: list[tuple[str, str]]) -> float:
    decisions = router.route_batch([Query(t) for t, _ in rows])
    return sum(d.fallback for d in decisions) / len(decisions)


def test_calibrate_adds_validation_oos_rows_as_examples_and_their_topics_fall_back(
    data: dict[str, list[tuple[str, str]]], tmp_path: Path, encoder_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """No routes file: `calibrate --in-scope-coverage` puts the validation rows labelled `oos`
    into a new index version; the same topics' test queries then fall back, most in-scope
    ones are still answered, and `--no-add-out-of-scope` (the comparison) catches fewer."""
    results: dict[bool, tuple[float, float]] = {}
    for add in (False, True):
        root = tmp_path / f"idx-{add}"
        ex = _csv(tmp_path / "ex.csv", data["exemplars"])
        val = _csv(tmp_path / "val.csv", data["val"])
        assert main(["index", "build", "--exemplars", str(ex), "--encoder", str(encoder_dir),
                     "--out", str(root), "--quiet"]) == 0
        before = (root / "current").resolve()
        args = ["calibrate", "--index", str(root), "--val", str(val), "--encoder",
                str(encoder_dir), "--in-scope-coverage", "0.95"]
        assert main(args if add else [*args, "--no-add-out-of-scope"]) == 0
        printed = capsys.readouterr().out
        after = (root / "current").resolve()
        manifest = json.loads((after / "manifest.json").read_text())
        n_examples = sum(1 for _, lab in data["val"] if lab == "oos")
        if add:
            assert after != before
            assert manifest["counts"]["per_label"].get("oos") == n_examples
            assert f"added {n_examples} out-of-scope exemplars" in printed
            assert "oos" not in manifest["route_table"]["routes"]
        else:
            assert after == before and "oos" not in manifest["counts"]["per_label"]
        assert 0.0 <= manifest["thresholds"]["global"] <= 1.0
        router = _router(root, encoder_dir)
        results[add] = (_fallback_share(router, data["test_oos"]),
                        _fallback_share(router, data["test_in"]))
        if add:
            d = router.route(next(t for t, lab in data["val"] if lab == "oos"))
            assert d.fallback and d.route == "default"
            assert "out-of-scope examples" in d.reason
    (oos_zero, in_zero), (oos_ex, in_ex) = results[False], results[True]
    assert oos_ex >= 0.75, results
    assert oos_ex > oos_zero + 0.2, results
    assert in_ex <= 0.15 and in_ex <= in_zero + 0.05, results


def test_build_takes_oos_rows_and_needs_a_default_route(
    data: dict[str, list[tuple[str, str]]], tmp_path: Path, encoder_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Rows labelled `oos` in the build's own CSV are examples too, never a route; with a
    routes file that names no default route the build refuses them, saying why."""
    outs = [r for r in data["val"] if r[1] == "oos"]
    ex = _csv(tmp_path / "ex.csv", data["exemplars"] + outs)
    root = tmp_path / "idx"
    assert main(["index", "build", "--exemplars", str(ex), "--encoder", str(encoder_dir),
                 "--out", str(root), "--quiet"]) == 0
    manifest = json.loads((root / "current" / "manifest.json").read_text())
    assert "oos" not in manifest["route_table"]["routes"]
    router = _router(root, encoder_dir)
    d = router.route(outs[0][0])
    assert d.fallback and d.route == "default" and "out-of-scope examples" in d.reason
    kept = router.route("how old do I have to be to open an account with you?")
    assert kept.route == "age_limit" and not kept.fallback
    routes = tmp_path / "routes.yaml"
    routes.write_text("version: 1\ntargets:\n  m: {}\nroutes:\n"
                      + "".join(f"  {lab}: {{targets: [m]}}\n" for lab in IN_SCOPE))
    capsys.readouterr()
    assert main(["index", "build", "--exemplars", str(ex), "--routes", str(routes),
                 "--encoder", str(encoder_dir), "--out", str(tmp_path / "bad"), "--quiet"]) != 0
    err = capsys.readouterr().err
    assert "out-of-scope examples" in err and "default" in err
