"""The index manifest as a typed record, and its JSON form (format 1).

Format 1 grew additively: ``decision`` (settings chosen by the build's tuner), ``tuning`` (its
cross-validated figures), ``abstain`` (the abstention score's weights) and ``density`` (the file
of each exemplar's own density) are absent from older indexes, which still load and behave as
before (vote share as confidence, the settings' decision values). ``columns`` (the exemplars'
labels, weights and row offsets as .npy files beside exemplars.jsonl) is absent too from older
indexes, which load their exemplars from the JSON lines instead; exemplars.jsonl is still
written, so an older semroute reads a newer index.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from semroute.abstain import AbstainModel
from semroute.errors import CorruptIndex
from semroute.types import ExemplarKind, Route, RouteTable, Target

FORMAT_VERSION = 1
JsonDict = dict[str, Any]


@dataclass(frozen=True)
class EncoderRecord:
    fingerprint: str
    dimension: int
    path: str = ""


@dataclass(frozen=True)
class FaissRecord:
    factory: str
    exact: bool
    ef_search: int
    metric: str = "inner_product"
    # Added with the opt-in index types (semroute.index_types); older manifests read as auto.
    kind: str = "auto"
    nprobe: int = 0


@dataclass(frozen=True)
class ProjectionRecord:
    file: str
    method: str
    dimension: int


@dataclass(frozen=True)
class StaticRecord:
    """The two-stage encoder's static stage (semroute.two_stage): the static model the exemplars
    were embedded with (its fingerprint and its source encoder's), the files of their mapped
    vectors' FAISS index and of the map, and the fitted gate."""

    file: str
    map_file: str
    fingerprint: str
    source_fingerprint: str
    dimension: int
    path: str
    temperature: float
    null_similarity: float | None
    threshold: float  # inf: the gate answers nothing
    k: int
    thresholds_key: str
    min_similarity: float = -1.0  # the static stage answers no query less close to an exemplar
    figures: Mapping[str, float] = field(default_factory=dict)
    # Per route threshold 0.00, 0.01, ..., 1.00: the least estimated confidence at which the
    # static stage decides a route held to that threshold (inf: never; empty: no scope fit).
    scope_cuts: tuple[float, ...] = ()

    def to_json(self) -> JsonDict:
        out = asdict(self)
        out["threshold"] = self.threshold if self.threshold != float("inf") else None
        out["figures"] = dict(self.figures)
        out["scope_cuts"] = [c if c != float("inf") else None for c in self.scope_cuts]
        return out

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> StaticRecord:
        threshold = raw.get("threshold")
        null = raw.get("null_similarity")
        return cls(
            str(raw["file"]), str(raw["map_file"]), str(raw["fingerprint"]),
            str(raw["source_fingerprint"]),
            int(raw["dimension"]), str(raw.get("path", "")), float(raw["temperature"]),
            None if null is None else float(null),
            float("inf") if threshold is None else float(threshold), int(raw["k"]),
            str(raw["thresholds_key"]), float(raw.get("min_similarity", -1.0)),
            dict(raw.get("figures") or {}),
            tuple(float("inf") if c is None else float(c) for c in raw.get("scope_cuts") or ()),
        )


@dataclass(frozen=True)
class ColumnsRecord:
    """The exemplars' columns the router needs to decide, beside exemplars.jsonl so loading
    parses no JSON: each row's label as an int32 code into ``label_names``, its weight
    (float32), and the byte offsets of the rows in exemplars.jsonl (int64, rows + 1 of them,
    the last the file's size) from which a text is read when asked."""

    labels: str
    label_names: tuple[str, ...]
    weights: str
    offsets: str

    @property
    def files(self) -> tuple[str, str, str]:
        return (self.labels, self.weights, self.offsets)

    def to_json(self) -> JsonDict:
        out = asdict(self)
        out["label_names"] = list(self.label_names)
        return out

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> ColumnsRecord:
        names = raw["label_names"]
        if not isinstance(names, list) or not all(isinstance(x, str) for x in names):
            raise TypeError("columns.label_names is not a list of strings")
        return cls(str(raw["labels"]), tuple(names), str(raw["weights"]), str(raw["offsets"]))


@dataclass(frozen=True)
class Counts:
    exemplars: int
    per_label: Mapping[str, int] = field(default_factory=dict)
    dropped_duplicates: int = 0


@dataclass(frozen=True)
class Thresholds:
    """Calibrated thresholds (``semroute calibrate``); they beat the routes file's."""

    global_threshold: float | None = None
    per_route: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class IndexManifest:
    """Everything an index version records about itself. ``route_table`` is the table from the
    build (routes file or one route per label); ``effective_route_table`` applies calibration."""

    version: str
    built_at: str
    kind: ExemplarKind
    counts: Counts
    encoder: EncoderRecord
    faiss: FaissRecord
    route_table: RouteTable
    checksums: Mapping[str, str]
    projection: ProjectionRecord | None = None
    score_targets: tuple[str, ...] = ()
    target_means: Mapping[str, float] = field(default_factory=dict)
    thresholds: Thresholds = Thresholds()
    stats: Mapping[str, float] = field(default_factory=dict)
    decision: Mapping[str, float | int | bool] = field(default_factory=dict)
    tuning: Mapping[str, Any] = field(default_factory=dict)
    abstain: AbstainModel | None = None
    density: str | None = None
    static: StaticRecord | None = None
    columns: ColumnsRecord | None = None
    format: int = FORMAT_VERSION

    def effective_route_table(self) -> RouteTable:
        t = self.route_table
        per_route = self.thresholds.per_route
        routes = {
            name: replace(route, threshold=per_route.get(name, route.threshold))
            for name, route in t.routes.items()
        }
        threshold = self.thresholds.global_threshold
        return RouteTable(routes, t.targets, t.default_route,
                          t.threshold if threshold is None else threshold)

    def to_json(self) -> JsonDict:
        return {
            "format": self.format,
            "version": self.version,
            "built_at": self.built_at,
            "kind": self.kind.value,
            "counts": {"exemplars": self.counts.exemplars, "per_label": dict(self.counts.per_label),
                       "dropped_duplicates": self.counts.dropped_duplicates},
            "encoder": asdict(self.encoder),
            "faiss": asdict(self.faiss),
            "projection": asdict(self.projection) if self.projection else None,
            "score_targets": list(self.score_targets),
            "target_means": dict(self.target_means),
            "route_table": route_table_to_json(self.route_table),
            "thresholds": (
                {"global": self.thresholds.global_threshold,
                 "per_route": dict(self.thresholds.per_route)}
                if self.thresholds != Thresholds() else {}
            ),
            "stats": dict(self.stats),
            "decision": dict(self.decision),
            "tuning": dict(self.tuning),
            "abstain": self.abstain.to_dict() if self.abstain else None,
            "density": self.density,
            "static": self.static.to_json() if self.static else None,
            "columns": self.columns.to_json() if self.columns else None,
            "checksums": dict(self.checksums),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], where: Path) -> IndexManifest:
        """Parse a manifest; CorruptIndex names the file and the missing or bad field."""
        if data.get("format") != FORMAT_VERSION:
            raise CorruptIndex(
                f"{where}: format {data.get('format')!r} is not supported (this semroute reads "
                f"format {FORMAT_VERSION}); rebuild with `semroute index build`"
            )
        try:
            enc, fa, counts = data["encoder"], data["faiss"], data["counts"]
            proj = data.get("projection")
            thr = data.get("thresholds") or {}
            abstain = data.get("abstain")
            return cls(
                version=str(data["version"]),
                built_at=str(data["built_at"]),
                kind=ExemplarKind(data["kind"]),
                counts=Counts(int(counts["exemplars"]), dict(counts.get("per_label", {})),
                              int(counts.get("dropped_duplicates", 0))),
                encoder=EncoderRecord(str(enc["fingerprint"]), int(enc["dimension"]),
                                      str(enc.get("path", ""))),
                faiss=FaissRecord(str(fa["factory"]), bool(fa.get("exact", True)),
                                  int(fa.get("ef_search", 64)), str(fa.get("metric", "inner_product")),
                                  str(fa.get("kind", "auto")), int(fa.get("nprobe", 0))),
                route_table=route_table_from_json(data["route_table"]),
                checksums=dict(data.get("checksums", {})),
                projection=(ProjectionRecord(str(proj["file"]), str(proj["method"]),
                                             int(proj["dimension"])) if proj else None),
                score_targets=tuple(data.get("score_targets", ())),
                target_means=dict(data.get("target_means", {})),
                thresholds=Thresholds(thr.get("global"), dict(thr.get("per_route", {}))),
                stats=dict(data.get("stats", {})),
                decision=dict(data.get("decision") or {}),
                tuning=dict(data.get("tuning") or {}),
                abstain=AbstainModel.from_dict(abstain) if abstain else None,
                density=data.get("density"),
                static=StaticRecord.from_json(data["static"]) if data.get("static") else None,
                columns=(ColumnsRecord.from_json(data["columns"]) if data.get("columns")
                         else None),
            )
        except (KeyError, TypeError, ValueError, AssertionError) as exc:
            raise CorruptIndex(
                f"{where}: missing or invalid field ({exc!r}); rebuild the index"
            ) from exc


def route_table_to_json(table: RouteTable) -> JsonDict:
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


def route_table_from_json(raw: Mapping[str, Any]) -> RouteTable:
    routes = {
        name: Route(name, tuple(spec["targets"]), spec.get("threshold"),
                    spec.get("description", ""))
        for name, spec in raw["routes"].items()
    }
    targets = {name: Target(**spec) for name, spec in raw["targets"].items()}
    return RouteTable(routes, targets, raw.get("default_route"), raw.get("threshold"))
