"""`semroute encoder tune`: a small real tuning run (torch, the stock encoder) on Banking77 rows.

One run is shared by the module (about a minute on two cores); a second run with the same seed
checks determinism end to end (the exported int8 encoder's fingerprint).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from semroute.encoder import OnnxEncoder
from semroute.encoder_tune import FP32_SUBDIR, MODEL_SUBDIR, TuneOptions, tune_encoder
from semroute.errors import EncoderError, FingerprintMismatch
from semroute.index import ExemplarIndex, build_index
from tests.conftest import SHARED_DATA, run_cli

# Ten intents that the stock encoder confuses with each other (card and transfer problems), so
# tuning has something to separate.
LABELS = (
    "card_arrival", "card_delivery_estimate", "lost_or_stolen_card", "card_not_working",
    "declined_card_payment", "transfer_not_received_by_recipient", "pending_transfer",
    "failed_transfer", "cancel_transfer", "transfer_timing",
)
PER_LABEL = 36
OPTIONS = TuneOptions(epochs=1, seed=7, batch_size=32)


def _subset(path: Path) -> Path:
    """PER_LABEL rows of each of LABELS from Banking77 train, in file order."""
    if not SHARED_DATA.exists():
        pytest.skip(f"shared datasets not found at {SHARED_DATA}")
    taken: dict[str, int] = {}
    rows = []
    with (SHARED_DATA / "banking77" / "train.csv").open(newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            if row["label"] in LABELS and taken.get(row["label"], 0) < PER_LABEL:
                taken[row["label"]] = taken.get(row["label"], 0) + 1
                rows.append(row)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def exemplars(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _subset(tmp_path_factory.mktemp("tune-data") / "subset.csv")


@pytest.fixture(scope="module")
def tuned(tmp_path_factory: pytest.TempPathFactory, exemplars: Path) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("tuned") / "encoder"
    result = tune_encoder([exemplars], out, options=OPTIONS, keep_anyway=True)
    return out, result


def test_tuned_encoder_is_an_export_with_a_manifest(tuned, exemplars: Path) -> None:  # type: ignore[no-untyped-def]
    """OUT is an int8 export (model.onnx, tokenizer.json), OUT/fp32 the fp32 reference, OUT/model
    the sentence-transformers folder; both manifests record base, exemplar checksums, seed, loss,
    epochs and the held-out figures."""
    out, result = tuned
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["int8"] is True
    assert (out / "model.onnx").exists() and (out / "tokenizer.json").exists()
    assert json.loads((out / FP32_SUBDIR / "manifest.json").read_text())["int8"] is False
    assert (out / MODEL_SUBDIR / "modules.json").exists()
    record = manifest["tuned"]
    assert record["seed"] == 7 and record["epochs"] == 1 and record["loss"] == OPTIONS.loss
    assert record["base"].endswith("model")
    assert next(iter(record["exemplars"].values())).startswith("sha256:")
    assert record["rows_held_out"] >= len(LABELS)
    assert record["before"] == result.before and record["after"] == result.after
    assert manifest["fingerprint"] != json.loads(
        (out / FP32_SUBDIR / "manifest.json").read_text())["fingerprint"]


def test_held_out_accuracy_does_not_fall(tuned) -> None:  # type: ignore[no-untyped-def]
    """On its own stratified held-out rows the tuned encoder routes at least as well."""
    _, result = tuned
    assert result.rows_held_out >= len(LABELS)
    assert result.after >= result.before, (result.before, result.after)


def test_same_seed_same_fingerprint(tuned, exemplars: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A second run with the same seed and input exports the very same encoder."""
    out, _ = tuned
    again = tmp_path / "again"
    tune_encoder([exemplars], again, options=OPTIONS, keep_anyway=True)
    first = json.loads((out / "manifest.json").read_text())["fingerprint"]
    second = json.loads((again / "manifest.json").read_text())["fingerprint"]
    assert first == second


def test_index_is_bound_to_the_tuned_encoder(tuned, exemplars: Path, encoder_dir: Path,  # type: ignore[no-untyped-def]
                                             tmp_path: Path) -> None:
    """An index built with the tuned encoder loads with it and routes; an index built with the
    stock encoder refuses the tuned one, naming both fingerprints."""
    out, _ = tuned
    tuned_encoder = OnnxEncoder.load(out)
    version = build_index([exemplars], tmp_path / "tuned-index", tuned_encoder, tune=False,
                          progress=False)
    index = ExemplarIndex.load(version, expect_fingerprint=tuned_encoder.fingerprint)
    assert index.encoder_fingerprint == tuned_encoder.fingerprint
    stock = build_index([exemplars], tmp_path / "stock-index", OnnxEncoder.load(encoder_dir),
                        tune=False, progress=False)
    with pytest.raises(FingerprintMismatch, match="was built with encoder"):
        ExemplarIndex.load(stock, expect_fingerprint=tuned_encoder.fingerprint)


def test_route_cli_with_tuned_index(tuned, exemplars: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """`index build --encoder OUT` then `route --index` with the tuned encoder in config."""
    out, _ = tuned
    index = tmp_path / "idx"
    run_cli("index", "build", "--exemplars", str(exemplars), "--encoder", str(out),
            "--out", str(index), "--no-tune", "--quiet")
    config = tmp_path / "semroute.yaml"
    config.write_text(f"encoder:\n  path: {out}\n")
    result = run_cli("--config", str(config), "route", "--index", str(index), "--json",
                     "My new card still has not arrived, it has been two weeks")
    decision = json.loads(result.stdout)
    assert decision["route"] == "card_arrival", decision


def test_a_worse_encoder_is_refused(exemplars: Path, tmp_path: Path) -> None:
    """A run that makes the encoder worse (a learning rate that wrecks it) exits with the two
    figures and writes nothing."""
    out = tmp_path / "broken"
    wreck = TuneOptions(epochs=1, seed=1, batch_size=32, learning_rate=0.05)
    with pytest.raises(EncoderError, match="not better on the held-out"):
        tune_encoder([exemplars], out, options=wreck)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tune-")]


def test_cli_errors_and_warnings(tmp_path: Path) -> None:
    """Bad flags are named; a route with too few exemplars is warned about before tuning."""
    bad = run_cli("encoder", "tune", "--exemplars", "x.csv", "--out", str(tmp_path / "o"),
                  "--held-out", "0.9", check=False)
    assert bad.returncode == 2 and "--held-out must be in (0, 0.5)" in bad.stderr
    few = tmp_path / "few.csv"
    rows = ["text,label"] + [f"how do I pay bill number {i},billing" for i in range(12)]
    rows += ["write a poem about the sea,poetry", "a sonnet about rain please,poetry",
             "haiku on autumn leaves,poetry"]
    few.write_text("\n".join(rows) + "\n")
    run = run_cli("encoder", "tune", "--exemplars", str(few), "--out", str(tmp_path / "o"),
                  "--epochs", "1", "--quiet", check=False)
    assert "fewer than 8 exemplars to tune on: poetry (3)" in run.stderr, run.stderr
