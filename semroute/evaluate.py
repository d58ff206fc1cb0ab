"""Routing quality: pure metric functions, and the runners that route a test CSV through the core.

The metric functions take numpy arrays and return plain records, so each can be checked by hand.
The runners (``evaluate_labels``, ``evaluate_outcomes``) load a test file, route every row with the
real Router (labelled indexes) or the real neighbour search + decision functions (outcome
indexes), and hand the results to the metric functions.

Definitions follow the papers users compare against:

* AIQ (RouterBench, Hu et al. 2024): area under the non-decreasing upper convex hull of the
  router's (cost, quality) points, divided by the cost range.
* PGR / APGR / CPT (RouteLLM, Ong et al. 2024), two targets ``weak`` and ``strong``:
  PGR(x) = (quality(x) - q_weak) / (q_strong - q_weak) where x is the share of queries sent to
  ``strong``; APGR is the area under PGR over x in [0, 1]; CPT(p) is the smallest x with
  PGR(x) >= p.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from semroute.errors import ConfigError, ExemplarError, RowProblem

if TYPE_CHECKING:
    from semroute.router import Router
    from semroute.types import Target

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]

OOS_LABEL = "oos"

# ---- labelled metrics ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RouteScore:
    """Precision, recall and F1 of one route, and how many test rows carry it."""

    precision: float
    recall: float
    f1: float
    support: int


@dataclass(frozen=True)
class LabelMetrics:
    accuracy: float
    macro_f1: float
    per_route: dict[str, RouteScore]
    labels: tuple[str, ...]
    confusion: npt.NDArray[np.int64]  # rows = true label, columns = predicted, order = labels


def label_metrics(
    y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str] | None = None
) -> LabelMetrics:
    """Accuracy, macro-F1 over the true labels, per-route P/R/F1 and the confusion matrix.

    ``labels`` fixes the row/column order of the confusion matrix; labels seen in either
    sequence but missing from it are appended in sorted order. Macro-F1 averages over the
    labels that occur in ``y_true`` (a route never asked for does not drag it down). A route
    never predicted has precision 0.
    """
    if len(y_true) != len(y_pred):
        raise ValueError(f"y_true has {len(y_true)} rows but y_pred has {len(y_pred)}")
    if not y_true:
        raise ValueError("no test rows")
    order = list(labels or [])
    seen = set(order)
    for lab in sorted(set(y_true) | set(y_pred)):
        if lab not in seen:
            order.append(lab)
            seen.add(lab)
    pos = {lab: i for i, lab in enumerate(order)}
    cm = np.zeros((len(order), len(order)), dtype=np.int64)
    for t, p in zip(y_true, y_pred, strict=True):
        cm[pos[t], pos[p]] += 1
    tp = np.diag(cm).astype(np.float64)
    pred_n = cm.sum(axis=0).astype(np.float64)
    true_n = cm.sum(axis=1).astype(np.float64)
    precision = np.divide(tp, pred_n, out=np.zeros_like(tp), where=pred_n > 0)
    recall = np.divide(tp, true_n, out=np.zeros_like(tp), where=true_n > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    per_route = {
        lab: RouteScore(float(precision[i]), float(recall[i]), float(f1[i]), int(true_n[i]))
        for i, lab in enumerate(order)
    }
    present = true_n > 0
    return LabelMetrics(
        accuracy=float(tp.sum() / len(y_true)),
        macro_f1=float(f1[present].mean()),
        per_route=per_route,
        labels=tuple(order),
        confusion=cm,
    )


@dataclass(frozen=True)
class CoveragePoint:
    """Answering only queries with confidence >= threshold: the share answered and their accuracy."""

    threshold: float
    coverage: float
    accuracy: float


def coverage_curve(
    confidence: npt.ArrayLike, correct: npt.ArrayLike, max_points: int = 101
) -> list[CoveragePoint]:
    """Accuracy against coverage as the threshold rises, highest coverage first.

    One point per distinct confidence value (thinned to about ``max_points``), so the curve is
    exact: at threshold t every query with confidence >= t is answered.
    """
    conf = np.asarray(confidence, dtype=np.float64)
    ok = np.asarray(correct, dtype=np.float64)
    n = len(conf)
    if n == 0:
        return []
    order = np.argsort(-conf, kind="stable")
    conf_sorted = conf[order]
    cum_ok = np.cumsum(ok[order])
    # last index of each run of equal confidence: a threshold there answers everything up to it
    ends = np.flatnonzero(np.r_[conf_sorted[1:] != conf_sorted[:-1], True])
    if len(ends) > max_points:
        pick = np.unique(np.linspace(0, len(ends) - 1, max_points).round().astype(int))
        ends = ends[pick]
    points = [
        CoveragePoint(float(conf_sorted[e]), (e + 1) / n, float(cum_ok[e] / (e + 1)))
        for e in ends
    ]
    return points[::-1]


@dataclass(frozen=True)
class ReliabilityBin:
    lower: float
    upper: float
    count: int
    confidence: float  # mean confidence in the bin (nan when empty)
    accuracy: float  # share correct in the bin (nan when empty)


def reliability(
    confidence: npt.ArrayLike, correct: npt.ArrayLike, n_bins: int = 10
) -> tuple[float, list[ReliabilityBin]]:
    """Expected calibration error over equal-width bins of [0, 1], and the bins.

    ECE = sum over bins of (bin count / n) * |accuracy(bin) - mean confidence(bin)|. A
    confidence of exactly 1.0 falls in the last bin.
    """
    conf = np.clip(np.asarray(confidence, dtype=np.float64), 0.0, 1.0)
    ok = np.asarray(correct, dtype=np.float64)
    n = len(conf)
    idx = np.minimum((conf * n_bins).astype(int), n_bins - 1)
    bins: list[ReliabilityBin] = []
    ece = 0.0
    for b in range(n_bins):
        mask = idx == b
        count = int(mask.sum())
        if count:
            c, a = float(conf[mask].mean()), float(ok[mask].mean())
            ece += count / n * abs(a - c)
        else:
            c = a = math.nan
        bins.append(ReliabilityBin(b / n_bins, (b + 1) / n_bins, count, c, a))
    return ece, bins


def auroc(scores: npt.ArrayLike, positive: npt.ArrayLike) -> float:
    """Area under the ROC curve: the chance a random positive scores above a random negative
    (ties count one half). NaN when either class is empty."""
    s = np.asarray(scores, dtype=np.float64)
    pos = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    # Mann-Whitney U from average ranks handles ties exactly.
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_s = s[order]
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    u = ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


@dataclass(frozen=True)
class AbstainMetrics:
    """How well abstaining (falling back) picks out the out-of-scope queries."""

    precision: float  # abstained rows that were out of scope / abstained rows
    recall: float  # out-of-scope rows abstained on / out-of-scope rows
    auroc: float  # of (1 - confidence) as an out-of-scope score


def abstain_metrics(
    abstained: npt.ArrayLike, out_of_scope: npt.ArrayLike, confidence: npt.ArrayLike
) -> AbstainMetrics:
    ab = np.asarray(abstained, dtype=bool)
    oos = np.asarray(out_of_scope, dtype=bool)
    n_ab, n_oos = int(ab.sum()), int(oos.sum())
    hit = int((ab & oos).sum())
    return AbstainMetrics(
        precision=hit / n_ab if n_ab else 0.0,
        recall=hit / n_oos if n_oos else math.nan,
        auroc=auroc(-np.asarray(confidence, dtype=np.float64), oos),
    )


# ---- outcome metrics ----------------------------------------------------------------------------


@dataclass(frozen=True)
class CostQuality:
    """A router operating point: mean price of the chosen targets and mean realised quality."""

    cost: float
    quality: float
    label: str = ""


def choose_targets(
    predicted: npt.ArrayLike, costs: npt.ArrayLike, cost_weight: float
) -> npt.NDArray[np.int64]:
    """Per query, the target maximising predicted quality - cost_weight * cost; ties go to the
    cheaper target, then the earlier column (as ``decision.rank_by_quality`` orders them).

    ``costs`` should be on the scale the weight is meant for; the runners divide prices by the
    most expensive target's so a weight of 1 trades the full price range for one quality unit.
    """
    p = np.asarray(predicted, dtype=np.float64)
    c = np.asarray(costs, dtype=np.float64)
    utility = p - cost_weight * c[None, :]
    best = utility.max(axis=1, keepdims=True)
    masked = np.where(utility >= best - 1e-9, c[None, :], np.inf)
    return np.asarray(np.argmin(masked, axis=1), dtype=np.int64)


def realised(
    quality: npt.ArrayLike, costs: npt.ArrayLike, choice: npt.ArrayLike, label: str = ""
) -> CostQuality:
    """Mean true quality and mean price of a per-query choice of target."""
    q = np.asarray(quality, dtype=np.float64)
    c = np.asarray(costs, dtype=np.float64)
    ch = np.asarray(choice, dtype=np.int64)
    return CostQuality(float(c[ch].mean()), float(q[np.arange(len(ch)), ch].mean()), label)


def cost_quality_sweep(
    predicted: npt.ArrayLike,
    quality: npt.ArrayLike,
    costs: npt.ArrayLike,
    weights: Sequence[float] | None = None,
) -> list[CostQuality]:
    """The router's curve: one point per cost weight, from quality-only (0) to near cheapest."""
    c = np.asarray(costs, dtype=np.float64)
    scale = float(c.max()) if c.max() > 0 else 1.0
    if weights is None:
        weights = [0.0, *np.geomspace(1e-3, 10.0, 60).tolist()]
    return [
        realised(quality, c, choose_targets(predicted, c / scale, w), f"w={w:.4g}")
        for w in weights
    ]


def single_targets(
    quality: npt.ArrayLike, costs: npt.ArrayLike, names: Sequence[str]
) -> list[CostQuality]:
    q = np.asarray(quality, dtype=np.float64)
    return [
        CostQuality(float(costs_i), float(q[:, j].mean()), name)
        for j, (name, costs_i) in enumerate(zip(names, np.asarray(costs), strict=True))
    ]


def oracle(quality: npt.ArrayLike, costs: npt.ArrayLike) -> CostQuality:
    """Best target per query, the cheapest among equally good ones."""
    q = np.asarray(quality, dtype=np.float64)
    c = np.asarray(costs, dtype=np.float64)
    best = q.max(axis=1, keepdims=True)
    # among targets reaching the best quality take the cheapest
    masked = np.where(q >= best - 1e-12, c[None, :], np.inf)
    return realised(q, c, np.argmin(masked, axis=1), "oracle")


def random_router(quality: npt.ArrayLike, costs: npt.ArrayLike) -> CostQuality:
    """Expected point of picking a target uniformly at random per query."""
    q = np.asarray(quality, dtype=np.float64)
    return CostQuality(float(np.asarray(costs, dtype=np.float64).mean()), float(q.mean()), "random")


def upper_hull(points: Sequence[CostQuality]) -> list[tuple[float, float]]:
    """The non-decreasing upper convex hull of (cost, quality) points, cheapest first.

    Mixing two operating points reaches any point on the segment between them (convex), and
    spending more never has to lose quality (non-decreasing): past the best point the hull is
    flat.
    """
    pts = sorted({(p.cost, p.quality) for p in points})
    hull: list[tuple[float, float]] = []
    for x, y in pts:
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            # drop the middle point when it lies on or below the segment from hull[-2] to (x, y)
            if (x2 - x1) * (y - y1) - (y2 - y1) * (x - x1) >= 0:
                hull.pop()
            else:
                break
        if hull and hull[-1][0] == x:
            hull[-1] = (x, max(y, hull[-1][1]))
        else:
            hull.append((x, y))
    # keep the rising part only; after the peak the curve is flat at the peak
    peak = max(range(len(hull)), key=lambda i: (hull[i][1], -i))
    return hull[: peak + 1]


def hull_value(hull: Sequence[tuple[float, float]], cost: float) -> float:
    """Quality reachable at ``cost`` on a hull from ``upper_hull``: 0 below the cheapest point,
    flat after the last one."""
    if not hull or cost < hull[0][0]:
        return 0.0
    xs = [h[0] for h in hull]
    ys = [h[1] for h in hull]
    return float(np.interp(cost, xs, ys))


def aiq(points: Sequence[CostQuality], cost_range: tuple[float, float] | None = None) -> float:
    """RouterBench's AIQ: mean height of the non-decreasing upper hull over the cost range.

    ``cost_range`` defaults to the points' own cheapest and dearest cost. Below the cheapest
    point the hull is 0 (nothing reachable), above the dearest it stays at its maximum.
    """
    hull = upper_hull(points)
    lo, hi = cost_range or (min(p.cost for p in points), max(p.cost for p in points))
    if hi <= lo:
        return hull_value(hull, lo)
    # Zero below the cheapest point; piecewise linear above it, so trapezoids over the
    # breakpoints are exact.
    start = max(lo, hull[0][0])
    if start >= hi:
        return 0.0
    xs = sorted({start, hi, *(x for x, _ in hull if start < x < hi)})
    ys = [hull_value(hull, x) for x in xs]
    area = sum((b - a) * (ya + yb) / 2.0 for (a, ya), (b, yb) in pairwise(zip(xs, ys, strict=True)))
    return area / (hi - lo)


def cost_at_quality(points: Sequence[CostQuality], quality: float) -> float | None:
    """Cheapest cost at which the hull of ``points`` reaches ``quality``; None if never."""
    hull = upper_hull(points)
    if not hull or hull[-1][1] < quality:
        return None
    for (x1, y1), (x2, y2) in pairwise(hull):
        if y1 >= quality:
            return x1
        if y2 >= quality:
            return x1 + (quality - y1) * (x2 - x1) / (y2 - y1)
    return hull[0][0] if hull[0][1] >= quality else None


@dataclass(frozen=True)
class PgrCurve:
    """PGR against the share of queries sent to the strong target (both from 0 to 1)."""

    strong_share: FloatArray
    pgr: FloatArray


def pgr_curve(advantage: npt.ArrayLike, weak: npt.ArrayLike, strong: npt.ArrayLike) -> PgrCurve:
    """Route the queries with the highest predicted ``advantage`` of strong over weak first.

    Returns n + 1 points (0, 1, ..., n queries sent to strong). Ties in ``advantage`` are
    broken by row order. Raises ValueError when both targets have the same mean quality.
    """
    adv = np.asarray(advantage, dtype=np.float64)
    w = np.asarray(weak, dtype=np.float64)
    s = np.asarray(strong, dtype=np.float64)
    n = len(adv)
    gap = s.mean() - w.mean()
    if n == 0 or abs(gap) < 1e-12:
        raise ValueError("PGR needs test rows and targets of different mean quality")
    order = np.argsort(-adv, kind="stable")
    gain = np.r_[0.0, np.cumsum((s - w)[order])]  # quality gained by sending the top m to strong
    quality = w.mean() + gain / n
    return PgrCurve(np.arange(n + 1) / n, (quality - w.mean()) / gap)


def apgr(curve: PgrCurve) -> float:
    """Area under PGR over the strong share in [0, 1] (trapezoidal; random routing gives 0.5)."""
    x, y = curve.strong_share, curve.pgr
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2.0))


def cpt(curve: PgrCurve, target_pgr: float) -> float | None:
    """Smallest share of strong calls whose PGR reaches ``target_pgr`` (None if never)."""
    hit = np.flatnonzero(curve.pgr >= target_pgr - 1e-12)
    return float(curve.strong_share[hit[0]]) if len(hit) else None


# ---- embedding cache for evaluation runs --------------------------------------------------------


class DiskCachedEncoder:
    """An encoder wrapper that keeps every embedding it computes in ``cache_dir`` (one .npz per
    encoder fingerprint), so evaluation re-runs and index rebuilds embed nothing twice.

    Only for evaluation tooling: vectors are keyed by the SHA-1 of the text, so the same text
    always gets the vector its encoder produced.
    """

    def __init__(self, encoder: Any, cache_dir: Path, batch_size: int = 64) -> None:
        import hashlib

        self.inner = encoder
        self.batch_size = batch_size
        self._sha1 = hashlib.sha1
        tag = encoder.fingerprint.split(":")[-1][:16]
        self.file = Path(cache_dir) / f"embeddings-{tag}.npz"
        # Row i of the file is (key i, vector i). Keys are stored as raw (n, 20) uint8 rows:
        # a numpy bytes dtype would strip trailing NUL bytes from digests and break the lookup.
        self._keys: dict[bytes, int] = {}
        self._key_rows: list[bytes] = []
        self._vecs: list[npt.NDArray[np.float32]] = []
        if self.file.exists():
            data = np.load(self.file)
            key_rows = np.asarray(data["keys"], dtype=np.uint8)
            vectors = np.asarray(data["vectors"], dtype=np.float32)
            if key_rows.ndim != 2 or key_rows.shape[0] != vectors.shape[0]:
                raise ValueError(f"{self.file}: keys and vectors do not line up; delete the file")
            self._key_rows = [row.tobytes() for row in key_rows]
            self._vecs = list(vectors)
            self._keys = {k: i for i, k in enumerate(self._key_rows)}
        self._unsaved = 0
        self.save_every = 2048

    @property
    def dimension(self) -> int:
        return int(self.inner.dimension)

    @property
    def fingerprint(self) -> str:
        return str(self.inner.fingerprint)

    @property
    def max_tokens(self) -> int:
        return int(self.inner.max_tokens)

    def _key(self, text: str) -> bytes:
        return self._sha1(text.encode("utf-8")).digest()

    def encode(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        keys = [self._key(t) for t in texts]
        missing = list(dict.fromkeys(i for i, k in enumerate(keys) if k not in self._keys))
        if missing:
            unique: dict[bytes, str] = {}
            for i in missing:
                unique.setdefault(keys[i], texts[i])
            items = sorted(unique.items(), key=lambda kv: len(kv[1]))  # less padding per batch
            for start in range(0, len(items), self.batch_size):
                chunk = items[start : start + self.batch_size]
                vecs = self.inner.encode([t for _, t in chunk])
                for (k, _), v in zip(chunk, vecs, strict=True):
                    self._keys[k] = len(self._vecs)
                    self._key_rows.append(k)
                    self._vecs.append(np.asarray(v, dtype=np.float32))
            self._unsaved += len(unique)
            # Rewriting the whole file per small batch would dominate an index build.
            if self._unsaved >= self.save_every:
                self.save()
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        return np.stack([self._vecs[self._keys[k]] for k in keys]).astype(np.float32)

    def save(self) -> None:
        """Write the new embeddings to disk (also done every ``save_every`` new texts)."""
        if not self._unsaved:
            return
        self.file.parent.mkdir(parents=True, exist_ok=True)
        keys = np.frombuffer(b"".join(self._key_rows), dtype=np.uint8).reshape(-1, 20)
        tmp = self.file.with_suffix(".tmp.npz")
        np.savez(tmp, keys=keys, vectors=np.stack(self._vecs))
        tmp.replace(self.file)
        self._unsaved = 0


# ---- test files ---------------------------------------------------------------------------------


def _open_csv(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise ExemplarError([RowProblem(str(path), 0, f"cannot read: {exc.strerror}")]) from exc
    import io

    csv.field_size_limit(16 * 1024 * 1024)
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if not header:
        raise ExemplarError([RowProblem(str(path), 1, "empty file: a header row is needed")])
    rows: list[tuple[int, list[str]]] = []
    for row in reader:
        if row:
            rows.append((reader.line_num, row))
    if not rows:
        raise ExemplarError([RowProblem(str(path), 2, "no test rows")])
    return [h.strip() for h in header], rows


def read_labelled_csv(path: Path) -> tuple[list[str], list[str]]:
    """Test rows ``text,label`` (extra columns ignored). Raises ExemplarError naming every bad
    row as file:line."""
    header, rows = _open_csv(path)
    if "text" not in header or "label" not in header:
        raise ExemplarError(
            [RowProblem(str(path), 1, f"header must have `text` and `label`, got {header}")]
        )
    ti, li = header.index("text"), header.index("label")
    texts, labels, problems = [], [], []
    for line, row in rows:
        if len(row) != len(header):
            problems.append(RowProblem(str(path), line, f"{len(row)} fields, header has "
                                                         f"{len(header)}"))
            continue
        if not row[ti].strip() or not row[li].strip():
            problems.append(RowProblem(str(path), line, "empty text or label"))
            continue
        texts.append(row[ti])
        labels.append(row[li].strip())
    if problems:
        raise ExemplarError(problems)
    return texts, labels


def read_outcome_csv(
    path: Path, targets: Sequence[str] | None = None
) -> tuple[list[str], FloatArray, tuple[str, ...]]:
    """Test rows ``text,<target>,...`` with each target's true quality (0..1). Non-numeric
    columns other than ``text`` (e.g. ``subject``) are ignored only when ``targets`` names the
    columns to use. Every test row needs every target's score."""
    header, rows = _open_csv(path)
    if not header or header[0] != "text":
        raise ExemplarError([RowProblem(str(path), 1, f"first column must be `text`, got {header}")])
    names = tuple(targets) if targets else tuple(header[1:])
    missing = [t for t in names if t not in header]
    if missing:
        raise ExemplarError([RowProblem(str(path), 1, f"no column for target(s) {missing}")])
    cols = [header.index(t) for t in names]
    texts: list[str] = []
    scores: list[list[float]] = []
    problems: list[RowProblem] = []
    for line, row in rows:
        if len(row) != len(header):
            problems.append(RowProblem(str(path), line, f"{len(row)} fields, header has "
                                                         f"{len(header)}"))
            continue
        vals: list[float] = []
        for name, c in zip(names, cols, strict=True):
            try:
                v = float(row[c])
            except ValueError:
                problems.append(RowProblem(str(path), line, f"{name}: {row[c]!r} is not a score"))
                break
            if not 0.0 <= v <= 1.0:
                problems.append(RowProblem(str(path), line, f"{name}: {v} is outside 0..1"))
                break
            vals.append(v)
        else:
            texts.append(row[0])
            scores.append(vals)
    if problems:
        raise ExemplarError(problems)
    return texts, np.asarray(scores, dtype=np.float64), names


# ---- runners ------------------------------------------------------------------------------------


@dataclass
class LabelledRun:
    """What the router did with each test query: the route it would pick with no threshold,
    the route it served, its confidence and whether it fell back."""

    predicted: list[str]
    served: list[str]
    confidence: FloatArray
    fallback: BoolArray
    seconds: float = 0.0


def _batches(texts: Sequence[str], size: int) -> list[Sequence[str]]:
    return [texts[i : i + size] for i in range(0, len(texts), size)]


def route_labelled(router: Router, texts: Sequence[str], batch_size: int = 256) -> LabelledRun:
    """Route every text with the real Router (index thresholds applied)."""
    import time

    from semroute.types import Query

    started = time.perf_counter()
    predicted, served, conf, fb = [], [], [], []
    for chunk in _batches(texts, batch_size):
        for d in router.route_batch([Query(t) for t in chunk]):
            # On a fallback the pre-threshold winner is the top vote share.
            predicted.append(next(iter(d.scores)) if d.fallback else d.route)
            served.append(d.route)
            conf.append(d.confidence)
            fb.append(d.fallback)
    return LabelledRun(predicted, served, np.asarray(conf, dtype=np.float64),
                       np.asarray(fb, dtype=bool), time.perf_counter() - started)


def route_outcomes(
    router: Router, texts: Sequence[str], targets: Sequence[str], batch_size: int = 128
) -> FloatArray:
    """Predicted quality per target (columns in ``targets`` order) for every text."""
    from semroute.types import Query

    rows: list[list[float]] = []
    for chunk in _batches(texts, batch_size):
        for d in router.route_batch([Query(t) for t in chunk]):
            rows.append([float(d.scores[t]) for t in targets])
    return np.asarray(rows, dtype=np.float64)


def _r(x: float | None, digits: int = 4) -> float | None:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return None
    return round(float(x), digits)


@dataclass
class Report:
    """A report.json body plus what the CLI prints and plots."""

    data: dict[str, Any]
    table: list[tuple[str, str]] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)


def labels_report(
    labels: Sequence[str], run: LabelledRun, known_routes: Sequence[str], n_bins: int = 10
) -> Report:
    """Every labelled metric from a run. Rows labelled ``oos`` or with a label the index does
    not know are out of scope: they must be abstained on (fallback) and are left out of
    accuracy, F1, coverage and calibration."""
    known = set(known_routes)
    oos = np.array([lab == OOS_LABEL or lab not in known for lab in labels], dtype=bool)
    ins = ~oos
    if not ins.any():
        raise ConfigError(
            f"no test row has a label the index knows (its routes: {sorted(known)[:10]}...); "
            "check that the test file and the index use the same labels"
        )
    y = [lab for lab, o in zip(labels, oos, strict=True) if not o]
    served = [s for s, o in zip(run.served, oos, strict=True) if not o]
    predicted = [p for p, o in zip(run.predicted, oos, strict=True) if not o]
    m = label_metrics(y, served, labels=sorted(known))
    raw_correct = np.array([p == t for p, t in zip(predicted, y, strict=True)])
    conf = run.confidence[ins]
    curve = coverage_curve(conf, raw_correct)
    ece, bins = reliability(conf, raw_correct, n_bins)
    answered = ~run.fallback[ins]
    served_ok = np.array([s == t for s, t in zip(served, y, strict=True)])
    answered_accuracy = float(served_ok[answered].mean()) if answered.any() else math.nan
    data: dict[str, Any] = {
        "n_test": len(labels),
        "n_in_scope": int(ins.sum()),
        "n_oos": int(oos.sum()),
        "accuracy": _r(m.accuracy),
        "accuracy_no_threshold": _r(float(raw_correct.mean())),
        "macro_f1": _r(m.macro_f1),
        "coverage": _r(float(1.0 - run.fallback[ins].mean())),
        "answered_accuracy": _r(answered_accuracy),
        "ece": _r(ece),
        "per_route": {
            k: {"precision": _r(v.precision), "recall": _r(v.recall), "f1": _r(v.f1),
                "support": v.support}
            for k, v in m.per_route.items()
        },
        "coverage_curve": [
            {"threshold": _r(p.threshold), "coverage": _r(p.coverage), "accuracy": _r(p.accuracy)}
            for p in curve
        ],
        "reliability": [
            {"lower": b.lower, "upper": b.upper, "count": b.count,
             "confidence": _r(b.confidence), "accuracy": _r(b.accuracy)}
            for b in bins
        ],
        "confusion": {"labels": list(m.labels), "matrix": m.confusion.tolist()},
        "seconds": _r(run.seconds, 2),
        "queries_per_second": _r(len(labels) / run.seconds, 1) if run.seconds else None,
    }
    table = [
        ("test rows", f"{len(labels)} ({int(oos.sum())} out of scope)"),
        ("accuracy", f"{m.accuracy:.4f}"),
        ("accuracy (no threshold)", f"{raw_correct.mean():.4f}"),
        ("macro-F1", f"{m.macro_f1:.4f}"),
        ("coverage", f"{data['coverage']:.4f}"),
        ("accuracy of answered", f"{answered_accuracy:.4f}"),
        ("ECE", f"{ece:.4f}"),
    ]
    if oos.any():
        ab = abstain_metrics(run.fallback, oos, run.confidence)
        data.update(oos_recall=_r(ab.recall), oos_precision=_r(ab.precision),
                    oos_auroc=_r(ab.auroc))
        table += [("OOS abstain recall", f"{ab.recall:.4f}"),
                  ("OOS abstain precision", f"{ab.precision:.4f}"),
                  ("OOS AUROC", f"{ab.auroc:.4f}")]
    return Report(data, table, {"metrics": m, "curve": curve, "bins": bins, "ece": ece})


def outcomes_report(
    predicted: FloatArray,
    quality: FloatArray,
    names: Sequence[str],
    costs: Sequence[float],
    weights: Sequence[float] | None = None,
) -> Report:
    """Cost-quality metrics of a router that predicted ``predicted`` (n, targets) on test rows
    whose true quality is ``quality``; ``costs`` are prices in the same column order.

    AIQ is taken over the price range of the targets (cheapest to dearest), so it is
    comparable across routers on the same targets.
    """
    c = np.asarray(costs, dtype=np.float64)
    sweep = cost_quality_sweep(predicted, quality, c, weights)
    singles = single_targets(quality, c, names)
    best = max(singles, key=lambda p: (p.quality, -p.cost))
    orc, rnd = oracle(quality, c), random_router(quality, c)
    lo, hi = float(c.min()), float(c.max())
    hull_cost = cost_at_quality(sweep, best.quality)
    reached = [p.cost for p in sweep if p.quality >= best.quality - 1e-12]
    max_q = max(p.quality for p in sweep)
    data: dict[str, Any] = {
        "n_test": int(quality.shape[0]),
        "targets": [{"target": p.label, "cost": p.cost, "quality": _r(p.quality)} for p in singles],
        "best_single": {"target": best.label, "quality": _r(best.quality), "cost": best.cost},
        "oracle": {"quality": _r(orc.quality), "cost": _r(orc.cost)},
        "random": {"quality": _r(rnd.quality), "cost": _r(rnd.cost)},
        "router_max_quality": _r(max_q),
        "router_max_quality_cost": _r(max(sweep, key=lambda p: (p.quality, -p.cost)).cost),
        "cost_ratio_at_best_single_quality": (
            _r(hull_cost / best.cost) if hull_cost is not None and best.cost > 0 else None
        ),
        "cost_ratio_at_best_single_quality_single_point": (
            _r(min(reached) / best.cost) if reached and best.cost > 0 else None
        ),
        "aiq": _r(aiq(sweep, (lo, hi))),
        "aiq_single_targets": _r(aiq(singles, (lo, hi))),
        "aiq_oracle": _r(aiq([orc], (lo, hi))),
        "aiq_cost_range": [lo, hi],
        "router_curve": [
            {"weight": p.label, "cost": _r(p.cost), "quality": _r(p.quality)} for p in sweep
        ],
        "router_hull": [{"cost": _r(x), "quality": _r(y)} for x, y in upper_hull(sweep)],
    }
    table = [
        ("test rows", str(quality.shape[0])),
        ("best single", f"{best.label}: {best.quality:.4f} at ${best.cost:.3g}"),
        ("oracle", f"{orc.quality:.4f} at ${orc.cost:.3g}"),
        ("random", f"{rnd.quality:.4f} at ${rnd.cost:.3g}"),
        ("router max quality", f"{max_q:.4f}"),
        ("cost to match best single",
         "never" if data["cost_ratio_at_best_single_quality"] is None
         else f"{data['cost_ratio_at_best_single_quality']:.3f} of its cost (hull); "
              f"single point {data['cost_ratio_at_best_single_quality_single_point']}"),
        ("AIQ", f"{data['aiq']:.4f} (single targets {data['aiq_single_targets']:.4f})"),
    ]
    extras: dict[str, Any] = {"sweep": sweep, "singles": singles, "oracle": orc, "random": rnd}
    if len(names) == 2:
        weak, strong = (0, 1) if c[0] <= c[1] else (1, 0)
        adv = predicted[:, strong] - predicted[:, weak]
        curve = pgr_curve(adv, quality[:, weak], quality[:, strong])
        best_adv = quality[:, strong] - quality[:, weak]
        ocurve = pgr_curve(best_adv, quality[:, weak], quality[:, strong])
        data.update(
            weak=names[weak], strong=names[strong],
            apgr=_r(apgr(curve)), cpt50=_r(cpt(curve, 0.5)), cpt80=_r(cpt(curve, 0.8)),
            apgr_oracle=_r(apgr(ocurve)), cpt50_oracle=_r(cpt(ocurve, 0.5)),
        )
        table += [
            ("APGR", f"{data['apgr']:.4f} (oracle {data['apgr_oracle']:.4f}, random 0.5)"),
            ("CPT(50%) / CPT(80%)", f"{data['cpt50']} / {data['cpt80']}"),
        ]
        extras.update(pgr=curve, pgr_oracle=ocurve)
    return Report(data, table, extras)


# ---- whole evaluations (CLI and scripts/evaluate.py) --------------------------------------------


def evaluate_labels(
    router: Router, test_csv: Path, out: Path, *, bins: int = 10, limit: int | None = None
) -> Report:
    """Route a labelled test CSV, write OUT/report.json and the PNG plots; return the report."""
    import json

    from semroute import plots
    from semroute.types import ExemplarKind

    if router.index.kind is not ExemplarKind.LABELLED:
        raise ConfigError(
            f"{router.index.path}: eval labels needs a labelled index (built from `text,label` "
            "rows); this one holds outcome scores: use `semroute eval outcomes`"
        )
    texts, labels = read_labelled_csv(test_csv)
    if limit:
        texts, labels = texts[:limit], labels[:limit]
    run = route_labelled(router, texts)
    report = labels_report(labels, run, list(router.index.route_table.routes), bins)
    report.data.update(provenance(router, test_csv))
    m = report.extras["metrics"]
    made = [
        plots.confusion_heatmap(m.confusion, m.labels, out / "confusion.png"),
        plots.coverage_plot(report.extras["curve"], out / "coverage.png"),
        plots.reliability_diagram(report.extras["bins"], report.extras["ece"],
                                  out / "reliability.png"),
    ]
    report.data["plots"] = [p.name for p in made]
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report.data, indent=2) + "\n")
    return report


def evaluate_outcomes(
    router: Router,
    test_csv: Path,
    out: Path,
    prices: Mapping[str, Target],
    *,
    limit: int | None = None,
) -> Report:
    """Route an outcome test CSV (a true score column per target), sweep the cost weight, write
    OUT/report.json and the PNG plots; return the report. Raises ConfigError when a target has
    no price or the index is not an outcome index."""
    import json

    from semroute import plots
    from semroute.types import ExemplarKind

    index = router.index
    if index.kind is not ExemplarKind.OUTCOMES:
        raise ConfigError(
            f"{index.path}: eval outcomes needs an outcome index (built from a CSV with a score "
            f"column per target); this one is {index.kind.value}: use `semroute eval labels`"
        )
    targets = list(index.score_targets)
    missing = [t for t in targets if t not in prices]
    if missing:
        raise ConfigError(
            f"no price for target(s) {missing}; give --targets with a routes YAML or a prices "
            "CSV (model,input_usd_per_1m_tokens,output_usd_per_1m_tokens)"
        )
    if max(prices[t].cost for t in targets) <= 0:
        raise ConfigError(
            f"{index.path}: every target's price is 0, so there is no cost axis; give --targets "
            "with a routes YAML or a prices CSV"
        )
    texts, quality, _ = read_outcome_csv(test_csv, targets)
    if limit:
        texts, quality = texts[:limit], quality[:limit]
    predicted = route_outcomes(router, texts, targets)
    report = outcomes_report(predicted, quality, targets, [prices[t].cost for t in targets])
    report.data.update(provenance(router, test_csv))
    ex = report.extras
    made = [plots.cost_quality_plot(ex["sweep"], ex["singles"], [ex["oracle"], ex["random"]],
                                    out / "cost_quality.png")]
    if "pgr" in ex:
        made.append(plots.pgr_plot(ex["pgr"], ex["pgr_oracle"], out / "pgr.png"))
    report.data["plots"] = [p.name for p in made]
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report.data, indent=2) + "\n")
    return report


def provenance(router: Router, test_csv: Path) -> dict[str, Any]:
    """Which index, settings and test file produced a report."""
    d = router.settings.decision
    return {
        "test_file": str(test_csv),
        "index": {"path": str(router.index.path), "version": router.index.version,
                  "exemplars": router.index.size,
                  "projection": bool(router.index.manifest.get("projection"))},
        "settings": {"k": d.k, "temperature": d.temperature, "shrinkage": d.shrinkage,
                     "null_similarity": d.null_similarity},
    }
