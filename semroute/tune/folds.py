"""Cross-validation folds over exemplars, and exact top-k neighbour search in blocks.

The tuner never sees a test set: every figure it records comes from these folds of the
exemplars themselves. Folds are seeded, so a rebuild of the same data chooses the same settings.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import numpy.typing as npt

IntArray = npt.NDArray[np.int64]
Matrix = npt.NDArray[np.float32]


def stratified_folds(labels: npt.ArrayLike, n_folds: int, seed: int = 0) -> IntArray:
    """A fold number per row; each label's rows are spread round-robin over the folds after a
    seeded shuffle, so every fold holds about 1/n_folds of every label."""
    y = np.asarray(labels)
    rng = np.random.default_rng(seed)
    fold = np.zeros(len(y), dtype=np.int64)
    offset = 0
    for value in sorted(set(y.tolist())):
        rows = np.flatnonzero(y == value)
        rows = rows[rng.permutation(len(rows))]
        # rotating the start keeps small labels from all landing in fold 0
        fold[rows] = (np.arange(len(rows)) + offset) % n_folds
        offset += len(rows)
    return fold


def random_folds(n: int, n_folds: int, seed: int = 0) -> IntArray:
    """A fold number per row: a seeded permutation taken modulo ``n_folds``."""
    return np.asarray(np.random.default_rng(seed).permutation(n) % n_folds, dtype=np.int64)


def route_groups(labels: npt.ArrayLike, n_groups: int, seed: int = 0) -> IntArray:
    """A group number per row such that all rows of one label share a group (leave-routes-out
    folds: a group's routes are held out together). At most one group per label."""
    y = np.asarray(labels)
    names = sorted(set(y.tolist()))
    order = np.random.default_rng(seed).permutation(len(names))
    n_groups = max(1, min(n_groups, len(names)))
    group_of = {names[i]: rank % n_groups for rank, i in enumerate(order)}
    return np.asarray([group_of[v] for v in y.tolist()], dtype=np.int64)


def top_neighbours(
    queries: Matrix, base: Matrix, k: int, *, exclude_self: bool = False, block: int = 2048
) -> tuple[Matrix, IntArray]:
    """Exact top-k inner products of each query row against ``base``, best first.

    Returns (sims, ids), both (n, k') with k' = min(k, available). With ``exclude_self`` the
    queries are the base itself and row i never returns i. Blocks bound the memory to
    ``block`` x len(base) floats.
    """
    n, m = len(queries), len(base)
    k = max(0, min(k, m - (1 if exclude_self else 0)))
    sims_out = np.zeros((n, k), dtype=np.float32)
    ids_out = np.zeros((n, k), dtype=np.int64)
    if k == 0:
        return sims_out, ids_out
    for start in range(0, n, block):
        s = queries[start : start + block] @ base.T
        if exclude_self:
            rows = np.arange(s.shape[0])
            s[rows, rows + start] = -np.inf
        # argpartition then sort only the k kept: O(m) per row instead of O(m log m)
        part = np.argpartition(-s, k - 1, axis=1)[:, :k]
        part_s = np.take_along_axis(s, part, axis=1)
        order = np.argsort(-part_s, axis=1, kind="stable")
        ids_out[start : start + block] = np.take_along_axis(part, order, axis=1)
        sims_out[start : start + block] = np.take_along_axis(part_s, order, axis=1)
    return sims_out, ids_out


@contextlib.contextmanager
def one_blas_thread() -> Iterator[None]:
    """Run the block with BLAS on one thread.

    The tuner's matrix products are small (512 x 384 x 384 in the projection's steps): on a
    busy 2-core box a second BLAS thread that spin-waits for its share made a projection fit
    15x slower (21 s against 1.4 s for 8,000 Banking77 exemplars), and on an idle one it gains
    little.
    """
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield
