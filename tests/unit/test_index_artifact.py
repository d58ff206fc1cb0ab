"""The index artifact: manifest, checksums, encoder fingerprint and the atomic `current` switch.

These use a deterministic hash encoder so they need no model; the real encoder is exercised in
tests/integration.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from semroute.config import IndexSettings
from semroute.errors import CorruptIndex, ExemplarError, FingerprintMismatch, IndexNotFound
from semroute.index import (
    ExemplarIndex,
    IndexManifest,
    build_index,
    read_manifest,
    write_thresholds,
)
from semroute.types import ExemplarKind
from tests.conftest import HashEncoder, write

CSV = (
    "text,label\nreverse a list in python,code\nfix this python bug,code\n"
    "hello friend,chat\nhi there friend,chat\n"
)


def build(tmp_path: Path, enc: HashEncoder, body: str = CSV, **kw: object) -> Path:
    f = write(tmp_path / "ex.csv", body)
    return build_index([f], tmp_path / "idx", enc, progress=False, **kw)  # type: ignore[arg-type]


def test_build_then_load_round_trips(tmp_path: Path, hash_encoder: HashEncoder) -> None:
    """A built index loads back with its texts, labels, counts and an exact search."""
    version = build(tmp_path, hash_encoder)
    index = ExemplarIndex.load(tmp_path / "idx", expect_fingerprint=hash_encoder.fingerprint)
    assert index.path == version.resolve()
    assert index.kind is ExemplarKind.LABELLED
    assert index.size == 4 and index.info.faiss_factory == "Flat"
    sims, ids = index.search(hash_encoder.encode(["hello friend"]), 2)
    assert index.texts[int(ids[0, 0])] == "hello friend"
    assert sims[0, 0] == pytest.approx(1.0, abs=1e-5)


def test_other_encoder_is_refused_with_what_to_do(
    tmp_path: Path, hash_encoder: HashEncoder
) -> None:
    """Loading with a different encoder fingerprint fails and says to rebuild or switch encoder."""
    build(tmp_path, hash_encoder)
    with pytest.raises(FingerprintMismatch, match="rebuild the index"):
        ExemplarIndex.load(tmp_path / "idx", expect_fingerprint="sha256:another")


def test_tampered_file_is_refused(tmp_path: Path, hash_encoder: HashEncoder) -> None:
    """A changed exemplar table fails its checksum and names the file."""
    version = build(tmp_path, hash_encoder)
    table = version / "exemplars.jsonl"
    table.write_text(table.read_text().replace("hello", "HELLO"))
    with pytest.raises(CorruptIndex, match=r"exemplars\.jsonl: checksum mismatch"):
        ExemplarIndex.load(tmp_path / "idx")


def test_truncated_manifest_is_refused(tmp_path: Path, hash_encoder: HashEncoder) -> None:
    """An unreadable manifest is a CorruptIndex naming file and line."""
    version = build(tmp_path, hash_encoder)
    (version / "manifest.json").write_text('{"format": 1,')
    with pytest.raises(CorruptIndex, match=r"manifest\.json:1: invalid JSON"):
        ExemplarIndex.load(version)


def test_missing_index_says_how_to_build(tmp_path: Path) -> None:
    """No index at the path: IndexNotFound with the build command."""
    with pytest.raises(IndexNotFound, match="semroute index build"):
        ExemplarIndex.load(tmp_path / "nothing")


def test_failed_build_leaves_current_untouched(tmp_path: Path, hash_encoder: HashEncoder) -> None:
    """A build with a bad row writes nothing and `current` still points at the old version."""
    first = build(tmp_path, hash_encoder)
    before = sorted(p.name for p in (tmp_path / "idx" / "versions").iterdir())
    with pytest.raises(ExemplarError):
        build(tmp_path, hash_encoder, body=CSV + ",code\n")
    assert (tmp_path / "idx" / "current").resolve() == first.resolve()
    assert sorted(p.name for p in (tmp_path / "idx" / "versions").iterdir()) == before


def test_second_build_switches_current(tmp_path: Path, hash_encoder: HashEncoder) -> None:
    """A successful rebuild moves `current` to the new version; the old one stays on disk."""
    first = build(tmp_path, hash_encoder)
    second = build(tmp_path, hash_encoder, body=CSV + "compile the rust crate,code\n")
    assert first != second and first.exists()
    assert (tmp_path / "idx" / "current").resolve() == second.resolve()
    assert ExemplarIndex.load(tmp_path / "idx").size == 5


def test_calibrated_thresholds_override_routes_file(
    tmp_path: Path, hash_encoder: HashEncoder
) -> None:
    """write_thresholds records global and per-route thresholds used on the next load."""
    version = build(tmp_path, hash_encoder)
    write_thresholds(version, 0.3, {"code": 0.7})
    table = ExemplarIndex.load(version).route_table
    assert table.threshold_for("code") == 0.7
    assert table.threshold_for("chat") == 0.3
    with pytest.raises(IndexNotFound, match="unknown route"):
        write_thresholds(version, None, {"nope": 0.5})


def test_large_index_uses_the_approximate_factory(tmp_path: Path) -> None:
    """Above exact_max the index is built with the configured FAISS factory (HNSW here)."""
    hash_encoder = HashEncoder(dimension=1024)  # wide enough that the test words do not collide
    rows = "".join(f"item number {i} word{i % 7},l{i % 3}\n" for i in range(60))
    version = build(
        tmp_path, hash_encoder, body="text,label\n" + rows, settings=IndexSettings(exact_max=10)
    )
    manifest = json.loads((version / "manifest.json").read_text())
    assert manifest["faiss"]["factory"] == "HNSW32" and manifest["faiss"]["exact"] is False
    index = ExemplarIndex.load(version)
    _sims, ids = index.search(hash_encoder.encode(["item number 5 word5"]), 3)
    assert index.texts[int(ids[0, 0])] == "item number 5 word5"


def test_outcome_index_stores_scores_and_means(tmp_path: Path, hash_encoder: HashEncoder) -> None:
    """Outcome exemplars keep a score matrix (NaN unknown) and each target's mean."""
    body = "text,a,b\nfirst q,1,0\nsecond q,0,\nthird q,1,1\n"
    version = build(tmp_path, hash_encoder, body=body)
    index = ExemplarIndex.load(version)
    assert index.kind is ExemplarKind.OUTCOMES and index.score_targets == ("a", "b")
    assert np.isnan(index.scores[1, 1])
    assert index.target_means.tolist() == pytest.approx([2 / 3, 0.5])


def test_index_without_routes_file_gets_a_default_route(
    tmp_path: Path, hash_encoder: HashEncoder
) -> None:
    """A plain `text,label` build can fall back: a `default` route (or the name given) with its
    own target, next to one route per label."""
    table = ExemplarIndex.load(build(tmp_path, hash_encoder)).route_table
    assert table.default_route == "default" and table.routes["default"].targets == ("default",)
    assert set(table.routes) == {"code", "chat", "default"}
    other = build(tmp_path / "b", hash_encoder, default_route="elsewhere")
    assert ExemplarIndex.load(other).route_table.default_route == "elsewhere"


def test_manifest_is_typed_and_round_trips(tmp_path: Path, hash_encoder: HashEncoder) -> None:
    """read_manifest gives the typed record; its JSON form is what is on disk."""
    version = build(tmp_path, hash_encoder)
    manifest = read_manifest(version)
    assert isinstance(manifest, IndexManifest)
    assert manifest.counts.exemplars == 4 and manifest.faiss.factory == "Flat"
    on_disk = json.loads((version / "manifest.json").read_text())
    assert manifest.to_json() == on_disk


def test_an_index_from_before_tuning_still_loads(tmp_path: Path, hash_encoder: HashEncoder) -> None:
    """A format-1 manifest without the keys tuning added (decision, tuning, abstain, density)
    loads with no tuned settings and no abstention score."""
    version = build(tmp_path, hash_encoder)
    path = version / "manifest.json"
    data = json.loads(path.read_text())
    for key in ("decision", "tuning", "abstain", "density"):
        data.pop(key)
    path.write_text(json.dumps(data))
    index = ExemplarIndex.load(version)
    assert index.manifest.decision == {} and index.manifest.abstain is None
    assert index.density is None


def test_a_future_format_is_refused_with_what_to_do(
    tmp_path: Path, hash_encoder: HashEncoder
) -> None:
    """An unknown format number names the file and says to rebuild."""
    version = build(tmp_path, hash_encoder)
    path = version / "manifest.json"
    path.write_text(path.read_text().replace('"format": 1', '"format": 99'))
    with pytest.raises(CorruptIndex, match=r"format 99 is not supported.*rebuild"):
        ExemplarIndex.load(version)


def _separable_csv(routes: int = 3, per_route: int = 12) -> str:
    rows = [f"topic{r} word{r}a word{r}b sample {i} extra{i % 3},r{r}"
            for r in range(routes) for i in range(per_route)]
    return "text,label\n" + "\n".join(rows) + "\n"


def test_tuned_build_records_settings_figures_and_a_score(tmp_path: Path) -> None:
    """Enough exemplars to fold: the build records k/temperature, the CV figures with a
    one-line summary, the abstention score and the density file; --no-tune records none."""
    enc = HashEncoder(dimension=256)
    version = build(tmp_path, enc, body=_separable_csv())
    manifest = read_manifest(version)
    assert set(manifest.decision) == {"k", "temperature"}
    assert manifest.tuning["summary"].startswith("tuned on 5-fold CV")
    assert manifest.abstain is not None and manifest.density == "density.npy"
    index = ExemplarIndex.load(version)
    assert index.density is not None and index.density.shape == (36,)
    untuned = read_manifest(build(tmp_path / "u", enc, body=_separable_csv(), tune=False))
    assert untuned.decision == {} and untuned.abstain is None and untuned.projection is None


def test_explicit_settings_beat_the_tuned_ones() -> None:
    """The router uses the index's tuned values except where the caller set a value."""
    from semroute.config import DecisionSettings
    from semroute.router import effective_decision

    tuned = {"k": 40, "temperature": 0.1, "use_neighbours": True}
    assert effective_decision(DecisionSettings(), tuned).k == 40
    explicit = effective_decision(DecisionSettings(k=7), tuned)
    assert explicit.k == 7 and explicit.temperature == 0.1
