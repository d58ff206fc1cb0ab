"""`semroute index lint`: find problems in exemplar data before they become routing mistakes.

Checks (each finding names the row as file:line):

* ``duplicate``        the same text (ignoring case and spacing) twice with the same label (warning)
* ``label-conflict``   the same text with different labels (error)
* ``near-duplicate``   two texts almost identical in embedding space, same label (warning)
* ``near-conflict``    two texts almost identical in embedding space, different labels (error)
* ``too-few``          a route with fewer exemplars than the minimum (error)
* ``loo-accuracy``     a route whose exemplars, each left out in turn, are routed back to it less
                       often than the minimum (warning)
* ``low-margin``       an exemplar whose own neighbours vote for another route by more than the
                       margin (warning): usually mislabelled or ambiguous
* ``probe-margin``     (with a probe file) a probe query whose expected route does not win by
                       at least ``probe_margin`` of the vote, or whose best match is not at least
                       ``probe_gap`` more similar than any other route's (error): its decision
                       could flip between CPUs (see ``semroute.quality.probes``)

The checks work on embeddings and labels only, so they are testable without the encoder.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from semroute.config import Settings

if TYPE_CHECKING:
    from semroute.config import DecisionSettings
    from semroute.types import Encoder, Exemplar

ERROR = "error"
WARNING = "warning"


@dataclass(frozen=True)
class Finding:
    severity: str
    code: str
    where: str  # file:line of the row concerned
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.severity}: [{self.code}] {self.message}"


@dataclass(frozen=True)
class LintSettings:
    min_per_route: int = 5
    near_duplicate: float = 0.97  # cosine similarity at or above which two texts are "the same"
    conflict: float = 0.95  # same, for texts with different labels
    k: int = 10
    temperature: float = 0.05
    loo_min_accuracy: float = 0.8
    low_margin: float = 0.2  # own-route share minus best other share below -low_margin is flagged
    max_low_margin: int = 50  # report at most this many low-margin rows (worst first)
    probe_margin: float = 0.3  # a probe's expected route must lead the vote by at least this
    probe_gap: float = 0.0  # ... and its best match must beat other routes' by at least this


@dataclass
class LintReport:
    findings: list[Finding] = field(default_factory=list)
    loo_accuracy: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == ERROR]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == WARNING]


_SPACE = re.compile(r"\s+")


def normalise(text: str) -> str:
    """The form used to spot exact duplicates: case-folded, whitespace collapsed."""
    return _SPACE.sub(" ", text).strip().casefold()


def exact_duplicates(
    texts: Sequence[str], labels: Sequence[str], sources: Sequence[str]
) -> list[Finding]:
    """Repeated texts: a warning when the label repeats too, an error when it differs."""
    first: dict[str, int] = {}
    out: list[Finding] = []
    for i, text in enumerate(texts):
        key = normalise(text)
        j = first.setdefault(key, i)
        if j == i:
            continue
        if labels[i] == labels[j]:
            out.append(Finding(WARNING, "duplicate", sources[i], f"same text as {sources[j]}"))
        else:
            out.append(
                Finding(
                    ERROR,
                    "label-conflict",
                    sources[i],
                    f"label {labels[i]!r} but the same text is {labels[j]!r} at {sources[j]}",
                )
            )
    return out


def similar_pairs(
    vectors: npt.NDArray[np.float32], threshold: float, block: int = 1024
) -> list[tuple[int, int, float]]:
    """All pairs (i < j) whose cosine similarity is >= threshold (vectors L2-normalised)."""
    v = np.asarray(vectors, dtype=np.float32)
    pairs: list[tuple[int, int, float]] = []
    for start in range(0, len(v), block):
        sims = v[start : start + block] @ v.T
        rows, cols = np.nonzero(sims >= threshold)
        for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
            i = start + r
            if c > i:
                pairs.append((i, c, float(sims[r, c])))
    return pairs


def near_duplicates(
    texts: Sequence[str],
    labels: Sequence[str],
    sources: Sequence[str],
    vectors: npt.NDArray[np.float32],
    settings: LintSettings,
) -> list[Finding]:
    """Pairs close in embedding space but not textually identical (those are reported above)."""
    out: list[Finding] = []
    lo = min(settings.near_duplicate, settings.conflict)
    for i, j, sim in similar_pairs(vectors, lo):
        if normalise(texts[i]) == normalise(texts[j]):
            continue
        if labels[i] == labels[j]:
            if sim >= settings.near_duplicate:
                out.append(
                    Finding(
                        WARNING,
                        "near-duplicate",
                        sources[j],
                        f"similarity {sim:.3f} to {sources[i]} (same label {labels[i]!r})",
                    )
                )
        elif sim >= settings.conflict:
            out.append(
                Finding(
                    ERROR,
                    "near-conflict",
                    sources[j],
                    f"label {labels[j]!r} but {sources[i]} (similarity {sim:.3f}) is {labels[i]!r}",
                )
            )
    return out


def too_few(labels: Sequence[str], sources: Sequence[str], minimum: int) -> list[Finding]:
    counts = Counter(labels)
    first: dict[str, str] = {}
    for lab, src in zip(labels, sources, strict=True):
        first.setdefault(lab, src)
    return [
        Finding(
            ERROR,
            "too-few",
            first[lab],
            f"route {lab!r} has {n} exemplar(s); at least {minimum} are needed",
        )
        for lab, n in sorted(counts.items())
        if n < minimum
    ]


def leave_one_out_votes(
    vectors: npt.NDArray[np.float32], labels: Sequence[str], k: int, temperature: float
) -> tuple[list[str], npt.NDArray[np.float64]]:
    """Each exemplar routed by its k nearest *other* exemplars (similarity-softmax vote).

    Returns the label order and an (n, n_labels) matrix of vote shares.
    """
    names = sorted(set(labels))
    pos = {lab: i for i, lab in enumerate(names)}
    y = np.array([pos[lab] for lab in labels], dtype=np.int64)
    v = np.asarray(vectors, dtype=np.float32)
    n = len(v)
    kk = min(k, n - 1)
    shares = np.zeros((n, len(names)), dtype=np.float64)
    if kk <= 0:
        return names, shares
    for start in range(0, n, 1024):
        sims = v[start : start + 1024] @ v.T
        rows = np.arange(sims.shape[0])
        sims[rows, start + rows] = -np.inf  # leave the row itself out
        top = np.argpartition(-sims, kk - 1, axis=1)[:, :kk]
        top_sims = np.take_along_axis(sims, top, axis=1).astype(np.float64)
        w = np.exp((top_sims - top_sims.max(axis=1, keepdims=True)) / temperature)
        w /= w.sum(axis=1, keepdims=True)
        block = shares[start : start + sims.shape[0]]
        np.add.at(block, (np.repeat(rows, kk), y[top].ravel()), w.ravel())
    return names, shares


def loo_findings(
    labels: Sequence[str],
    sources: Sequence[str],
    vectors: npt.NDArray[np.float32],
    settings: LintSettings,
) -> tuple[dict[str, float], list[Finding]]:
    names, shares = leave_one_out_votes(vectors, labels, settings.k, settings.temperature)
    pos = {lab: i for i, lab in enumerate(names)}
    y = np.array([pos[lab] for lab in labels], dtype=np.int64)
    pred = shares.argmax(axis=1)
    per_route: dict[str, list[bool]] = defaultdict(list)
    for i, lab in enumerate(labels):
        per_route[lab].append(bool(pred[i] == y[i]))
    acc = {lab: float(np.mean(v)) for lab, v in sorted(per_route.items())}
    out: list[Finding] = []
    first: dict[str, str] = {}
    for lab, src in zip(labels, sources, strict=True):
        first.setdefault(lab, src)
    for lab, a in acc.items():
        if a < settings.loo_min_accuracy and len(per_route[lab]) > 1:
            out.append(
                Finding(
                    WARNING,
                    "loo-accuracy",
                    first[lab],
                    f"route {lab!r}: leave-one-out accuracy {a:.2f} "
                    f"< {settings.loo_min_accuracy:.2f}",
                )
            )
    own = shares[np.arange(len(y)), y]
    other = shares.copy()
    other[np.arange(len(y)), y] = -1.0
    best_other = other.argmax(axis=1)
    margin = own - other[np.arange(len(y)), best_other]
    flagged = np.flatnonzero(margin < -settings.low_margin)
    flagged = flagged[np.argsort(margin[flagged], kind="stable")][: settings.max_low_margin]
    for i in flagged.tolist():
        out.append(
            Finding(
                WARNING,
                "low-margin",
                sources[i],
                f"label {labels[i]!r} but its neighbours vote {names[best_other[i]]!r} "
                f"(margin {margin[i]:+.2f})",
            )
        )
    return acc, out


def lint(
    texts: Sequence[str],
    labels: Sequence[str],
    sources: Sequence[str],
    vectors: npt.NDArray[np.float32] | None,
    settings: LintSettings | None = None,
) -> LintReport:
    """Run every check. ``labels`` all "" means an outcome set: only duplicate checks apply.
    ``vectors`` None skips the embedding-based checks."""
    s = settings or LintSettings()
    labelled = any(labels)
    report = LintReport(counts=dict(Counter(labels)) if labelled else {"": len(texts)})
    report.findings.extend(exact_duplicates(texts, labels, sources))
    if labelled:
        report.findings.extend(too_few(labels, sources, s.min_per_route))
    if vectors is not None:
        report.findings.extend(near_duplicates(texts, labels, sources, vectors, s))
        if labelled and len(set(labels)) > 1:
            acc, found = loo_findings(labels, sources, vectors, s)
            report.loo_accuracy = acc
            report.findings.extend(found)
    return report


def _raw_csv_rows(path: Path) -> list[tuple[str, str, str]]:
    """(source, text, label) of every data row of an exemplar CSV, duplicates included
    (``read_exemplars`` has already validated the file and drops exact duplicates)."""
    from semroute.exemplars import read_csv

    table = read_csv(path)
    header = table.header
    ti = header.index("text") if "text" in header else 0
    li = header.index("label") if "label" in header else None
    rows: list[tuple[str, str, str]] = []
    for line, row in table.rows:
        text = row[ti] if ti < len(row) else ""
        label = row[li].strip() if li is not None and li < len(row) else ""
        rows.append((f"{path}:{line}", text.strip(), label))
    return rows


def lint_files(
    paths: Sequence[Path],
    settings: LintSettings | None = None,
    *,
    embed: bool = True,
    encoder_path: Path | None = None,
    app_settings: Settings | None = None,
    probes: Path | None = None,
) -> LintReport:
    """Validate exemplar files (ExemplarError lists bad rows as file:line), then run every check.

    Exact duplicates are found on the raw CSV rows; the embedding checks run on the rows an
    index build would keep.
    """
    from semroute.exemplars import read_exemplars

    s = settings or LintSettings()
    exemplar_set = read_exemplars([Path(p) for p in paths])
    raw: list[tuple[str, str, str]] = []
    for p in paths:
        if Path(p).suffix.lower() == ".csv":
            raw.extend(_raw_csv_rows(Path(p)))
    kept = exemplar_set.exemplars
    texts = [e.text for e in kept]
    labels = [e.label for e in kept]
    sources = [e.source for e in kept]
    vectors = None
    if embed:
        from semroute.encoder import OnnxEncoder, embed_many

        conf = app_settings or Settings()
        encoder = OnnxEncoder.from_settings(encoder_path or conf.encoder.path, conf.encoder)
        vectors = embed_many(encoder, texts, batch_size=conf.encoder.batch_size)
        if probes is not None:
            probe_found = probe_findings(probes, encoder, vectors, kept, conf.decision, s)
    report = lint(texts, labels, sources, vectors, s)
    if probes is not None and vectors is not None:
        report.findings.extend(probe_found)
    if raw:
        # Duplicates dropped by the reader are only visible in the raw rows.
        report.findings = [
            f for f in report.findings if f.code not in {"duplicate", "label-conflict"}
        ]
        report.findings[:0] = exact_duplicates(
            [r[1] for r in raw], [r[2] for r in raw], [r[0] for r in raw]
        )
    return report


def probe_findings(
    path: Path,
    encoder: Encoder,
    exemplar_vectors: npt.NDArray[np.float32],
    exemplars: Sequence[Exemplar],
    decision: DecisionSettings,
    settings: LintSettings,
) -> list[Finding]:
    """``probe-margin`` errors for the probes in ``path`` (``text,label`` CSV) that do not win
    clearly over ``exemplars`` (see ``semroute.quality.probes``), decided as the router decides
    (``decision``: the ``decision`` settings section: k, temperature, null similarity)."""
    from semroute.decision import DecisionParams
    from semroute.quality.probes import probe_margins, read_probes

    rows = read_probes(path)
    margins = probe_margins(
        rows,
        encoder.encode([p.text for p in rows]),
        exemplar_vectors,
        [e.label for e in exemplars],
        np.array([e.weight for e in exemplars], dtype=np.float32),
        k=decision.k,
        params=DecisionParams(
            temperature=decision.temperature, null_similarity=decision.null_similarity
        ),
    )
    out: list[Finding] = []
    for m in margins:
        if m.vote_margin >= settings.probe_margin and m.similarity_gap >= settings.probe_gap:
            continue
        verdict = f"routes to {m.winner!r}" if not m.correct else f"wins over {m.runner_up!r}"
        out.append(
            Finding(
                ERROR,
                "probe-margin",
                m.probe.source,
                f"expected {m.probe.label!r}, {verdict}: share {m.share:.2f}, vote margin "
                f"{m.vote_margin:+.2f} (bound {settings.probe_margin:.2f}), similarity gap "
                f"{m.similarity_gap:+.3f} (bound {settings.probe_gap:.3f}); add exemplars "
                f"near it or reword it",
            )
        )
    return out
