"""The learned projection: it separates routes that raw vectors confuse, and an index built with
it stores the matrix, projects queries the same way, and refuses a mismatched matrix."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from semroute.config import IndexSettings
from semroute.errors import CorruptIndex
from semroute.index import PROJECTION_FILE, ExemplarIndex, build_index
from semroute.projection import (
    STRENGTH_GRID,
    ProjectionParams,
    apply_projection,
    choose_strength,
    fit_projection,
    shrink_toward_identity,
)
from tests.conftest import HashEncoder, write


def _two_overlapping_routes(seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """Routes differ only along one weak axis; a strong shared nuisance axis dominates cosine."""
    rng = np.random.default_rng(seed)
    n = 200
    nuisance = rng.normal(0, 3.0, (2 * n, 1))
    signal = np.r_[np.full(n, 0.3), np.full(n, -0.3)][:, None] + rng.normal(0, 0.05, (2 * n, 1))
    noise = rng.normal(0, 1.0, (2 * n, 6))
    x = np.hstack([nuisance, signal, noise]).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, ["a"] * n + ["b"] * n


def _nn_accuracy(train: np.ndarray, y_train: list[str], test: np.ndarray, y_test: list[str]) -> float:
    nearest = np.argmax(test @ train.T, axis=1)
    return float(np.mean([y_train[j] == t for j, t in zip(nearest, y_test, strict=True)]))


def test_fitted_projection_separates_routes_raw_vectors_confuse() -> None:
    """1-NN accuracy on held-out points rises well above what the raw vectors give."""
    x, y = _two_overlapping_routes(0)
    xt, yt = _two_overlapping_routes(1)
    raw = _nn_accuracy(x, y, xt, yt)
    w = fit_projection(x, y, ProjectionParams(epochs=50, learning_rate=0.02))
    projected = _nn_accuracy(apply_projection(x, w), y, apply_projection(xt, w), yt)
    assert raw < 0.7
    assert projected > raw + 0.2
    assert w.shape == (8, 8) and w.dtype == np.float32


def test_apply_projection_returns_unit_rows() -> None:
    """Projected vectors are re-normalised so the inner-product index still measures cosine."""
    v = np.array([[1.0, 0.0], [0.6, 0.8]], dtype=np.float32)
    out = apply_projection(v, np.array([[2.0, 0.0], [0.0, 0.5]], dtype=np.float32))
    assert np.allclose(np.linalg.norm(out, axis=1), 1.0)
    assert np.allclose(out[1], np.array([1.2, 0.4]) / np.hypot(1.2, 0.4))


def test_shrink_toward_identity_interpolates_between_raw_and_fitted() -> None:
    """Strength 1 keeps the fitted map, 0 gives the identity (raw space), 0.5 the midpoint."""
    w = np.array([[2.0, 1.0], [0.0, 0.5]], dtype=np.float32)
    assert shrink_toward_identity(w, 1.0) is w
    assert np.allclose(shrink_toward_identity(w, 0.0), np.eye(2))
    assert np.allclose(shrink_toward_identity(w, 0.5), [[1.5, 0.5], [0.0, 0.75]])


def test_strength_is_chosen_by_cv_on_the_exemplars() -> None:
    """``choose_strength`` scores every strength of the grid on held-out folds and picks the
    best; ``fit_projection`` with no strength returns the full fit shrunk by that choice, the
    same on every call. Too few rows to fold: strength 1 and no figures."""
    x, y = _two_overlapping_routes(0)
    params = ProjectionParams(epochs=5, learning_rate=0.02)
    choice = choose_strength(x, y, params)
    assert set(choice.cv_accuracy) == set(STRENGTH_GRID) and len(choice.fits) == 5
    assert choice.strength == max(STRENGTH_GRID, key=lambda s: choice.cv_accuracy[s])
    full = fit_projection(x, y, replace(params, strength=1.0))
    auto = fit_projection(x, y, params)
    assert np.array_equal(auto, shrink_toward_identity(full, choice.strength))
    assert np.array_equal(auto, fit_projection(x, y, params))
    few = choose_strength(x[:6], y[:3] + y[-3:], params)
    assert few.strength == 1.0 and few.cv_accuracy == {} and few.fits == ()


def test_fit_projection_needs_two_routes() -> None:
    """One route gives nothing to separate: a clear error rather than a silent identity."""
    with pytest.raises(ValueError, match="two routes"):
        fit_projection(np.eye(3, dtype=np.float32), ["a", "a", "a"])


CSV = (
    "text,label\nreverse a list in python,code\nfix this python bug,code\n"
    "python list sort,code\nhello friend,chat\nhi there friend,chat\nhello again,chat\n"
)


def test_index_with_learned_projection_stores_and_applies_it(
    tmp_path: Path, hash_encoder: HashEncoder
) -> None:
    """The build writes projection.npy (checksummed); search projects queries first, so a query's
    nearest exemplar is the same as projecting by hand and searching the raw FAISS index."""
    f = write(tmp_path / "ex.csv", CSV)
    settings = IndexSettings(projection="learned", projection_epochs=3)
    version = build_index([f], tmp_path / "idx", hash_encoder, settings=settings, progress=False)
    manifest = json.loads((version / "manifest.json").read_text())
    assert manifest["projection"]["file"] == PROJECTION_FILE
    assert PROJECTION_FILE in manifest["checksums"]
    index = ExemplarIndex.load(tmp_path / "idx")
    assert index.projection is not None
    query = hash_encoder.encode(["python bug in my list"])
    sims, ids = index.search(query, 2)
    expected = apply_projection(query, index.projection) @ apply_projection(
        hash_encoder.encode(index.texts), index.projection
    ).T
    assert ids[0][0] == int(np.argmax(expected[0]))
    assert sims[0][0] == pytest.approx(float(expected[0].max()), abs=1e-5)


def test_index_without_projection_has_none(tmp_path: Path, hash_encoder: HashEncoder) -> None:
    """The default build stores no projection and searches raw vectors."""
    f = write(tmp_path / "ex.csv", CSV)
    version = build_index([f], tmp_path / "idx", hash_encoder, progress=False)
    assert json.loads((version / "manifest.json").read_text())["projection"] is None
    assert ExemplarIndex.load(tmp_path / "idx").projection is None
    assert not (version / PROJECTION_FILE).exists()


def test_projection_of_wrong_shape_is_refused(tmp_path: Path, hash_encoder: HashEncoder) -> None:
    """A projection that does not fit the encoder dimension is a corrupt index, not a crash."""
    f = write(tmp_path / "ex.csv", CSV)
    settings = IndexSettings(projection="learned", projection_epochs=1)
    version = build_index([f], tmp_path / "idx", hash_encoder, settings=settings, progress=False)
    np.save(version / PROJECTION_FILE, np.eye(5, dtype=np.float32))
    manifest = json.loads((version / "manifest.json").read_text())
    manifest["checksums"].pop(PROJECTION_FILE)
    (version / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CorruptIndex, match="does not fit encoder dimension"):
        ExemplarIndex.load(tmp_path / "idx")
