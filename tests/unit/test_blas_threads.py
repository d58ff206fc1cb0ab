"""``semroute.serve.limit_blas_threads``: the router process runs numpy's BLAS on one thread."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import threadpoolctl

from semroute.serve import limit_blas_threads


def _numpy_openblas_threads() -> list[int]:
    return [int(info["num_threads"]) for info in threadpoolctl.threadpool_info()
            if info["internal_api"] == "openblas" and "numpy" in info["filepath"]]


@pytest.fixture(autouse=True)
def _restore_blas_threads() -> Iterator[None]:
    before = _numpy_openblas_threads()
    yield
    if before:
        limit_blas_threads(before[0])


def test_numpy_openblas_runs_on_the_asked_thread_count() -> None:
    """Where numpy uses OpenBLAS, the call finds it and its thread count becomes the one
    asked for; elsewhere the call says it did nothing."""
    found = limit_blas_threads(1)
    if not _numpy_openblas_threads():
        assert found is False
        return
    assert found is True
    assert _numpy_openblas_threads() == [1]


def test_products_are_unchanged_on_one_thread() -> None:
    """One BLAS thread changes where the work runs, not the projection the router computes."""
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((32, 384)).astype(np.float32)
    matrix = rng.standard_normal((384, 384)).astype(np.float32)
    expected = vectors @ matrix
    limit_blas_threads(1)
    np.testing.assert_allclose(vectors @ matrix, expected, rtol=1e-5, atol=1e-4)
