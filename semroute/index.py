"""The exemplar index artifact: build, save, load (with checks), search.

Layout of an index root::

    ROOT/
      current -> versions/<version>        symlink, switched atomically by os.replace
      versions/<version>/
        manifest.json     format, version, kind, counts, encoder fingerprint, routes, targets,
                          thresholds, checksums of every other file
        index.faiss       inner-product FAISS index over L2-normalised embeddings (= cosine)
        exemplars.jsonl   one exemplar per line (text, label, weight, source), row i = FAISS id i
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
import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

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
    Counts,
    EncoderRecord,
    FaissRecord,
    IndexManifest,
    ProjectionRecord,
    Thresholds,
)
from semroute.static_encoder import StaticEncoder
from semroute.tune import BuildTuning, tune_labelled_build, tune_outcome_build
from semroute.types import Encoder, ExemplarKind, IndexInfo, RouteTable, Vectors

__all__ = ["FORMAT_VERSION", "ExemplarIndex", "IndexManifest", "build_index", "read_manifest",
           "resolve_version_dir", "switch_current", "write_thresholds", "write_version"]

log = get_logger(__name__)

MANIFEST = "manifest.json"
FAISS_FILE = "index.faiss"
EXEMPLARS_FILE = "exemplars.jsonl"
SCORES_FILE = "scores.npy"
PROJECTION_FILE = "projection.npy"
DENSITY_FILE = "density.npy"
CURRENT = "current"


class ExemplarIndex:
    """A loaded, checked index version. Immutable once loaded (reloads build a new object)."""

    def __init__(
        self,
        path: Path,
        manifest: IndexManifest,
        faiss_index: Any,
        texts: list[str],
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
        """Top-k by cosine similarity. Returns (sims, ids), both (n, k); missing slots have id -1."""
        k = min(k, self.size)
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
        texts: list[str] = []
        labels: list[str] = []
        weights: list[float] = []
        with (version_dir / EXEMPLARS_FILE).open(encoding="utf-8") as fh:
            for line in fh:
                row = json.loads(line)
                texts.append(row["text"])
                labels.append(row.get("label", ""))
                weights.append(float(row.get("weight", 1.0)))
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
            np.asarray(labels, dtype=np.str_),
            np.asarray(weights, dtype=np.float32),
            scores,
            projection,
            density,
        )


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
    settings = settings or IndexSettings()
    decision = decision or DecisionSettings()
    exemplar_set = read_exemplars(list(exemplar_paths))
    table = load_route_table(
        routes_file, exemplar_set.labels, targets_file, outcome_targets=exemplar_set.targets,
        default_route=default_route,
    )
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

        with one_blas_thread():
            projection = learn_projection(vectors, exemplar_set, settings)
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
    vectors: Vectors, exemplar_set: ExemplarSet, settings: IndexSettings
) -> npt.NDArray[np.float32] | None:
    """Fit the learned projection on a labelled set (None with fewer than two routes)."""
    from semroute.projection import ProjectionParams, fit_projection

    labels = [e.label for e in exemplar_set.exemplars]
    if len(set(labels)) < 2:
        return None
    started = time.perf_counter()
    matrix = fit_projection(vectors, labels, ProjectionParams(epochs=settings.projection_epochs))
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
    versions = out_root / "versions"
    versions.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=versions))
    try:
        faiss.write_index(index, str(tmp / FAISS_FILE))
        with (tmp / EXEMPLARS_FILE).open("w", encoding="utf-8") as fh:
            for e in exemplar_set.exemplars:
                row = {"text": e.text, "label": e.label, "weight": e.weight, "source": e.source}
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        files = [FAISS_FILE, EXEMPLARS_FILE]
        target_means: dict[str, float] = {}
        if exemplar_set.kind is ExemplarKind.OUTCOMES:
            scores = _score_matrix(exemplar_set)
            np.save(tmp / SCORES_FILE, scores, allow_pickle=False)
            files.append(SCORES_FILE)
            target_means = {
                t: float(np.nanmean(scores[:, j])) if np.isfinite(scores[:, j]).any() else 0.0
                for j, t in enumerate(exemplar_set.targets)
            }
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
        label_counts: dict[str, int] = {}
        for e in exemplar_set.exemplars:
            if e.label:
                label_counts[e.label] = label_counts.get(e.label, 0) + 1
        manifest = IndexManifest(
            version=version,
            built_at=built_at.isoformat(),
            kind=exemplar_set.kind,
            counts=Counts(n, label_counts, exemplar_set.dropped_duplicates),
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
        )
        (tmp / MANIFEST).write_text(json.dumps(manifest.to_json(), indent=2) + "\n")
        tmp.chmod(0o755)
        final = versions / version
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    switch_current(out_root, final)
    return final


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
