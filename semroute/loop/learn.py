"""Learning from feedback: logged decisions with a score become exemplars of a candidate index.

``prepare_learning`` turns the serving index's own exemplars plus the decision log's feedback
into exemplar files a normal ``build_index`` reads, and a routes file that keeps the serving
index's routes, targets and thresholds:

- an **outcome** index gains one row per logged query text with feedback: each target that
  answered it gets the mean feedback it received (a request's several scores, and repeats of
  the same text, averaged), every other target stays unknown (blank). The decision compares
  targets on the fully scored rows and corrects them by the feedback rows' residuals: their
  shared part moves every target alike, a target's own part moves it against the others
  (``semroute.decision.feedback_step``, its strength chosen by the build on held-out feedback
  rows, or the rows left out when they do not predict better). A query that is
  already an exemplar keeps its measured scores; feedback only fills its blank cells;
- a **labelled** index gains the queries whose answer scored at least ``min_score`` as exemplars
  of the route they were sent to (a low score says the route was wrong, not which one was right,
  so those rows are left out and counted).

Only queries whose text was logged can be learnt from (``log.log_query_text``); the others are
counted in ``LearnInput.skipped_no_text``. A share of the feedback (``holdout``, chosen by a
stable hash of the request id) is kept out of the candidate so the comparison with the serving
version is on feedback neither has seen.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import yaml

from semroute.errors import ConfigError
from semroute.index import EXEMPLARS_FILE, SCORES_FILE, read_manifest
from semroute.loop.records import DecisionRecord, Feedback
from semroute.manifest import IndexManifest
from semroute.types import ExemplarKind, RouteTable


@dataclass(frozen=True)
class LearnedRow:
    request_id: str
    text: str
    route: str
    target: str
    score: float
    ts: float
    # P(this target was served first | the serving decision), logged with exploration; 1 for
    # a row nothing could have been explored on (or a fallback answered: not a choice)
    propensity: float = 1.0


@dataclass
class LearnInput:
    """What ``prepare_learning`` wrote and why rows were left out."""

    exemplars_csv: Path
    routes_yaml: Path | None
    kind: str
    train: list[LearnedRow] = field(default_factory=list)
    holdout: list[LearnedRow] = field(default_factory=list)
    skipped_no_text: int = 0
    skipped_low_score: int = 0
    skipped_unknown_target: int = 0
    first_ts: float = 0.0
    last_ts: float = 0.0

    def provenance(self) -> dict[str, Any]:
        """For the candidate's manifest: which log rows, which time range."""
        return {
            "learned_rows": len(self.train),
            "holdout_rows": len(self.holdout),
            "skipped_no_text": self.skipped_no_text,
            "skipped_low_score": self.skipped_low_score,
            "skipped_unknown_target": self.skipped_unknown_target,
            "time_range": [self.first_ts, self.last_ts],
            "request_ids_sha256": hashlib.sha256(
                "\n".join(sorted(r.request_id for r in self.train)).encode()
            ).hexdigest(),
        }


def in_holdout(request_id: str, share: float) -> bool:
    """Stable split: the same request id is always on the same side."""
    digest = hashlib.sha256(request_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < share


def collect(
    pairs: list[tuple[DecisionRecord, Feedback]], holdout: float
) -> tuple[list[LearnedRow], list[LearnedRow], int]:
    """Feedback joined to decisions -> one row per request (scores averaged), split into train
    and held-out; also returns how many requests had no logged text."""
    scores: dict[str, list[float]] = defaultdict(list)
    decisions: dict[str, DecisionRecord] = {}
    targets: dict[str, str] = {}
    for decision, fb in pairs:
        decisions[decision.request_id] = decision
        scores[decision.request_id].append(fb.score)
        targets[decision.request_id] = fb.target or decision.target or decision.decided_target
    train: list[LearnedRow] = []
    held: list[LearnedRow] = []
    no_text = 0
    for rid, decision in decisions.items():
        if not decision.query_text:
            no_text += 1
            continue
        chosen = targets[rid] == decision.decided_target
        row = LearnedRow(rid, decision.query_text, decision.route, targets[rid],
                         float(np.mean(scores[rid])), decision.ts,
                         decision.propensity if chosen else 1.0)
        (held if in_holdout(rid, holdout) else train).append(row)
    return train, held, no_text


Predict = Callable[[list[str]], Sequence[Mapping[str, float]]]


def prepare_learning(
    version_dir: Path,
    pairs: list[tuple[DecisionRecord, Feedback]],
    work_dir: Path,
    *,
    holdout: float = 0.2,
    min_score: float = 0.5,
    predict: Predict | None = None,
) -> LearnInput:
    """Write the candidate's exemplar CSV (and routes file) under ``work_dir``.

    ``predict(texts)`` (outcome indexes; for measurement only, ``semroute learn`` does not pass
    it): the targets a learnt row has no feedback for are filled with the serving router's
    predicted quality instead of left blank. That feeds the index its own guesses as if they
    were observed, and measured worse than blank cells (``scripts/simulate_feedback.py
    --impute``, docs/LOOP.md)."""
    manifest = read_manifest(version_dir)
    kind = manifest.kind.value
    table = manifest.route_table
    train, held, no_text = collect(pairs, holdout)
    work_dir.mkdir(parents=True, exist_ok=True)
    out = LearnInput(work_dir / "exemplars.csv", None, kind, [], held, no_text)
    with (version_dir / EXEMPLARS_FILE).open(encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh]
    if manifest.kind is ExemplarKind.OUTCOMES:
        out.train = _write_outcomes(version_dir, manifest, rows, train, out, predict)
    else:
        out.train = _write_labelled(rows, train, min_score, out)
    if out.train:
        out.first_ts = min(r.ts for r in out.train)
        out.last_ts = max(r.ts for r in out.train)
    if table.routes and manifest.kind is not ExemplarKind.OUTCOMES:
        out.routes_yaml = work_dir / "routes.yaml"
        out.routes_yaml.write_text(yaml.safe_dump(_routes_yaml(table), sort_keys=False))
    return out


def _write_outcomes(
    version_dir: Path, manifest: IndexManifest, rows: list[dict[str, Any]],
    train: list[LearnedRow], out: LearnInput, predict: Predict | None,
) -> list[LearnedRow]:
    targets = list(manifest.score_targets)
    scores = np.load(version_dir / SCORES_FILE, allow_pickle=False)
    if scores.shape != (len(rows), len(targets)):
        raise ConfigError(f"{version_dir}: scores do not match the exemplars; rebuild the index")
    kept = [r for r in train if r.target in targets]
    out.skipped_unknown_target += len(train) - len(kept)
    merged = merge_feedback(
        [row["text"] for row in rows], np.asarray(scores, dtype=np.float64), targets, kept
    )
    learnt_texts = list(merged)[len(rows):]
    estimates: Sequence[Mapping[str, float]] = (
        predict(learnt_texts) if predict is not None and learnt_texts
        else [{} for _ in learnt_texts]
    )
    guesses = dict(zip(learnt_texts, estimates, strict=True))
    with out.exemplars_csv.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", *targets])
        for text, values in merged.items():
            guess = guesses.get(text, {})
            writer.writerow([text, *(
                _cell(v) if math.isfinite(v) else _cell(guess.get(t, math.nan))
                for t, v in zip(targets, values, strict=True)
            )])
    return kept


def merge_feedback(
    texts: list[str], scores: npt.NDArray[np.float64], targets: list[str],
    learnt: list[LearnedRow],
) -> dict[str, list[float]]:
    """Exemplar rows (text -> one score per target, NaN unknown) after feedback: the serving
    exemplars first, in their order, then one row per new text in the order first seen.

    A known exemplar score is kept as measured; a blank cell of an exemplar and each cell of a
    new text get the mean feedback of the target that answered that text (NaN when none did).
    """
    column = {t: j for j, t in enumerate(targets)}
    merged: dict[str, list[float]] = {}
    for text, values in zip(texts, scores, strict=True):
        merged.setdefault(text, [float(v) for v in values])
    sums: dict[tuple[str, str], list[float]] = defaultdict(list)
    for row in learnt:
        sums[(row.text, row.target)].append(row.score)
    for (text, target), values in sums.items():
        cells = merged.setdefault(text, [math.nan] * len(targets))
        j = column[target]
        if not math.isfinite(cells[j]):
            cells[j] = float(np.mean(values))
    return merged


def _write_labelled(
    rows: list[dict[str, Any]], train: list[LearnedRow], min_score: float, out: LearnInput
) -> list[LearnedRow]:
    kept = []
    with out.exemplars_csv.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label", "weight"])
        for row in rows:
            writer.writerow([row["text"], row["label"], row.get("weight", 1.0)])
        for learned in train:
            if learned.score < min_score:
                out.skipped_low_score += 1
                continue
            writer.writerow([learned.text, learned.route, 1.0])
            kept.append(learned)
    return kept


def _cell(value: float) -> str:
    return "" if value is None or not math.isfinite(float(value)) else f"{float(value):.6g}"


def _routes_yaml(table: RouteTable) -> dict[str, Any]:
    """The serving index's route table in routes.yaml form (version 1)."""
    doc: dict[str, Any] = {"version": 1}
    if table.default_route:
        doc["default"] = table.default_route
    if table.threshold is not None:
        doc["threshold"] = table.threshold
    doc["targets"] = {
        name: {"input_cost": t.input_cost, "output_cost": t.output_cost, "local": t.local}
        for name, t in table.targets.items()
    }
    doc["routes"] = {
        name: {"targets": list(route.targets),
               **({"threshold": route.threshold} if route.threshold is not None else {})}
        for name, route in table.routes.items()
    }
    return doc


@dataclass(frozen=True)
class ReplayScore:
    """Replay estimate of a router on held-out feedback: of the rows where it would have
    chosen the target that actually answered (``matched``), the mean feedback score. Rows
    where it chooses another target say nothing about it (their outcome is unknown).

    ``weighted_score`` weighs each matched row by 1 / its logged propensity (self-normalised
    inverse-propensity weighting): a row served by a target the serving index was unlikely to
    serve stands for the many such queries that target never saw, so a router that differs
    from the serving one is judged on the traffic it would get, not on the serving one's
    (equal to ``mean_score`` when nothing was explored)."""

    matched: int
    rows: int
    mean_score: float | None
    weighted_score: float | None = None

    def as_dict(self) -> dict[str, Any]:
        def r4(v: float | None) -> float | None:
            return None if v is None else round(v, 4)

        return {"matched": self.matched, "rows": self.rows, "mean_score": r4(self.mean_score),
                "weighted_score": r4(self.weighted_score)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ReplayScore:
        """The inverse of ``as_dict`` (its figures are rounded to 4 decimals)."""
        def opt(key: str) -> float | None:
            value = data.get(key)
            return None if value is None else float(value)

        return cls(int(data["matched"]), int(data["rows"]), opt("mean_score"),
                   opt("weighted_score"))


@dataclass(frozen=True)
class ReplayVerdict:
    """Serving and candidate replayed on the same held-out feedback rows.

    ``prefers_candidate`` only when both matched at least one row and the candidate's
    ``weighted_score`` is strictly higher: no evidence (a side that matched nothing) or a tie
    keeps the version serving, so a promotion guarded by it never acts on nothing."""

    serving: ReplayScore
    candidate: ReplayScore
    against: str = ""  # the serving version's name the replay ran against ('' not recorded)

    @property
    def prefers_candidate(self) -> bool:
        s, c = self.serving.weighted_score, self.candidate.weighted_score
        return s is not None and c is not None and c > s

    def as_dict(self) -> dict[str, Any]:
        return {"serving": self.serving.as_dict(), "candidate": self.candidate.as_dict(),
                "prefers_candidate": self.prefers_candidate}


def replay_record(version_dir: Path) -> Path:
    """Where ``semroute learn`` writes a candidate's provenance and held-out replay: in the
    ``--out`` root the version was built under (``OUT/versions/V`` -> ``OUT/learned-V.json``)."""
    root = version_dir.parent.parent if version_dir.parent.name == "versions" else \
        version_dir.parent
    return root / f"learned-{version_dir.name}.json"


def read_verdict(version_dir: Path) -> ReplayVerdict:
    """The held-out replay ``semroute learn`` recorded for ``version_dir``. Raises ConfigError
    naming the file when there is none (a version not made by ``learn``, or copied away from
    its record) or it holds no replay."""
    version_dir = Path(version_dir).resolve()
    record = replay_record(version_dir)
    if not record.exists():
        raise ConfigError(
            f"{record}: no held-out replay recorded for {version_dir.name} (`semroute learn "
            "--holdout` writes it beside the candidate); give the candidate's directory from "
            "`learn --out`, or promote without --if-better"
        )
    try:
        data = json.loads(record.read_text(encoding="utf-8"))
        replayed = data["holdout_replay"]
        return ReplayVerdict(ReplayScore.from_dict(replayed["serving"]),
                             ReplayScore.from_dict(replayed["candidate"]),
                             str(data.get("serving_version", "")))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{record}: no readable holdout_replay in it ({exc!r}); rerun "
                          "`semroute learn`") from exc


def replay(choose: Any, rows: list[LearnedRow]) -> ReplayScore:
    """``choose(text) -> target`` replayed on ``rows`` (see ``ReplayScore``)."""
    hits = [r for r in rows if choose(r.text) == r.target]
    if not hits:
        return ReplayScore(0, len(rows), None, None)
    weights = np.array([1.0 / max(r.propensity, 1e-6) for r in hits])
    scores = np.array([r.score for r in hits])
    return ReplayScore(len(hits), len(rows), float(scores.mean()),
                       float((weights * scores).sum() / weights.sum()))
