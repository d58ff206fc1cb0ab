"""The FAISS index types a build may ask for (``semroute index build --faiss KIND``).

``auto`` (the default) is what every build has done so far: exact (``Flat``) up to
``index.exact_max`` exemplars, ``index.approx_factory`` (HNSW32 over float32) above it. The other
kinds are opt-in, for indexes far larger than a hand-written exemplar set; scripts/bench_scale.py
measures them at a million exemplars (docs/BENCHMARKS.md, section ``bench:scale``):

- ``flat``: exact at any size (each query reads every vector: 1.5 GB at 1M x 384).
- ``hnsw-sq``: an HNSW32 graph over 8-bit scalar-quantised vectors (a quarter of float32).
- ``ivf-sq``: an inverted file of about sqrt(n) lists, ``index.ivf_nprobe`` of them scanned per
  query, over 8-bit scalar-quantised vectors.
- ``ivfpq``: the same inverted file over 4-bit product-quantised codes (fast scan), the best
  ``REFINE_K_FACTOR`` x k candidates re-ranked on 8-bit vectors.

At a million exemplars on this project's 2-core machine ``ivf-sq`` is the one to use: search p50
0.4-0.7 ms at recall@10 0.95-0.97 (nprobe 4-8), the smallest RSS and no re-rank depth to tune;
``ivfpq`` meets the same targets only with a deep re-rank (128k), and ``hnsw-sq`` topped out at
recall@10 0.94 (docs/BENCHMARKS.md, bench:scale).

The kind, the factory string and the search setting (efSearch or nprobe) are recorded in the
manifest; the quantised kinds are read memory-mapped, so replicas on one machine share one copy
of the vectors in the page cache and a start does not copy the file.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

KINDS = ("auto", "flat", "hnsw-sq", "ivf-sq", "ivfpq")
"""Every value ``index.faiss`` / ``--faiss`` accepts."""

# Re-ranking depth of ``ivfpq``: the 4-bit PQ codes shortlist 128k candidates, 8-bit vectors
# order them. The denser the index, the deeper it must go: at 1M Banking77-like vectors recall@10
# was 0.80 with 16k, 0.945 with 64k, 0.964 with 128k (scripts/bench_scale.py, docs/BENCHMARKS.md).
REFINE_K_FACTOR = 128
# k-means wants at least 39 points per list (FAISS warns below that); more than 64 per list
# buys little and costs training time, so big builds train on a sample.
MIN_POINTS_PER_LIST = 39
MAX_POINTS_PER_LIST = 64


def ivf_lists(n: int) -> int:
    """Inverted lists for ``n`` vectors: the power of two nearest sqrt(n) (1,024 at 1M), halved
    until k-means sees at least 39 points per list (1 for tiny sets)."""
    lists = 1 << round(math.log2(max(1.0, math.sqrt(n))))
    while lists > 1 and n // lists < MIN_POINTS_PER_LIST:
        lists //= 2
    return lists


def _pq_subquantisers(d: int) -> int:
    # 4 dimensions per 4-bit sub-quantiser (96 for MiniLM's 384: 48 bytes a vector); FAISS
    # needs the dimension to split evenly.
    return d // 4 if d % 4 == 0 else d


_FACTORIES: dict[str, Callable[[int, int], str]] = {
    "flat": lambda n, d: "Flat",
    "hnsw-sq": lambda n, d: "HNSW32,SQ8",
    "ivf-sq": lambda n, d: f"IVF{ivf_lists(n)},SQ8",
    "ivfpq": lambda n, d: f"IVF{ivf_lists(n)},PQ{_pq_subquantisers(d)}x4fs,Refine(SQ8)",
}


def factory(
    kind: str, n: int, d: int, *, exact_max: int, approx_factory: str
) -> tuple[str, bool]:
    """The FAISS factory string for ``kind`` at ``n`` vectors of dimension ``d``, and whether
    the index is exact.

    Raises ValueError for a kind not in ``KINDS`` (the settings model refuses those first)."""
    if kind == "auto":
        exact = n <= exact_max
        return ("Flat" if exact else approx_factory), exact
    if kind not in _FACTORIES:
        raise ValueError(f"index.faiss: unknown kind {kind!r}; choose one of {', '.join(KINDS)}")
    return _FACTORIES[kind](n, d), kind == "flat"


def new_index(factory_string: str, vectors: npt.NDArray[np.float32], *, seed: int = 0) -> Any:
    """An empty inner-product index of ``factory_string``, trained on ``vectors`` (a seeded
    sample of them when they are many), with the re-ranking depth set. Add vectors after."""
    import faiss

    index = faiss.index_factory(vectors.shape[1], factory_string, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        index.train(training_sample(index, vectors, seed=seed))
    if isinstance(index, faiss.IndexRefine):
        index.k_factor = REFINE_K_FACTOR
    return index


def training_sample(
    index: Any, vectors: npt.NDArray[np.float32], *, seed: int = 0
) -> npt.NDArray[np.float32]:
    """The rows to train ``index`` on: all of them, or a seeded sample of 64 per inverted list
    (at least 10,000) when there are more."""
    import faiss

    ivf = faiss.try_extract_index_ivf(index)
    limit = max(10_000, MAX_POINTS_PER_LIST * (ivf.nlist if ivf is not None else 0))
    if len(vectors) <= limit:
        return np.ascontiguousarray(vectors, dtype=np.float32)
    rows = np.sort(np.random.default_rng(seed).choice(len(vectors), limit, replace=False))
    return np.ascontiguousarray(vectors[rows], dtype=np.float32)


def set_search_params(index: Any, *, ef_search: int, nprobe: int) -> None:
    """Set the recorded search effort: efSearch on an HNSW graph, nprobe on an inverted file
    (either may sit under a re-ranking wrapper)."""
    import faiss

    inner = index.base_index if isinstance(index, faiss.IndexRefine) else index
    if hasattr(inner, "hnsw"):
        inner.hnsw.efSearch = ef_search
    ivf = faiss.try_extract_index_ivf(inner)
    if ivf is not None and nprobe > 0:
        ivf.nprobe = nprobe


def read_flags(kind: str, mmap: bool) -> int:
    """FAISS read flags for an index of ``kind``: memory-mapped, read-only, when asked or when
    the kind is one of the large quantised ones; 0 (read into memory) otherwise."""
    import faiss

    if not mmap and kind in ("auto", "flat"):
        return 0
    flags: int = faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY
    return flags
