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

A build validates every input before writing anything, writes a new version directory, and only
then moves ``current``; a failed build leaves the serving index as it was.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from semroute.config import IndexSettings
from semroute.encoder import embed_many
from semroute.errors import CorruptIndex, FingerprintMismatch, IndexNotFound
from semroute.exemplars import ExemplarSet, load_route_table, read_exemplars
from semroute.types import Encoder, ExemplarKind, IndexInfo, Route, RouteTable, Target, Vectors

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
FAISS_FILE = "index.faiss"
EXEMPLARS_FILE = "exemplars.jsonl"
SCORES_FILE = "scores.npy"
PROJECTION_FILE = "projection.npy"
CURRENT = "current"


class ExemplarIndex:
    """A loaded, checked index version. Immutable once loaded (reloads build a new object)."""

    def __init__(
        self,
        path: Path,
        manifest: dict[str, Any],
        faiss_index: Any,
        texts: list[str],
        labels: npt.NDArray[np.str_],
        weights: npt.NDArray[np.float32],
        scores: npt.NDArray[np.float32] | None,
        projection: npt.NDArray[np.float32] | None = None,
    ) -> None:
        self.path = path
        self.projection = projection
        self.manifest = manifest
        self._faiss = faiss_index
        self.texts = texts
        self.labels = labels
        self.weights = weights
        self.kind = ExemplarKind(manifest["kind"])
        self.score_targets: tuple[str, ...] = tuple(manifest.get("score_targets", ()))
        self.scores = scores if scores is not None else np.zeros((len(texts), 0), dtype=np.float32)
        self.route_table = _route_table_from_manifest(manifest)
        self.target_means = np.asarray(
            [manifest.get("target_means", {}).get(t, 0.0) for t in self.score_targets],
            dtype=np.float32,
        )

    @property
    def version(self) -> str:
        return str(self.manifest["version"])

    @property
    def encoder_fingerprint(self) -> str:
        return str(self.manifest["encoder"]["fingerprint"])

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
            dimension=int(self.manifest["encoder"]["dimension"]),
            routes=tuple(self.route_table.routes),
            targets=tuple(self.route_table.targets),
            encoder_fingerprint=self.encoder_fingerprint,
            faiss_factory=str(self.manifest["faiss"]["factory"]),
            built_at=str(self.manifest["built_at"]),
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

    @classmethod
    def load(cls, path: Path, expect_fingerprint: str | None = None) -> ExemplarIndex:
        """Load and check an index: ROOT (follows ROOT/current) or a version directory.

        Raises IndexNotFound, CorruptIndex (checksum, format, counts) or FingerprintMismatch,
        each saying what to do.
        """
        import faiss

        version_dir = resolve_version_dir(path)
        manifest = read_manifest(version_dir)
        if manifest.get("format") != FORMAT_VERSION:
            raise CorruptIndex(
                f"{version_dir}/{MANIFEST}: format {manifest.get('format')!r} is not supported "
                f"(this semroute reads format {FORMAT_VERSION}); rebuild with `semroute index build`"
            )
        _verify_checksums(version_dir, manifest)
        if (
            expect_fingerprint is not None
            and manifest["encoder"]["fingerprint"] != expect_fingerprint
        ):
            raise FingerprintMismatch(
                f"{version_dir}: index was built with encoder {manifest['encoder']['fingerprint'][:19]}… "
                f"but the loaded encoder is {expect_fingerprint[:19]}…; rebuild the index with this "
                f"encoder (`semroute index build ... --encoder DIR`) or load the encoder it was "
                f"built with ({manifest['encoder'].get('path', '?')})"
            )
        faiss_index = faiss.read_index(str(version_dir / FAISS_FILE))
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
        if manifest["kind"] == ExemplarKind.OUTCOMES.value:
            scores = np.load(version_dir / SCORES_FILE, allow_pickle=False).astype(np.float32)
        count = int(manifest["counts"]["exemplars"])
        if (
            faiss_index.ntotal != count
            or len(texts) != count
            or (scores is not None and scores.shape[0] != count)
        ):
            raise CorruptIndex(
                f"{version_dir}: manifest says {count} exemplars but the files hold "
                f"{faiss_index.ntotal} vectors / {len(texts)} rows; rebuild the index"
            )
        projection = None
        expected_d = int(manifest["encoder"]["dimension"])
        if manifest.get("projection"):
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
        if hasattr(faiss_index, "hnsw"):
            faiss_index.hnsw.efSearch = int(manifest["faiss"].get("ef_search", 64))
        return cls(
            version_dir,
            manifest,
            faiss_index,
            texts,
            np.asarray(labels, dtype=np.str_),
            np.asarray(weights, dtype=np.float32),
            scores,
            projection,
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


def read_manifest(version_dir: Path) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads((version_dir / MANIFEST).read_text())
    except FileNotFoundError as exc:
        raise IndexNotFound(f"{version_dir}: {MANIFEST} missing") from exc
    except json.JSONDecodeError as exc:
        raise CorruptIndex(
            f"{version_dir}/{MANIFEST}:{exc.lineno}: invalid JSON ({exc.msg}); rebuild the index"
        ) from exc
    return data


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _verify_checksums(version_dir: Path, manifest: dict[str, Any]) -> None:
    for name, expected in manifest.get("checksums", {}).items():
        file = version_dir / name
        if not file.exists():
            raise CorruptIndex(f"{file}: missing; rebuild the index")
        if _sha256(file) != expected:
            raise CorruptIndex(
                f"{file}: checksum mismatch (the file was changed or truncated); rebuild the index"
            )


def _route_table_from_manifest(manifest: dict[str, Any]) -> RouteTable:
    raw = manifest["route_table"]
    calibrated = manifest.get("thresholds") or {}
    per_route = calibrated.get("per_route", {})
    routes = {
        name: Route(
            name,
            tuple(spec["targets"]),
            per_route.get(name, spec.get("threshold")),
            spec.get("description", ""),
        )
        for name, spec in raw["routes"].items()
    }
    targets = {name: Target(**spec) for name, spec in raw["targets"].items()}
    threshold = calibrated.get("global")
    if threshold is None:
        threshold = raw.get("threshold")
    return RouteTable(routes, targets, raw.get("default_route"), threshold)


def _route_table_to_json(table: RouteTable) -> dict[str, Any]:
    return {
        "routes": {
            name: {
                "targets": list(route.targets),
                "threshold": route.threshold,
                "description": route.description,
            }
            for name, route in table.routes.items()
        },
        "targets": {name: asdict(t) for name, t in table.targets.items()},
        "default_route": table.default_route,
        "threshold": table.threshold,
    }


# ---- build ---------------------------------------------------------------------------------------


def build_index(
    exemplar_paths: Sequence[Path],
    out_root: Path,
    encoder: Encoder,
    *,
    routes_file: Path | None = None,
    targets_file: Path | None = None,
    settings: IndexSettings | None = None,
    batch_size: int = 64,
    progress: bool = True,
    encoder_path: Path | None = None,
) -> Path:
    """Validate, embed, write a new version under ``out_root`` and switch ``current`` to it.

    Nothing is written unless every row and the routes file are valid (ExemplarError /
    ConfigError otherwise). Returns the new version directory.
    """
    settings = settings or IndexSettings()
    exemplar_set = read_exemplars(list(exemplar_paths))
    table = load_route_table(
        routes_file, exemplar_set.labels, targets_file, outcome_targets=exemplar_set.targets
    )
    for warning in exemplar_set.warnings[:20]:
        print(f"warning: {warning}", file=sys.stderr)
    if len(exemplar_set.warnings) > 20:
        print(f"warning: ... and {len(exemplar_set.warnings) - 20} more", file=sys.stderr)

    started = time.perf_counter()
    texts = [e.text for e in exemplar_set.exemplars]
    vectors = embed_many(encoder, texts, batch_size, progress=progress)
    embed_s = time.perf_counter() - started
    projection = None
    if settings.projection == "learned" and exemplar_set.kind is ExemplarKind.LABELLED:
        projection = learn_projection(vectors, exemplar_set, settings, progress)
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
    )


def learn_projection(
    vectors: Vectors, exemplar_set: ExemplarSet, settings: IndexSettings, progress: bool = True
) -> npt.NDArray[np.float32] | None:
    """Fit the learned projection on a labelled set (None with fewer than two routes)."""
    from semroute.projection import ProjectionParams, fit_projection

    labels = [e.label for e in exemplar_set.exemplars]
    if len(set(labels)) < 2:
        return None
    started = time.perf_counter()
    matrix = fit_projection(vectors, labels, ProjectionParams(epochs=settings.projection_epochs))
    if progress:
        print(
            f"learned projection on {len(labels)} exemplars in "
            f"{time.perf_counter() - started:.1f}s",
            file=sys.stderr,
        )
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
    stats: dict[str, Any] | None = None,
    projection: npt.NDArray[np.float32] | None = None,
) -> Path:
    """Write an index version from already-computed vectors and switch ``current`` to it.

    With ``projection`` (d, d'), FAISS holds the projected vectors and the matrix is stored
    alongside so queries are projected the same way.
    """
    import faiss

    n, dimension = vectors.shape
    if projection is not None:
        from semroute.projection import apply_projection

        vectors = apply_projection(vectors, projection)
    exact = n <= settings.exact_max
    factory = "Flat" if exact else settings.approx_factory
    index = faiss.index_factory(vectors.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        index.train(vectors)
    if hasattr(index, "hnsw"):
        index.hnsw.efSearch = settings.hnsw_ef_search
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
        target_means: dict[str, float] = {}
        if exemplar_set.kind is ExemplarKind.OUTCOMES:
            scores = np.asarray(
                [
                    [
                        np.nan if e.scores.get(t) is None else e.scores[t]
                        for t in exemplar_set.targets
                    ]
                    for e in exemplar_set.exemplars
                ],
                dtype=np.float32,
            )
            np.save(tmp / SCORES_FILE, scores, allow_pickle=False)
            target_means = {
                t: float(np.nanmean(scores[:, j])) if np.isfinite(scores[:, j]).any() else 0.0
                for j, t in enumerate(exemplar_set.targets)
            }
        files = [FAISS_FILE, EXEMPLARS_FILE] + (
            [SCORES_FILE] if exemplar_set.kind is ExemplarKind.OUTCOMES else []
        )
        if projection is not None:
            np.save(tmp / PROJECTION_FILE, projection.astype(np.float32), allow_pickle=False)
            files.append(PROJECTION_FILE)
        label_counts: dict[str, int] = {}
        for e in exemplar_set.exemplars:
            if e.label:
                label_counts[e.label] = label_counts.get(e.label, 0) + 1
        manifest = {
            "format": FORMAT_VERSION,
            "version": version,
            "built_at": built_at.isoformat(),
            "kind": exemplar_set.kind.value,
            "counts": {
                "exemplars": n,
                "per_label": label_counts,
                "dropped_duplicates": exemplar_set.dropped_duplicates,
            },
            "encoder": {
                "fingerprint": encoder.fingerprint,
                "dimension": dimension,
                "path": str(Path(encoder_path).resolve()) if encoder_path else "",
            },
            "faiss": {
                "factory": factory,
                "metric": "inner_product",
                "exact": exact,
                "ef_search": settings.hnsw_ef_search,
            },
            "projection": (
                {"file": PROJECTION_FILE, "method": "learned", "dimension": projection.shape[1]}
                if projection is not None
                else None
            ),
            "score_targets": list(exemplar_set.targets),
            "target_means": target_means,
            "route_table": _route_table_to_json(table),
            "thresholds": {},
            "stats": stats or {},
            "checksums": {name: _sha256(tmp / name) for name in files},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
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
    unknown = set(per_route) - set(manifest["route_table"]["routes"])
    if unknown:
        raise IndexNotFound(f"{version_dir}: thresholds for unknown route(s) {sorted(unknown)}")
    manifest["thresholds"] = {"global": global_threshold, "per_route": dict(per_route)}
    tmp = version_dir / f".{MANIFEST}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, version_dir / MANIFEST)
