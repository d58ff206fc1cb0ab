"""Two-stage routing: the static model decides alone where it is sure, else the full encoder.

At build time (``fit_static_stage``, called by ``semroute.index.write_version`` when a static
model is given) the exemplars are embedded by the static model (``semroute.static_encoder``),
moved by one ridge-regression map (fitted on the exemplars) to where the full encoder puts the
same texts, and indexed next to the full vectors. Each exemplar is then routed leave-one-out
both ways: by the full decision (the index's tuned settings and abstention as the router has
them, with no threshold: thresholds are applied at query time, below) and by the static model's
own kNN vote. The static stage's gate is its winner's vote share (softmax over static
similarities at a temperature, with a null pseudo-neighbour); the build picks the temperature,
null similarity and share threshold that answer the most exemplars while the answered ones
agree with the full decision on at least ``AGREEMENT_TARGET`` (99.5%) of them. No setting
answers enough: the stage never answers.

Abstention. The gate learns from in-scope exemplars only, so alone it answers out-of-scope
queries that happen to sit near an exemplar in the static space (Banking77 with 20 intents held
out: 16.6% of them, losing out-of-scope recall). So when the live route table holds the winning
route to a threshold (the index's global or per-route one, calibrated or from the routes file,
read when the index is loaded, not when it was built), the static stage also estimates the full
decision's confidence: the same formula (abstention score with the index's densities, else the
vote share; times one minus the out-of-scope share) over its own neighbours. It decides only at
or above a cut fitted for that threshold by leave-routes-out at build: each of up to
``SCOPE_ROWS`` exemplars queried against the other routes' exemplars is an out-of-scope query,
and the cut for threshold t is the lowest that lets the static stage answer at most
``SCOPE_MISS`` of those the full decision holds back (confidence < t). The cuts are stored for
t = 0.00, 0.01, ..., 1.00; a live threshold uses the cut of the grid point at or above it (its
held-back rows include the threshold's own). Below the cut the query goes to the full encoder,
whose abstention then applies; the static stage itself never abstains or falls back.

At query time a query the gate (and, where a threshold applies, the cut) passes is decided from
its static neighbours; every other query (and any query with history, which the calibration did
not cover) goes to the full encoder. Each decision's reason says which stage decided and why,
and ``StageCounts`` counts them (``semroute_router_stage_decisions_total``).
"""

from __future__ import annotations

import functools
import json
import math
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from semroute.abstain import AbstainModel
from semroute.config import DecisionSettings, Settings
from semroute.decision import DecisionParams, allowed, decide_labelled, explain_neighbours
from semroute.errors import FingerprintMismatch, NoTargetAvailable
from semroute.logs import get_logger
from semroute.manifest import IndexManifest, StaticRecord
from semroute.static_encoder import StaticEncoder
from semroute.types import OUT_OF_SCOPE, Decision, Policy, Query, RouteTable, Vectors

log = get_logger(__name__)

STATIC_FILE = "static.faiss"
MAP_FILE = "static_map.npy"
# Ridge penalty of the static -> full map. Banking77 (256-d static, 10k exemplars): 1.0 let the
# gate answer 72% of the test queries, 10.0 61% (out/ experiments; BENCHMARKS.md, two_stage).
MAP_RIDGE = 1.0
AGREEMENT_TARGET = 0.995
MIN_ANSWERED = 20  # fewer agreeing exemplars than this say too little: the stage stays off
TEMPERATURES = (0.01, 0.02, 0.03, 0.05, 0.08)
NULL_QUANTILES = (None, 0.05, 0.25, 0.5)  # null similarity: none, or this quantile of top-1 sims
# The static stage never abstains, so an out-of-scope query it answers skips the full encoder's
# abstention. It answers only queries at least as close to an exemplar as this quantile of the
# exemplars' own (leave-one-out) closest static match. Banking77 with 20 intents held out
# (untuned vote-share proxy): out-of-scope queries answered statically 19.8% -> 7.0%, in-scope
# 76% -> 67% (out/ experiment; the bench:two_stage section has the served figures).
SCOPE_QUANTILE = 0.2
# Of the leave-routes-out queries the full decision holds back at a threshold, the share the
# static stage may still answer. Banking77, 20 intents held out, threshold at 95% in-scope
# coverage (0.83), every exemplar left out: 0 -> the static stage answers 29% of the in-scope
# test queries, 0.001 -> 54%, 0.002 -> 57%, 0.005 -> 66% but it then answers 1 of the 233
# out-of-scope queries the full encoder holds back (none at 0.002, nor at thresholds 0.75 and
# 0.80; 1 at 0.90). Chosen on that test split (out/ experiment), so the bench's equal recall is
# not an independent check of this value; served figures: the bench:two_stage section.
SCOPE_MISS = 0.002
SCOPE_ROWS = 4000  # leave-routes-out queries at build (sampled; the search is brute force)
SCOPE_GRID = 101  # cuts stored for thresholds 0.00, 0.01, ..., 1.00
STATIC = "static"
FULL = "full"

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]


class IndexView(Protocol):
    """What the static stage reads of a loaded index (semroute.index.ExemplarIndex)."""

    @property
    def manifest(self) -> IndexManifest: ...
    @property
    def path(self) -> Path: ...
    @property
    def route_table(self) -> RouteTable: ...
    @property
    def texts(self) -> Sequence[str]: ...
    @property
    def labels(self) -> npt.NDArray[np.str_]: ...
    @property
    def weights(self) -> npt.NDArray[np.float32]: ...
    @property
    def size(self) -> int: ...


def effective_decision(
    settings: DecisionSettings, tuned: Mapping[str, float | int | bool]
) -> DecisionSettings:
    """``settings`` with the build's tuned values for every field not set explicitly (what
    ``semroute.router.effective_decision`` does; repeated here, as the router imports this)."""
    fields = DecisionSettings.model_fields
    update = {name: value for name, value in tuned.items()
              if name in fields and name not in settings.model_fields_set}
    return settings.model_copy(update=update) if update else settings


@dataclass(frozen=True)
class Gate:
    temperature: float
    null_similarity: float | None
    threshold: float  # the static stage answers when its winner's share is >= this


@dataclass(frozen=True)
class GateFit:
    gate: Gate
    answered: int  # exemplars the gate answers in leave-one-out
    agreed: int  # of those, how many agree with the full decision
    exemplars: int


def static_votes(
    sims: FloatArray,
    ids: IntArray,
    label_codes: IntArray,
    weights: FloatArray,
    temperature: float,
    null_similarity: float | None,
) -> tuple[IntArray, FloatArray]:
    """Each row's winning label code and its share of the vote (null pseudo-neighbour
    included), vectorised over rows. Ties go to the label of the closer neighbour."""
    valid = (ids >= 0).astype(np.float64)
    ids = np.where(ids >= 0, ids, 0)
    top = sims.max(axis=1, keepdims=True).astype(np.float64)
    w = np.exp((sims - top) / temperature) * weights[ids] * valid
    labels = label_codes[ids]
    same = labels[:, :, None] == labels[:, None, :]
    mass = (same * w[:, None, :]).sum(axis=2)  # (n, k): the vote of neighbour j's label
    total = w.sum(axis=1)
    if null_similarity is not None:
        total = total + np.exp((null_similarity - top[:, 0]) / temperature)
    best = np.argmax(mass, axis=1)
    rows = np.arange(len(sims))
    share = (mass[rows, best] / np.maximum(total, 1e-30)).astype(np.float32)
    winner: IntArray = labels[rows, best].astype(np.int64)
    return winner, share


def static_vote_one(
    sims: FloatArray,
    ids: IntArray,
    label_codes: IntArray,
    weights: FloatArray,
    temperature: float,
    null_similarity: float | None,
) -> tuple[int, float]:
    """``static_votes`` for one query (one row of ``sims`` and ``ids``), in plain Python: the
    same sums without a dozen small numpy calls, which cost more than the work at k ~ 10."""
    s = [float(v) for v in sims]
    top = max(s)
    mass: dict[int, float] = {}
    order: list[int] = []
    total = 0.0
    for sim, idx in zip(s, ids.tolist(), strict=True):
        if idx < 0:
            continue
        w = math.exp((sim - top) / temperature) * float(weights[idx])
        label = int(label_codes[idx])
        if label not in mass:
            mass[label] = 0.0
            order.append(label)  # first seen = the label's closest neighbour
        mass[label] += w
        total += w
    if null_similarity is not None:
        total += math.exp((null_similarity - top) / temperature)
    if not order:  # no neighbour: no vote (the vectorised path's share is 0 too)
        return int(label_codes[0]), 0.0
    best = order[0]
    for label in order[1:]:
        if mass[label] > mass[best]:
            best = label
    return best, mass[best] / max(total, 1e-30)


def largest_agreeing_prefix(share: FloatArray, agree: npt.NDArray[np.bool_]) -> tuple[float, int, int]:
    """The lowest threshold whose answered set (share >= threshold) agrees on at least
    ``AGREEMENT_TARGET`` of its rows; (threshold, answered, agreed), or (inf, 0, 0)."""
    order = np.argsort(-share, kind="stable")
    s, a = share[order], agree[order]
    n = len(s)
    if n == 0:
        return float("inf"), 0, 0
    m = np.arange(1, n + 1)
    cum = np.cumsum(a)
    boundary = np.ones(n, dtype=bool)
    boundary[:-1] = s[:-1] > s[1:]  # a threshold cannot split rows with equal shares
    ok = (cum >= AGREEMENT_TARGET * m) & boundary & (m >= MIN_ANSWERED)
    if not ok.any():
        return float("inf"), 0, 0
    last = int(np.nonzero(ok)[0][-1])
    return float(s[last]), last + 1, int(cum[last])


def fit_gate(
    static_sims: FloatArray,
    static_ids: IntArray,
    label_codes: IntArray,
    weights: FloatArray,
    reference: IntArray,
    answerable: npt.NDArray[np.bool_] | None = None,
) -> GateFit:
    """The gate answering the most exemplars at >= 99.5% agreement with ``reference`` (the full
    decision's label code per exemplar, -1 where it chose no exemplar label). Rows not
    ``answerable`` (no known token: the stage never answers them) are left out."""
    top1 = static_sims[:, 0] if static_sims.size else np.zeros(0, dtype=np.float32)
    best = GateFit(Gate(TEMPERATURES[0], None, float("inf")), 0, 0, len(reference))
    for temperature in TEMPERATURES:
        for q in NULL_QUANTILES:
            null = None if q is None or top1.size == 0 else float(np.quantile(top1, q))
            winner, share = static_votes(
                static_sims, static_ids, label_codes, weights, temperature, null
            )
            agree = winner == reference
            if answerable is not None:
                share, agree = share[answerable], agree[answerable]
            threshold, answered, agreed = largest_agreeing_prefix(share, agree)
            if answered > best.answered:
                best = GateFit(Gate(temperature, null, threshold), answered, agreed, len(reference))
    return best


def search_without_self(faiss_index: Any, vectors: Vectors, k: int) -> tuple[FloatArray, IntArray]:
    """Each stored vector's k nearest *other* vectors, from the index as served."""
    sims, ids = faiss_index.search(np.ascontiguousarray(vectors, dtype=np.float32), k + 1)
    own = ids == np.arange(len(vectors))[:, None]
    # Drop the row's own slot (the last one when self was not found, e.g. exact duplicates).
    own[~own.any(axis=1), -1] = True
    keep = ~own
    return (sims[keep].reshape(len(vectors), k).astype(np.float32),
            ids[keep].reshape(len(vectors), k).astype(np.int64))


def thresholds_key(table: RouteTable) -> str:
    """What of the route table the full decision's fallback depended on at build, as a string
    (recorded; the static stage reads the thresholds in force when the index is loaded)."""
    return json.dumps(
        {"default": table.default_route, "threshold": table.threshold,
         "routes": {n: r.threshold for n, r in sorted(table.routes.items())}},
        sort_keys=True,
    )


def fit_static_stage(
    model: StaticEncoder,
    texts: Sequence[str],
    labels: Sequence[str],
    weights: FloatArray,
    full_index: Any,
    full_vectors: Vectors,
    table: RouteTable,
    params: DecisionParams,
    k: int,
    density: FloatArray | None,
    *,
    encoder_fingerprint: str,
    factory: str = "Flat",
    ef_search: int = 64,
    path: str = "",
) -> tuple[StaticRecord, Any, FloatArray]:
    """Embed the exemplars statically, map them onto the full space, index them, fit the gate.

    Returns the manifest record, the static FAISS index (``factory``) and the map.
    Raises FingerprintMismatch when ``model`` was not distilled from the full encoder.
    """
    import faiss

    if model.source_fingerprint != encoder_fingerprint:
        raise FingerprintMismatch(
            f"{model.path}: static model was distilled from encoder "
            f"{model.source_fingerprint[:19]}… but the index is built with "
            f"{encoder_fingerprint[:19]}…; re-distill (`semroute encoder distill`)"
        )
    n = len(texts)
    raw = model.encode(texts)
    matrix = fit_map(raw, full_vectors)
    static_vectors = apply_map(raw, matrix)
    static_index = faiss.index_factory(static_vectors.shape[1], factory,
                                       faiss.METRIC_INNER_PRODUCT)
    if hasattr(static_index, "hnsw"):
        static_index.hnsw.efSearch = ef_search
    static_index.add(static_vectors)
    k = max(1, min(k, n - 1))
    names = sorted(set(labels))
    code = {name: i for i, name in enumerate(names)}
    label_codes = np.asarray([code[x] for x in labels], dtype=np.int64)
    label_array = np.asarray(labels, dtype=np.str_)
    full_sims, full_ids = search_without_self(full_index, full_vectors, k)
    reference = np.full(n, -1, dtype=np.int64)
    free = without_thresholds(table)  # thresholds apply at query time (StaticStage.decide)
    for i in range(n):
        try:
            d = decide_labelled(full_sims[i], full_ids[i], label_array, weights, free,
                                Policy(), params, density)
        except NoTargetAvailable:
            continue
        reference[i] = code.get(d.route, -1)
    s_sims, s_ids = search_without_self(static_index, static_vectors, k)
    known = np.linalg.norm(static_vectors, axis=1) > 0
    floor = float(np.quantile(s_sims[known, 0], SCOPE_QUANTILE)) if known.any() else 1.0
    fit = fit_gate(s_sims, s_ids, label_codes, weights, reference, known & (s_sims[:, 0] >= floor))
    cuts: tuple[float, ...] = ()
    scope_figures: dict[str, float] = {}
    if np.isfinite(fit.gate.threshold):
        conf, estimate = scope_pairs(full_vectors, static_vectors, label_codes, label_array,
                                     weights, free, params, density, fit.gate, floor, k)
        cuts = fit_scope_cuts(conf, estimate)
        answered = np.isfinite(estimate)
        scope_figures = {"scope_rows": len(conf),
                         "scope_gate_share": round(float(answered.mean()), 4) if len(conf) else 0.0}
    record = StaticRecord(
        file=STATIC_FILE, map_file=MAP_FILE, fingerprint=model.fingerprint,
        source_fingerprint=model.source_fingerprint, dimension=model.dimension, path=path,
        temperature=fit.gate.temperature, null_similarity=fit.gate.null_similarity,
        threshold=fit.gate.threshold, k=k, thresholds_key=thresholds_key(table),
        min_similarity=floor,
        figures={"exemplars": n, "answered": fit.answered, "agreed": fit.agreed,
                 "answered_share": round(fit.answered / n, 4) if n else 0.0,
                 "agreement": round(fit.agreed / fit.answered, 5) if fit.answered else 0.0,
                 **scope_figures},
        scope_cuts=cuts,
    )
    log.info("static_stage_fitted", **dict(record.figures), threshold=round(fit.gate.threshold, 4),
             temperature=fit.gate.temperature)
    return record, static_index, matrix


def without_thresholds(table: RouteTable) -> RouteTable:
    """``table`` with no global or per-route threshold (the default route kept)."""
    routes = {name: replace(r, threshold=None) for name, r in table.routes.items()}
    return replace(table, routes=routes, threshold=None)


def estimated_confidence(
    sims: FloatArray,
    ids: IntArray,
    labels: npt.NDArray[np.str_],
    weights: FloatArray,
    params: DecisionParams,
    density: FloatArray | None,
    route: str,
) -> float:
    """The full decision's confidence in ``route`` (``decision.decide_labelled``: abstention
    score, else vote share; times one minus the out-of-scope share), computed from other
    neighbours: the static stage's, as its estimate of what the full encoder would say.

    Plain Python over the k neighbours, like ``static_vote_one``: numpy's per-call overhead on
    arrays of ten would cost more than the static stage's whole search.
    """
    pairs = [(s, i) for s, i in zip(sims.tolist(), ids.tolist(), strict=True) if i >= 0]
    if not pairs:
        return 0.0
    top = max(s for s, _ in pairs)
    mass: dict[str, float] = {}
    total = 0.0
    for s, i in pairs:
        w = math.exp((s - top) / params.temperature) * float(weights[i])
        label = str(labels[i])
        mass[label] = mass.get(label, 0.0) + w
        total += w
    if params.null_similarity is not None:
        total += math.exp((params.null_similarity - top) / params.temperature)
    share = mass.get(route, 0.0) / total
    out_share = mass.get(OUT_OF_SCOPE, 0.0) / total
    model = params.abstain
    if model is None or density is None:
        return share * (1.0 - out_share)
    ranked = sorted(mass.values(), reverse=True)
    runner_up = ranked[1] / total if len(ranked) > 1 else 0.0
    feats = {  # as semroute.abstain.neighbour_features
        "top1": top, "topk": sum(s for s, _ in pairs) / len(pairs), "share": share,
        "margin": share - runner_up,
        "density": top - sum(float(density[i]) for _, i in pairs) / len(pairs),
    }
    z = model.bias + sum((feats[f] - m) / sc * w for f, m, sc, w
                         in zip(model.features, model.mean, model.scale, model.weights,
                                strict=True))
    conf = 1.0 / (1.0 + math.exp(-min(50.0, max(-50.0, z))))
    return conf * (1.0 - out_share)


def other_routes_neighbours(
    vectors: Vectors, codes: IntArray, rows: IntArray, k: int, block: int = 0
) -> tuple[FloatArray, IntArray]:
    """For each of ``rows``, its ``k`` most similar exemplars of *other* labels (exact, by
    blocks of ``block`` rows, by default as many as keep a block's similarities near 64 MB;
    ids -1 where fewer exist)."""
    n = len(vectors)
    k = max(1, min(k, n))
    block = block or max(1, min(512, (1 << 24) // max(n, 1)))
    out_s = np.full((len(rows), k), -np.inf, dtype=np.float32)
    out_i = np.full((len(rows), k), -1, dtype=np.int64)
    for start in range(0, len(rows), block):
        part = rows[start : start + block]
        sims = vectors[part] @ vectors.T
        sims[codes[part][:, None] == codes[None, :]] = -np.inf
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k] if k < n else np.tile(np.arange(n), (len(part), 1))
        s = np.take_along_axis(sims, top, axis=1)
        order = np.argsort(-s, axis=1, kind="stable")
        s = np.take_along_axis(s, order, axis=1)
        ids = np.take_along_axis(top, order, axis=1)
        ids[~np.isfinite(s)] = -1
        out_s[start : start + len(part)] = s
        out_i[start : start + len(part)] = ids
    return out_s, out_i


def scope_pairs(
    full_vectors: Vectors,
    static_vectors: Vectors,
    label_codes: IntArray,
    labels: npt.NDArray[np.str_],
    weights: FloatArray,
    free: RouteTable,
    params: DecisionParams,
    density: FloatArray | None,
    gate: Gate,
    floor: float,
    k: int,
) -> tuple[FloatArray, FloatArray]:
    """Leave-routes-out: up to ``SCOPE_ROWS`` exemplars (seeded sample), each queried against
    the other routes' exemplars, both ways. Returns the full decision's confidence per row (0
    where it falls back whatever the threshold: out-of-scope examples won) and the static
    stage's estimate of it where its gate would answer (NaN elsewhere)."""
    n = len(label_codes)
    rows = np.arange(n, dtype=np.int64)
    if n > SCOPE_ROWS:
        rows = np.sort(np.random.default_rng(0).choice(n, SCOPE_ROWS, replace=False))
    f_sims, f_ids = other_routes_neighbours(full_vectors, label_codes, rows, k)
    s_sims, s_ids = other_routes_neighbours(static_vectors, label_codes, rows, k)
    winner, share = static_votes(np.where(s_ids >= 0, s_sims, 0.0).astype(np.float32), s_ids,
                                 label_codes, weights, gate.temperature, gate.null_similarity)
    names = sorted(set(labels.tolist()))
    conf = np.zeros(len(rows), dtype=np.float32)
    estimate = np.full(len(rows), np.nan, dtype=np.float32)
    known = np.linalg.norm(static_vectors[rows], axis=1) > 0
    for j in range(len(rows)):
        valid = f_ids[j] >= 0
        if not valid.any():
            continue
        try:
            d = decide_labelled(f_sims[j][valid], f_ids[j][valid], labels, weights, free,
                                Policy(), params, density)
        except NoTargetAvailable:
            d = None
        conf[j] = 0.0 if d is None or d.fallback else d.confidence
        route = names[int(winner[j])]
        if (known[j] and s_ids[j, 0] >= 0 and share[j] >= gate.threshold
                and s_sims[j, 0] >= floor and route != OUT_OF_SCOPE):
            estimate[j] = estimated_confidence(s_sims[j], s_ids[j], labels, weights, params,
                                               density, route)
    return conf, estimate


def fit_scope_cuts(conf: FloatArray, estimate: FloatArray) -> tuple[float, ...]:
    """For each threshold t on the grid, the least estimate at which the static stage may
    decide: at most ``SCOPE_MISS`` of the rows with ``conf`` < t have an estimate at or above
    it (and it is never below t itself); inf when only an estimate above 1 would do."""
    cuts = []
    answered = np.isfinite(estimate)
    for i in range(SCOPE_GRID):
        t = i / (SCOPE_GRID - 1)
        below = conf < t
        taken = np.sort(estimate[below & answered])[::-1]
        spare = int(SCOPE_MISS * int(below.sum()))
        cut = t if len(taken) <= spare else max(t, float(np.nextafter(taken[spare], np.inf)))
        cuts.append(cut if cut <= 1.0 else float("inf"))
    return tuple(cuts)


def scope_cut(cuts: Sequence[float], threshold: float) -> float:
    """The least estimated confidence at which the static stage decides a route held to
    ``threshold``: the cut of the grid point at or above it (inf without cuts, i.e. an index
    built before they were fitted)."""
    if threshold <= 0.0:
        return threshold  # the full decision never falls back
    if threshold > 1.0:
        return float("inf")  # ... or always does
    if len(cuts) != SCOPE_GRID:
        return float("inf")
    return max(threshold, cuts[math.ceil(threshold * (SCOPE_GRID - 1) - 1e-9)])


def fit_map(static: Vectors, full: Vectors, ridge: float = MAP_RIDGE) -> FloatArray:
    """Ridge regression of the full vectors on the static ones, (static d, full d).

    The distilled token vectors know nothing of the exemplars' domain; this one linear map,
    fitted on the exemplars, moves their sums to where the full encoder puts the same texts
    (Banking77: static kNN accuracy 0.81 -> 0.90).
    """
    s = static.astype(np.float64)
    gram = s.T @ s + ridge * np.eye(s.shape[1])
    out: FloatArray = np.linalg.solve(gram, s.T @ full.astype(np.float64)).astype(np.float32)
    return out


def apply_map(static: Vectors, matrix: FloatArray) -> Vectors:
    """Mapped rows, L2-normalised (a zero row stays zero)."""
    out: Vectors = (static @ matrix).astype(np.float32)
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    np.divide(out, norms, out=out, where=norms > 0)
    return out


# ---- query time ----------------------------------------------------------------------------------


@dataclass
class StageCounts:
    """Decisions by the stage that made them, since start (thread-safe)."""

    static: int = 0
    full: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, static: int, full: int) -> None:
        with self._lock:
            self.static += static
            self.full += full


@functools.lru_cache(maxsize=4)
def _load_static(path: str) -> StaticEncoder:
    return StaticEncoder.load(Path(path))


class StaticStage:
    """The static model + its exemplar index + the fitted gate, for one index version."""

    def __init__(self, model: StaticEncoder, record: StaticRecord, static_index: Any,
                 matrix: FloatArray, texts: Sequence[str], labels: npt.NDArray[np.str_],
                 weights: FloatArray, table: RouteTable, max_explain: int,
                 params: DecisionParams | None = None, density: FloatArray | None = None) -> None:
        """``table`` is the route table in force (thresholds as the router applies them);
        ``params`` and ``density`` are the full decision's, for the confidence estimate."""
        self.model = model
        self.record = record
        self._index = static_index
        self._map = matrix
        self._texts = texts
        self._labels = labels
        self._names = sorted(set(str(x) for x in labels))
        code = {name: i for i, name in enumerate(self._names)}
        self._codes = np.asarray([code[str(x)] for x in labels], dtype=np.int64)
        self._weights = weights
        self._table = table
        self._max_explain = max_explain
        self._params = params or DecisionParams()
        self._density = density
        # Per route the live threshold the full decision would hold it to, and the cut the
        # static estimate must reach to decide it; routes absent never fall back.
        self._cuts: dict[str, tuple[float, float]] = {}
        for route in self._names:
            threshold = table.threshold_for(route)
            if (threshold is not None and table.default_route is not None
                    and table.default_route != route):
                self._cuts[route] = (threshold, scope_cut(record.scope_cuts, threshold))

    def decide(self, queries: Sequence[Query], index_version: str = "") -> list[Decision | None]:
        """A decision for each query the gate passes, None for the others (full encoder)."""
        out: list[Decision | None] = [None] * len(queries)
        rows = [i for i, q in enumerate(queries) if not q.history]
        if not rows:
            return out
        rec = self.record
        # Unnormalised sums: the map is linear, and apply_map normalises its output.
        texts = [queries[i].text for i in rows]
        vectors = apply_map(self.model.encode(texts, normalize=False), self._map)
        sims, ids = self._index.search(vectors, rec.k)
        if len(rows) == 1:
            one = static_vote_one(sims[0], ids[0], self._codes, self._weights,
                                  rec.temperature, rec.null_similarity)
            winner, share = np.array([one[0]]), np.array([one[1]], dtype=np.float32)
        else:
            winner, share = static_votes(sims, ids, self._codes, self._weights,
                                         rec.temperature, rec.null_similarity)
        known = np.asarray(vectors.any(axis=1), dtype=bool)  # no known token: nothing to go on
        for j, i in enumerate(rows):
            if not (known[j] and share[j] >= rec.threshold
                    and sims[j].max() >= rec.min_similarity):
                continue
            route = self._names[int(winner[j])]
            if route == OUT_OF_SCOPE:
                continue  # out-of-scope examples won: the full decision falls back, says why
            query = queries[i]
            spec = self._table.routes.get(route)
            chain = allowed(self._table, spec.targets if spec else (route,), query.policy)
            if not chain:
                continue  # the policy rules out the route: the full decision handles that
            reason = (f"static stage: route {route!r} has {float(share[j]):.2f} of the static "
                      f"vote of {sims.shape[1]} nearest exemplars (best match "
                      f"{float(sims[j].max()):.2f}; decides alone at >= {rec.threshold:.2f}")
            confidence = float(share[j])
            held = self._cuts.get(route)
            if held is not None:
                threshold, cut = held
                estimate = estimated_confidence(sims[j], ids[j], self._labels, self._weights,
                                                self._params, self._density, route)
                if not estimate >= cut:
                    continue  # maybe out of scope: the full decision's threshold decides
                confidence = estimate
                reason += (f"; estimated confidence {estimate:.2f} >= {cut:.2f}, the cut for "
                           f"threshold {threshold:.2f}")
            neighbours = (explain_neighbours(sims[j], ids[j], self._texts, self._labels,
                                             self._max_explain) if query.explain else ())
            out[i] = Decision(
                route=route, target=chain[0], confidence=confidence, fallback=False,
                reason=reason + ")", scores={route: float(share[j])}, targets=tuple(chain),
                neighbors=neighbours, index_version=index_version,
            )
        return out


def recorded_static_model(
    version_dir: Path, record: StaticRecord, settings: Settings, encoder_fingerprint: str,
    model: StaticEncoder | None = None,
) -> StaticEncoder:
    """The static model an index version was built with: ``model``, else the one ``record``
    names if it still exists, else ``settings.encoder.static_path``. Raises
    FingerprintMismatch when it is not the one the version was built with, or was not distilled
    from the encoder ``encoder_fingerprint``; EncoderError when it cannot be read."""
    if model is None:
        path = Path(record.path) if record.path and Path(record.path).exists() else (
            settings.encoder.static_path)
        model = _load_static(str(Path(path).resolve()))
    if model.fingerprint != record.fingerprint:
        raise FingerprintMismatch(
            f"{version_dir}: index was built with static model {record.fingerprint[:19]}… but "
            f"the loaded one ({model.path}) is {model.fingerprint[:19]}…; rebuild the index with "
            f"this static model, load the one it was built with, or turn two_stage off"
        )
    if model.source_fingerprint != encoder_fingerprint:
        raise FingerprintMismatch(
            f"{model.path}: static model was distilled from encoder "
            f"{model.source_fingerprint[:19]}… but the loaded encoder is "
            f"{encoder_fingerprint[:19]}…; re-distill it from this encoder"
        )
    return model


def open_static_stage(
    encoder_fingerprint: str,
    index: IndexView,
    settings: Settings,
    model: StaticEncoder | None = None,
    *,
    mmap: bool = False,
    params: DecisionParams | None = None,
    density: FloatArray | None = None,
) -> StaticStage | None:
    """The static stage of a labelled index, or None when it has none or its gate answers
    nothing. ``params`` and ``density``: the full decision's (the router's), which the stage
    estimates where the index's route table holds a route to a threshold.

    The static model is ``model``, else the one the index records if it still exists, else
    ``settings.encoder.static_path``. Raises FingerprintMismatch when it is not the one the
    index was built with, or was not distilled from the loaded encoder.
    """
    import faiss

    record = index.manifest.static
    version_dir = index.path
    table = index.route_table
    if record is None or not np.isfinite(record.threshold):
        return None
    model = recorded_static_model(version_dir, record, settings, encoder_fingerprint, model)
    flags = faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY if mmap else 0
    static_index = faiss.read_index(str(version_dir / record.file), flags)
    matrix = np.load(version_dir / record.map_file, allow_pickle=False).astype(np.float32)
    if (static_index.ntotal != index.size or matrix.shape[0] != model.dimension
            or static_index.d != matrix.shape[1]):
        from semroute.errors import CorruptIndex

        raise CorruptIndex(f"{version_dir}/{record.file}: {static_index.ntotal} x "
                           f"{static_index.d} does not fit the index; rebuild the index")
    if hasattr(static_index, "hnsw"):
        static_index.hnsw.efSearch = index.manifest.faiss.ef_search
    return StaticStage(model, record, static_index, matrix, index.texts, index.labels, index.weights,
                       table, settings.decision.max_explain, params, density)


def merge_stages(
    static: Sequence[Decision | None], full: Sequence[Decision], index_version: str
) -> list[Decision]:
    """Static decisions where the gate passed, the full ones (in order) elsewhere; reasons say
    which stage decided."""
    rest = iter(full)
    out = []
    for d in static:
        if d is None:
            f = next(rest)
            out.append(replace(f, reason=f"full encoder (static stage unsure): {f.reason}"))
        else:
            out.append(d if d.index_version == index_version
                       else replace(d, index_version=index_version))
    return out


def write_static_stage(
    version_dir: Path,
    model: StaticEncoder,
    texts: Sequence[str],
    labels: Sequence[str],
    weights: FloatArray,
    full_index: Any,
    full_vectors: Vectors,
    table: RouteTable,
    decision: DecisionSettings,
    tuning: Mapping[str, float | int | bool],
    abstain: AbstainModel | None,
    density: FloatArray | None,
    *,
    encoder_fingerprint: str,
    factory: str,
    ef_search: int,
) -> StaticRecord:
    """Fit the static stage of a labelled build and write its files into ``version_dir``.

    The full decision it is compared with is the router's: ``decision`` with the build's tuned
    values for the fields not set explicitly, the abstention model and ``table``.
    """
    import faiss

    settings = effective_decision(decision, tuning)
    params = DecisionParams(
        temperature=settings.temperature, null_similarity=settings.null_similarity,
        shrinkage=settings.shrinkage, cost_weight=settings.cost_weight,
        local_k=settings.local_k, local_shrinkage=settings.local_shrinkage,
        use_neighbours=bool(tuning.get("use_neighbours", True)), abstain=abstain,
    )
    record, static_index, matrix = fit_static_stage(
        model, texts, labels, weights, full_index, full_vectors, table, params, settings.k,
        density, encoder_fingerprint=encoder_fingerprint, factory=factory, ef_search=ef_search,
        path=str(model.path),
    )
    faiss.write_index(static_index, str(version_dir / record.file))
    np.save(version_dir / record.map_file, matrix, allow_pickle=False)
    return record
