"""The exemplar index artifact: build, save, load (with checks), search.

Layout of an index root::

    ROOT/
      current -> versions/<version>        symlink, switched atomically by os.replace
      versions/<version>/
        manifest.json     format, version, kind, counts, encoder fingerprint, routes, targets,
                          thresholds, checksums of every other file
        index.faiss       inner-product FAISS index over L2-normalised embeddings (= cosine)
        exemplars.jsonl   one exemplar per line (text, label, weight, source), row i = FAISS id i
        labels.npy        its columns, so loading parses no JSON (manifest ``columns``): each
        weights.npy       row's label as an int32 code into the manifest's label names, its
        offsets.npy       weight (float32), and the rows' byte offsets in exemplars.jsonl
                          (int64, n + 1), from which a text is read only when asked (explain).
                          Versions written before them load from exemplars.jsonl.
        scores.npy        outcome exemplars only: (n, targets) float32, NaN = unknown
        projection.npy    optional learned projection (d, d') applied to every vector before
                          FAISS (see semroute.projection); index.faiss holds projected vectors
        density.npy       labelled exemplars with an abstention score: each exemplar's own
                          density (semroute.abstain), in the space FAISS searches

A build tunes its decision settings by cross-validation on the exemplars (semroute.tune) unless
told not to, and records them, with the CV figures, in the manifest (semroute.manifest).

A build validates every input before writing anything, writes a new version directory, and only
then moves ``current``; a failed build leaves the serving index as it was.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import operator
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, overload

import numpy as np
import numpy.typing as npt

from semroute.config import DecisionSettings, IndexSettings
from semroute.encoder import embed_many
from semroute.errors import CorruptIndex, FingerprintMismatch, IndexNotFound
from semroute.exemplars import ExemplarSet, load_route_table, read_exemplars
from semroute.index_types import factory as index_factory
from semroute.index_types import new_index as new_faiss_index
from semroute.index_types import read_flags, set_search_params
from semroute.logs import get_logger, stderr_progress
from semroute.manifest import (
    FORMAT_VERSION,
    ColumnsRecord,
    Counts,
    EncoderRecord,
    FaissRecord,
    IndexManifest,
    ProjectionRecord,
    Thresholds,
)
from semroute.static_encoder import StaticEncoder
from semroute.tune import BuildTuning, tune_labelled_build, tune_outcome_build
from semroute.types import Encoder, Exemplar, ExemplarKind, IndexInfo, RouteTable, Vectors

__all__ = ["FORMAT_VERSION", "ExemplarIndex", "ExemplarTexts", "IndexManifest",
           "build_from_exemplars", "build_index",
           "read_manifest", "resolve_version_dir", "switch_current", "write_prebuilt_version",
           "write_thresholds", "write_version"]

log = get_logger(__name__)

MANIFEST = "manifest.json"
FAISS_FILE = "index.faiss"
EXEMPLARS_FILE = "exemplars.jsonl"
LABELS_FILE = "labels.npy"
WEIGHTS_FILE = "weights.npy"
OFFSETS_FILE = "offsets.npy"
SCORES_FILE = "scores.npy"
PROJECTION_FILE = "projection.npy"
DENSITY_FILE = "density.npy"
CURRENT = "current"
EF_SEARCH_MAX = 1024  # the highest efSearch ``ExemplarIndex.search`` raises a graph to


class ExemplarTexts(Sequence[str]):
    """The exemplars' texts, each read from exemplars.jsonl when asked, by its row's byte
    offsets: the router needs a text only to explain a decision, so loading parses no JSON and
    holds no strings. The file is mapped read-only on first access (version files are never
    rewritten). Iterating reads it once, in order. A row that is not valid JSON raises
    CorruptIndex naming file and line."""

    def __init__(self, file: Path, offsets: npt.NDArray[np.int64]) -> None:
        self._file = file
        self._offsets = offsets
        self._mapped: mmap.mmap | None = None
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._offsets) - 1

    @overload
    def __getitem__(self, row: int) -> str: ...
    @overload
    def __getitem__(self, row: slice) -> list[str]: ...
    def __getitem__(self, row: int | slice) -> str | list[str]:
        if isinstance(row, slice):
            return [self[i] for i in range(*row.indices(len(self)))]
        i = operator.index(row)  # numpy integers too (FAISS ids)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"exemplar row {row} out of range ({len(self)} rows)")
        return self._text(self._data()[int(self._offsets[i]):int(self._offsets[i + 1])], i)

    def __iter__(self) -> Iterator[str]:
        with self._file.open("rb") as fh:
            for i, line in enumerate(fh):
                yield self._text(line, i)

    def _data(self) -> mmap.mmap:
        if self._mapped is None:
            with self._lock:
                if self._mapped is None:
                    with self._file.open("rb") as fh:
                        self._mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        return self._mapped

    def _text(self, line: bytes, i: int) -> str:
        try:
            return str(json.loads(line)["text"])
        except (ValueError, KeyError, TypeError) as exc:
            raise CorruptIndex(
                f"{self._file}:{i + 1}: not an exemplar row ({exc}); rebuild the index"
            ) from exc


class ExemplarIndex:
    """A loaded, checked index version. Immutable once loaded (reloads build a new object)."""

    def __init__(
        self,
        path: Path,
        manifest: IndexManifest,
        faiss_index: Any,
        texts: Sequence[str],
        labels: npt.NDArray[np.str_],
        weights: npt.NDArray[np.float32],
        scores: npt.NDArray[np.float32] | None,
        projection: npt.NDArray[np.float32] | None = None,
        density: npt.NDArray[np.float32] | None = None,
    ) -> None:
        self.path = path
        self.projection = projection
        self.density = density
        self.manifest = manifest
        self._faiss = faiss_index
        self.texts = texts
        self.labels = labels
        self.weights = weights
        self.kind = manifest.kind
        self.score_targets: tuple[str, ...] = manifest.score_targets
        self.scores = scores if scores is not None else np.zeros((len(texts), 0), dtype=np.float32)
        self.route_table = manifest.effective_route_table()
        self.target_means = np.asarray(
            [manifest.target_means.get(t, 0.0) for t in self.score_targets], dtype=np.float32
        )
        # search_observed's per-index state, computed once (scores never change in place):
        # which rows are fully scored, and the search width for each k asked.
        self._complete_rows: npt.NDArray[np.bool_] | None = None
        self._widths: dict[int, int] = {}
        # An HNSW graph's search effort must exceed the neighbours asked for (``search``).
        self._ef_search = manifest.faiss.ef_search if "HNSW" in manifest.faiss.factory else 0

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def encoder_fingerprint(self) -> str:
        return self.manifest.encoder.fingerprint

    @property
    def size(self) -> int:
        return len(self.texts)

    @property
    def info(self) -> IndexInfo:
        return IndexInfo(
            version=self.version,
            path=str(self.path),
            kind=self.kind,
            exemplars=self.size,
            dimension=self.manifest.encoder.dimension,
            routes=tuple(self.route_table.routes),
            targets=tuple(self.route_table.targets),
            encoder_fingerprint=self.encoder_fingerprint,
            faiss_factory=self.manifest.faiss.factory,
            built_at=self.manifest.built_at,
        )

    def search(
        self, vectors: Vectors, k: int
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        """Top-k by cosine similarity. Returns (sims, ids), both (n, k); missing slots have id -1.

        On an HNSW graph the search effort (efSearch) is raised to ``2 k`` (at most
        ``EF_SEARCH_MAX``) when the recorded one is lower: with efSearch near k the graph
        misses many true neighbours (an outcome index tuned to k=160 over LLMRouter's 5.6k
        exemplars, searched at the default efSearch 64, cost more to match the best single
        model than exact search did). Raised once, kept.
        """
        k = min(k, self.size)
        if self._ef_search and self._ef_search < min(2 * k, EF_SEARCH_MAX):
            self._ef_search = min(2 * k, EF_SEARCH_MAX)
            set_search_params(self._faiss, ef_search=self._ef_search,
                              nprobe=self.manifest.faiss.nprobe)
        if self.projection is not None:
            from semroute.projection import apply_projection

            vectors = apply_projection(vectors, self.projection)
        sims, ids = self._faiss.search(np.ascontiguousarray(vectors, dtype=np.float32), k)
        return sims, ids

    def search_observed(
        self, vectors: Vectors, k: int
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        """``search`` for an outcome index whose scores may be missing: each query's
        neighbourhood is widened (``decision.search_width``, then four times wider for the
        queries still short, up to ``decision.MAX_SEARCH_WIDTH``) until it holds ``k`` fully
        scored rows, or all the index has. Rows are padded with id -1; a fully scored index is
        searched exactly as ``search(vectors, k)``."""
        from semroute.decision import MAX_SEARCH_WIDTH, search_width

        width = self._widths.get(k)
        if width is None:
            width = self._widths[k] = search_width(k, self.scores)
        sims, ids = self.search(vectors, width)
        limit = min(self.size, max(MAX_SEARCH_WIDTH, width))
        if width == k or self.scores.shape[1] == 0:
            return sims, ids
        if self._complete_rows is None:
            self._complete_rows = np.asarray(np.isfinite(self.scores).all(axis=1), dtype=bool)
        complete = self._complete_rows
        need = min(k, int(complete.sum()))
        while width < limit:
            seen = complete[np.maximum(ids, 0)] & (ids >= 0)
            short = np.flatnonzero(seen.sum(axis=1) < need)
            if not len(short):
                break
            width = min(width * 4, limit)
            more_sims, more_ids = self.search(vectors[short], width)
            grown_sims = np.full((len(ids), width), -np.inf, dtype=np.float32)
            grown_ids = np.full((len(ids), width), -1, dtype=np.int64)
            grown_sims[:, : sims.shape[1]], grown_ids[:, : ids.shape[1]] = sims, ids
            grown_sims[short], grown_ids[short] = more_sims, more_ids
            sims, ids = grown_sims, grown_ids
        return sims, ids

    @classmethod
    def load(
        cls, path: Path, expect_fingerprint: str | None = None, *, mmap: bool = False
    ) -> ExemplarIndex:
        """Load and check an index: ROOT (follows ROOT/current) or a version directory.

        ``mmap``: map the FAISS vectors read-only from the file instead of copying them, so
        processes serving the same version share one copy in the page cache (version
        directories are never rewritten in place, so the mapping stays valid).
        Raises IndexNotFound, CorruptIndex (checksum, format, counts) or FingerprintMismatch,
        each saying what to do.
        """
        import faiss

        version_dir = resolve_version_dir(path)
        manifest = read_manifest(version_dir)
        _verify_checksums(version_dir, manifest)
        fingerprint = manifest.encoder.fingerprint
        if expect_fingerprint is not None and fingerprint != expect_fingerprint:
            raise FingerprintMismatch(
                f"{version_dir}: index was built with encoder {fingerprint[:19]}… "
                f"but the loaded encoder is {expect_fingerprint[:19]}…; rebuild the index with this "
                f"encoder (`semroute index build ... --encoder DIR`) or load the encoder it was "
                f"built with ({manifest.encoder.path or '?'})"
            )
        flags = read_flags(manifest.faiss.kind, mmap)
        faiss_index = faiss.read_index(str(version_dir / FAISS_FILE), flags)
        texts: Sequence[str]
        if manifest.columns is not None:
            texts, labels, weights = _read_columns(version_dir, manifest.columns,
                                                   manifest.counts.exemplars)
        else:
            texts, labels, weights = _read_exemplar_rows(version_dir)
        scores = None
        if manifest.kind is ExemplarKind.OUTCOMES:
            scores = np.load(version_dir / SCORES_FILE, allow_pickle=False).astype(np.float32)
        count = manifest.counts.exemplars
        density = None
        if manifest.density:
            density = np.load(version_dir / manifest.density, allow_pickle=False).astype(np.float32)
        if (
            faiss_index.ntotal != count
            or len(texts) != count
            or (scores is not None and scores.shape[0] != count)
            or (density is not None and density.shape != (count,))
        ):
            raise CorruptIndex(
                f"{version_dir}: manifest says {count} exemplars but the files hold "
                f"{faiss_index.ntotal} vectors / {len(texts)} rows; rebuild the index"
            )
        projection = None
        expected_d = manifest.encoder.dimension
        if manifest.projection is not None:
            projection = np.load(version_dir / PROJECTION_FILE, allow_pickle=False).astype(
                np.float32
            )
            if projection.ndim != 2 or projection.shape[0] != expected_d:
                raise CorruptIndex(
                    f"{version_dir}/{PROJECTION_FILE}: shape {projection.shape} does not fit "
                    f"encoder dimension {expected_d}; rebuild the index"
                )
            expected_d = projection.shape[1]
        if faiss_index.d != expected_d:
            raise CorruptIndex(f"{version_dir}: FAISS dimension {faiss_index.d} != manifest")
        set_search_params(
            faiss_index, ef_search=manifest.faiss.ef_search, nprobe=manifest.faiss.nprobe
        )
        return cls(
            version_dir,
            manifest,
            faiss_index,
            texts,
            labels,
            weights,
            scores,
            projection,
            density,
        )


def _read_exemplar_rows(
    version_dir: Path,
) -> tuple[list[str], npt.NDArray[np.str_], npt.NDArray[np.float32]]:
    """Texts, labels and weights parsed from exemplars.jsonl: versions written without the
    columns (one ``json.loads`` per row: seconds at a million rows)."""
    texts: list[str] = []
    labels: list[str] = []
    weights: list[float] = []
    file = version_dir / EXEMPLARS_FILE
    with file.open(encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            texts.append(row["text"])
            labels.append(row.get("label", ""))
            weights.append(float(row.get("weight", 1.0)))
    return texts, np.asarray(labels, dtype=np.str_), np.asarray(weights, dtype=np.float32)


def _read_columns(
    version_dir: Path, columns: ColumnsRecord, count: int
) -> tuple[ExemplarTexts, npt.NDArray[np.str_], npt.NDArray[np.float32]]:
    """Texts (read when asked), labels and weights from the exemplar columns, each checked
    against the manifest's row count (CorruptIndex naming the file otherwise). Weights and
    offsets stay mapped read-only, shared between processes serving the same version."""
    codes = _column(version_dir / columns.labels, np.dtype(np.int32), count)
    weights = _column(version_dir / columns.weights, np.dtype(np.float32), count)
    offsets = _column(version_dir / columns.offsets, np.dtype(np.int64), count + 1)
    names = np.asarray(columns.label_names, dtype=np.str_)
    if count and (int(codes.min()) < 0 or int(codes.max()) >= len(names)):
        raise CorruptIndex(
            f"{version_dir / columns.labels}: label codes {int(codes.min())}..{int(codes.max())} "
            f"outside the manifest's {len(names)} label names; rebuild the index"
        )
    table = version_dir / EXEMPLARS_FILE
    size = table.stat().st_size
    if offsets[0] != 0 or offsets[-1] != size or bool((np.diff(offsets) <= 0).any()):
        raise CorruptIndex(
            f"{version_dir / columns.offsets}: row offsets do not fit {table} ({size} bytes, "
            f"last offset {int(offsets[-1])}); rebuild the index"
        )
    return ExemplarTexts(table, offsets), names[codes], weights


def _column(file: Path, dtype: np.dtype[Any], rows: int) -> npt.NDArray[Any]:
    """One .npy column, mapped read-only, checked for dtype and length."""
    try:
        array = np.load(file, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise CorruptIndex(f"{file}: not a .npy array ({exc}); rebuild the index") from exc
    if array.dtype != dtype or array.shape != (rows,):
        raise CorruptIndex(
            f"{file}: {array.dtype} {array.shape}, expected {dtype} ({rows},) to fit the "
            f"manifest's exemplar count; rebuild the index"
        )
    return np.asarray(array)  # a plain read-only ndarray over the mapping


def resolve_version_dir(path: Path) -> Path:
    """ROOT -> ROOT/current's target; a version directory -> itself."""
    path = Path(path)
    if (path / MANIFEST).exists():
        return path.resolve()
    current = path / CURRENT
    if current.exists() and (current / MANIFEST).exists():
        return current.resolve()
    if not path.exists():
        raise IndexNotFound(
            f"{path}: no such index; build one with `semroute index build --exemplars CSV --out {path}`"
        )
    raise IndexNotFound(
        f"{path}: not an index (no {MANIFEST} and no `{CURRENT}` link); build one with "
        f"`semroute index build --exemplars CSV --out {path}`"
    )


def read_manifest(version_dir: Path) -> IndexManifest:
    """The typed manifest of a version directory (IndexNotFound / CorruptIndex on problems)."""
    file = version_dir / MANIFEST
    try:
        data: dict[str, Any] = json.loads(file.read_text())
    except FileNotFoundError as exc:
        raise IndexNotFound(f"{version_dir}: {MANIFEST} missing") from exc
    except json.JSONDecodeError as exc:
        raise CorruptIndex(
            f"{file}:{exc.lineno}: invalid JSON ({exc.msg}); rebuild the index"
        ) from exc
    return IndexManifest.from_json(data, file)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _verify_checksums(version_dir: Path, manifest: IndexManifest) -> None:
    for name, expected in manifest.checksums.items():
        file = version_dir / name
        if not file.exists():
            raise CorruptIndex(f"{file}: missing; rebuild the index")
        if _sha256(file) != expected:
            raise CorruptIndex(
                f"{file}: checksum mismatch (the file was changed or truncated); rebuild the index"
            )


# ---- build ---------------------------------------------------------------------------------------


def build_index(
    exemplar_paths: Sequence[Path],
    out_root: Path,
    encoder: Encoder,
    *,
    routes_file: Path | None = None,
    targets_file: Path | None = None,
    settings: IndexSettings | None = None,
    decision: DecisionSettings | None = None,
    batch_size: int = 64,
    progress: bool = True,
    encoder_path: Path | None = None,
    tune: bool = True,
    default_route: str = "default",
    static_model: StaticEncoder | None = None,
) -> Path:
    """Validate, embed, tune, write a new version under ``out_root`` and switch ``current``.

    Without a routes file a labelled index gets a ``default_route`` (its own target) to fall
    back to once thresholds are calibrated. With ``tune`` the decision settings are chosen by
    cross-validation on the exemplars (``semroute.tune``) and recorded in the manifest.
    Nothing is written unless every row and the routes file are valid (ExemplarError /
    ConfigError otherwise). Returns the new version directory.
    """
    exemplar_set = read_exemplars(list(exemplar_paths))
    table = load_route_table(
        routes_file, exemplar_set.labels, targets_file, outcome_targets=exemplar_set.targets,
        default_route=default_route,
    )
    return build_from_exemplars(
        exemplar_set, table, out_root, encoder, settings=settings, decision=decision,
        batch_size=batch_size, progress=progress, encoder_path=encoder_path, tune=tune,
        static_model=static_model,
    )


def build_from_exemplars(
    exemplar_set: ExemplarSet,
    table: RouteTable,
    out_root: Path,
    encoder: Encoder,
    *,
    settings: IndexSettings | None = None,
    decision: DecisionSettings | None = None,
    batch_size: int = 64,
    progress: bool = True,
    encoder_path: Path | None = None,
    tune: bool = True,
    static_model: StaticEncoder | None = None,
) -> Path:
    """``build_index`` from exemplars already read and a route table already made (for
    example an existing version's rows plus new ones: ``calibrate`` adding out-of-scope
    examples). Embeds, tunes, writes a new version and switches ``current``."""
    settings = settings or IndexSettings()
    decision = decision or DecisionSettings()
    for warning in exemplar_set.warnings[:20]:
        log.warning("exemplar_warning", detail=warning)
    if len(exemplar_set.warnings) > 20:
        log.warning("exemplar_warnings_truncated", more=len(exemplar_set.warnings) - 20)

    started = time.perf_counter()
    texts = [e.text for e in exemplar_set.exemplars]
    vectors = embed_many(
        encoder, texts, batch_size, progress=stderr_progress("embedding") if progress else None
    )
    embed_s = time.perf_counter() - started
    tuning = _tune(vectors, exemplar_set, table, settings, decision) if tune else None
    projection = None
    learned = settings.projection == "learned" or (
        settings.projection == "auto" and tuning is not None and tuning.projection
    )
    if learned and exemplar_set.kind is ExemplarKind.LABELLED:
        from semroute.tune.folds import one_blas_thread

        strength = tuning.extra.get("projection_strength") if tuning is not None else None
        with one_blas_thread():
            projection = learn_projection(vectors, exemplar_set, settings, strength)
    return write_version(
        out_root,
        exemplar_set,
        table,
        vectors,
        encoder=encoder,
        settings=settings,
        encoder_path=encoder_path,
        stats={"embed_seconds": round(embed_s, 3)},
        projection=projection,
        tuning=tuning,
        static_model=static_model,
        decision=decision,
    )


def _tune(
    vectors: Vectors,
    exemplar_set: ExemplarSet,
    table: RouteTable,
    settings: IndexSettings,
    decision: DecisionSettings,
) -> BuildTuning | None:
    weights = np.asarray([e.weight for e in exemplar_set.exemplars], dtype=np.float32)
    if exemplar_set.kind is ExemplarKind.LABELLED:
        return tune_labelled_build(
            vectors, [e.label for e in exemplar_set.exemplars], weights,
            null_similarity=decision.null_similarity,
            projection=settings.projection,
            projection_epochs=settings.projection_epochs,
        )
    costs = [table.targets[t].cost if t in table.targets else 0.0 for t in exemplar_set.targets]
    return tune_outcome_build(vectors, _score_matrix(exemplar_set), costs, weights)


def _score_matrix(exemplar_set: ExemplarSet) -> npt.NDArray[np.float32]:
    return np.asarray(
        [
            [np.nan if e.scores.get(t) is None else e.scores[t] for t in exemplar_set.targets]
            for e in exemplar_set.exemplars
        ],
        dtype=np.float32,
    )


def learn_projection(
    vectors: Vectors, exemplar_set: ExemplarSet, settings: IndexSettings,
    strength: float | None = None,
) -> npt.NDArray[np.float32] | None:
    """Fit the learned projection on a labelled set (None with fewer than two routes), at
    ``strength`` (the build's tuned one; None: chosen by CV here, ``projection``)."""
    from semroute.projection import ProjectionParams, fit_projection

    labels = [e.label for e in exemplar_set.exemplars]
    if len(set(labels)) < 2:
        return None
    started = time.perf_counter()
    matrix = fit_projection(vectors, labels, ProjectionParams(epochs=settings.projection_epochs,
                                                              strength=strength))
    log.info("projection_learned", exemplars=len(labels),
             seconds=round(time.perf_counter() - started, 2))
    return matrix


def write_version(
    out_root: Path,
    exemplar_set: ExemplarSet,
    table: RouteTable,
    vectors: Vectors,
    *,
    encoder: Encoder,
    settings: IndexSettings,
    encoder_path: Path | None = None,
    stats: Mapping[str, float] | None = None,
    projection: npt.NDArray[np.float32] | None = None,
    tuning: BuildTuning | None = None,
    static_model: StaticEncoder | None = None,
    decision: DecisionSettings | None = None,
) -> Path:
    """Write an index version from already-computed vectors and switch ``current`` to it.

    With ``static_model`` (labelled sets), the two-stage encoder's static stage is fitted and
    stored too (semroute.two_stage; ``decision``: the settings the router will run with).

    With ``projection`` (d, d'), FAISS holds the projected vectors and the matrix is stored
    alongside so queries are projected the same way. With a tuning that carries an abstention
    score, each exemplar's own density is stored for it (in the space FAISS searches).
    """
    import faiss

    from semroute.abstain import DENSITY_K, own_density
    from semroute.tune.folds import top_neighbours

    n, dimension = vectors.shape
    if projection is not None:
        from semroute.projection import apply_projection

        vectors = apply_projection(vectors, projection)
    factory, exact = index_factory(
        settings.faiss, n, vectors.shape[1], exact_max=settings.exact_max,
        approx_factory=settings.approx_factory,
    )
    index = new_faiss_index(factory, vectors)
    nprobe = settings.ivf_nprobe if settings.faiss in ("ivf-sq", "ivfpq") else 0
    set_search_params(index, ef_search=settings.hnsw_ef_search, nprobe=nprobe)
    index.add(vectors)

    built_at = datetime.now(UTC)
    content = hashlib.sha256(vectors.tobytes()).hexdigest()[:8]
    version = f"{built_at.strftime('%Y%m%dT%H%M%S%fZ')}-{content}"
    out_root = Path(out_root)
    tmp = _staging_dir(out_root)
    try:
        faiss.write_index(index, str(tmp / FAISS_FILE))
        columns = _write_exemplars(tmp, exemplar_set.exemplars)
        files = [FAISS_FILE, EXEMPLARS_FILE, *columns.files]
        target_means = _write_scores(tmp, exemplar_set, files)
        if projection is not None:
            np.save(tmp / PROJECTION_FILE, projection.astype(np.float32), allow_pickle=False)
            files.append(PROJECTION_FILE)
        abstain = tuning.abstain if tuning is not None else None
        density = None
        if abstain is not None:
            sims, _ = top_neighbours(vectors, vectors, DENSITY_K, exclude_self=True)
            density = own_density(sims, DENSITY_K).astype(np.float32)
            np.save(tmp / DENSITY_FILE, density, allow_pickle=False)
            files.append(DENSITY_FILE)
        static = None
        if static_model is not None and exemplar_set.kind is ExemplarKind.LABELLED:
            from semroute.two_stage import write_static_stage

            static = write_static_stage(
                tmp, static_model, [e.text for e in exemplar_set.exemplars],
                [e.label for e in exemplar_set.exemplars],
                np.asarray([e.weight for e in exemplar_set.exemplars], dtype=np.float32),
                index, vectors, table, decision or DecisionSettings(),
                dict(tuning.decision) if tuning else {}, abstain, density,
                encoder_fingerprint=encoder.fingerprint,
                factory="Flat" if n <= settings.exact_max else settings.approx_factory,
                ef_search=settings.hnsw_ef_search,
            )
            files.extend((static.file, static.map_file))
        manifest = IndexManifest(
            version=version,
            built_at=built_at.isoformat(),
            kind=exemplar_set.kind,
            counts=Counts(n, _label_counts(exemplar_set.exemplars),
                          exemplar_set.dropped_duplicates),
            encoder=EncoderRecord(
                encoder.fingerprint, dimension,
                str(Path(encoder_path).resolve()) if encoder_path else "",
            ),
            faiss=FaissRecord(factory, exact, settings.hnsw_ef_search, kind=settings.faiss,
                              nprobe=nprobe),
            route_table=table,
            checksums={name: _sha256(tmp / name) for name in files},
            projection=(
                ProjectionRecord(PROJECTION_FILE, "learned", projection.shape[1])
                if projection is not None else None
            ),
            score_targets=tuple(exemplar_set.targets),
            target_means=target_means,
            stats=dict(stats or {}),
            decision=dict(tuning.decision) if tuning else {},
            tuning=dict(tuning.figures) if tuning else {},
            abstain=abstain,
            density=DENSITY_FILE if abstain is not None else None,
            static=static,
            columns=columns,
        )
        final = _commit_version(tmp, manifest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    switch_current(out_root, final)
    return final


def write_prebuilt_version(
    out_root: Path,
    faiss_file: Path,
    exemplar_set: ExemplarSet,
    table: RouteTable,
    *,
    encoder_record: EncoderRecord,
    faiss_record: FaissRecord,
    stats: Mapping[str, float] | None = None,
) -> Path:
    """Write an index version around an already-built FAISS index file and switch ``current``
    to it: the layout ``write_version`` writes (index.faiss, exemplars.jsonl and its columns,
    scores for an outcome set, a manifest with every file's checksum), untuned: no decision
    settings, abstention model, density, projection or static stage.

    For vectors embedded and indexed elsewhere, e.g. a benchmark's synthetic million: row i
    of ``faiss_file`` is ``exemplar_set.exemplars[i]``, searched as ``faiss_record`` says.
    The file is hard-linked when it can be (version files are never rewritten), else copied.
    Raises CorruptIndex, writing nothing, when its rows or dimension do not fit. Returns the
    new version directory.
    """
    import faiss

    n = len(exemplar_set.exemplars)
    index = faiss.read_index(str(faiss_file), read_flags(faiss_record.kind, True))
    if index.ntotal != n or index.d != encoder_record.dimension:
        raise CorruptIndex(
            f"{faiss_file}: {index.ntotal} vectors of dimension {index.d}, but {n} exemplars and "
            f"encoder dimension {encoder_record.dimension}; build the FAISS file over these rows"
        )
    del index
    out_root = Path(out_root)
    tmp = _staging_dir(out_root)
    try:
        try:
            os.link(faiss_file, tmp / FAISS_FILE)
        except OSError:
            shutil.copyfile(faiss_file, tmp / FAISS_FILE)
        columns = _write_exemplars(tmp, exemplar_set.exemplars)
        files = [FAISS_FILE, EXEMPLARS_FILE, *columns.files]
        target_means = _write_scores(tmp, exemplar_set, files)
        checksums = {name: _sha256(tmp / name) for name in files}
        built_at = datetime.now(UTC)
        manifest = IndexManifest(
            version=f"{built_at.strftime('%Y%m%dT%H%M%S%fZ')}-{checksums[FAISS_FILE][:8]}",
            built_at=built_at.isoformat(),
            kind=exemplar_set.kind,
            counts=Counts(n, _label_counts(exemplar_set.exemplars),
                          exemplar_set.dropped_duplicates),
            encoder=encoder_record,
            faiss=faiss_record,
            route_table=table,
            checksums=checksums,
            score_targets=tuple(exemplar_set.targets),
            target_means=target_means,
            stats=dict(stats or {}),
            columns=columns,
        )
        final = _commit_version(tmp, manifest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    switch_current(out_root, final)
    return final


def _staging_dir(out_root: Path) -> Path:
    """A new hidden directory under ROOT/versions to write a version in."""
    versions = out_root / "versions"
    versions.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=".build-", dir=versions))


def _commit_version(tmp: Path, manifest: IndexManifest) -> Path:
    """Write the manifest last, then rename the staged directory to versions/<version>."""
    (tmp / MANIFEST).write_text(json.dumps(manifest.to_json(), indent=2) + "\n")
    tmp.chmod(0o755)
    final = tmp.parent / manifest.version
    tmp.rename(final)
    return final


def _write_exemplars(version_dir: Path, exemplars: Sequence[Exemplar]) -> ColumnsRecord:
    """exemplars.jsonl (row i = FAISS id i) and its columns beside it (labels, weights, the
    rows' byte offsets)."""
    names = sorted({e.label for e in exemplars})
    code = {name: i for i, name in enumerate(names)}
    lengths = np.empty(len(exemplars), dtype=np.int64)
    with (version_dir / EXEMPLARS_FILE).open("wb") as fh:
        for i, e in enumerate(exemplars):
            row = {"text": e.text, "label": e.label, "weight": e.weight, "source": e.source}
            line = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
            fh.write(line)
            lengths[i] = len(line)
    offsets = np.zeros(len(exemplars) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    codes = np.fromiter((code[e.label] for e in exemplars), dtype=np.int32, count=len(exemplars))
    weights = np.fromiter((e.weight for e in exemplars), dtype=np.float32, count=len(exemplars))
    np.save(version_dir / LABELS_FILE, codes, allow_pickle=False)
    np.save(version_dir / WEIGHTS_FILE, weights, allow_pickle=False)
    np.save(version_dir / OFFSETS_FILE, offsets, allow_pickle=False)
    return ColumnsRecord(LABELS_FILE, tuple(names), WEIGHTS_FILE, OFFSETS_FILE)


def _write_scores(version_dir: Path, exemplar_set: ExemplarSet, files: list[str]) -> dict[str, float]:
    """An outcome set's score matrix (scores.npy, appended to ``files``); its targets' means."""
    if exemplar_set.kind is not ExemplarKind.OUTCOMES:
        return {}
    scores = _score_matrix(exemplar_set)
    np.save(version_dir / SCORES_FILE, scores, allow_pickle=False)
    files.append(SCORES_FILE)
    return {
        t: float(np.nanmean(scores[:, j])) if np.isfinite(scores[:, j]).any() else 0.0
        for j, t in enumerate(exemplar_set.targets)
    }


def _label_counts(exemplars: Sequence[Exemplar]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for e in exemplars:
        if e.label:
            counts[e.label] = counts.get(e.label, 0) + 1
    return counts


def switch_current(root: Path, version_dir: Path) -> None:
    """Point ROOT/current at ``version_dir`` atomically (symlink + rename)."""
    link = root / CURRENT
    tmp_link = root / f".{CURRENT}.tmp-{os.getpid()}"
    if tmp_link.is_symlink() or tmp_link.exists():
        tmp_link.unlink()
    os.symlink(os.path.relpath(version_dir, root), tmp_link)
    os.replace(tmp_link, link)


def write_thresholds(
    version_dir: Path, global_threshold: float | None, per_route: dict[str, float]
) -> None:
    """Record calibrated thresholds in a version's manifest (atomic rewrite).

    They take precedence over the routes file's thresholds when the index is loaded.
    """
    version_dir = resolve_version_dir(version_dir)
    manifest = read_manifest(version_dir)
    unknown = set(per_route) - set(manifest.route_table.routes)
    if unknown:
        raise IndexNotFound(f"{version_dir}: thresholds for unknown route(s) {sorted(unknown)}")
    manifest = replace(manifest, thresholds=Thresholds(global_threshold, dict(per_route)))
    tmp = version_dir / f".{MANIFEST}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(manifest.to_json(), indent=2) + "\n")
    os.replace(tmp, version_dir / MANIFEST)
