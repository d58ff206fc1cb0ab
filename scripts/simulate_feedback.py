"""The feedback loop, shown on LLMRouter: start small, serve traffic, collect feedback, learn.

    .venv/bin/python scripts/simulate_feedback.py [--json] [--explore 0.1] [--rounds 1]
        [--seeds 1] [--impute] [--no-write] [--reference-shares 0.2] [--holdout 0.2]
        [--no-guard] [--eval-rows 1000] [--explore-grid 0.1,0.3,1,1u,0.3c]

0. ``--eval-rows`` train rows (drawn once, the same for every seed; rows whose text appears
   elsewhere in train are not drawn) are kept out of everything below and used, with every
   target's true score, as a second yardstick beside the 500-row test split.
1. An outcome index from a seeded 10% of LLMRouter's train split (``before``), and one from the
   rest of train with every score (``full``: the ceiling of what labels can give).
2. The rest of train is traffic through the real router, in process: each query is routed by the
   serving index, logged in a SQLite decision log with its text, and given feedback from the
   dataset's score for the served target only (what a user's thumbs-up would say). With
   ``--explore E`` a share E of queries is served by another target instead, chosen as the
   dispatcher's ``explore_rate`` does (``semroute.explore``: Thompson-drawn among the targets
   predicted within ``TOLERANCE`` of the chosen one), recorded as explored with its propensity.
   ``--explore-grid`` also takes uniform exploration over every target (``1u``: the widest
   logging one answer per query allows) and exploration toward the targets observed least
   among the query's nearest start rows and served queries (``0.3c``; ``Observations``).
3. ``learn``: the logged feedback, but a stable ``--holdout`` share of it, joins the serving
   exemplars (one known score per row, the other targets unknown; ``--impute`` fills them
   with the serving index's predictions instead, to measure that) in a candidate index; the
   candidate is shadowed on the next traffic (agreement with the serving decisions, counted
   per route as the router's shadow mode does, ``semroute.loop.arms``), both are replayed on
   the held-out feedback as ``semroute learn`` does (``loop.learn.ReplayVerdict``), and the
   candidate is promoted (``semroute.loop.promote``) only when the replay prefers it, as
   ``semroute index promote --if-better`` would (``--no-guard``: always).
4. Before, after (the index serving after the guard), the last candidate (promoted or not) and
   full are evaluated on LLMRouter's test split and on the held-out train rows: AIQ (area
   under the cost-quality hull, as RouterBench) and the maximum quality. For scale, indexes
   from larger shares of train with every score (``--reference-shares``) and the last
   candidates with the feedback correction pinned to a few fixed strengths
   (``FIXED_FEEDBACK``; ``off`` separates learning from the larger index's approximate
   search) are evaluated too.

By default both runs are made, without and with exploration (``--explore`` sets its rate,
0.1 by default), and docs/LOOP.md gets the table; ``--seeds N`` repeats steps 1-4 with N
seeds (the start rows and the traffic drawn by each) and tabulates the gap closed by each.
``--explore-grid`` runs no exploration and each setting listed on every seed instead (no
fixed-correction evaluations) and writes its own section. Every text is embedded once (one
cached encoder shared by the builds, the routers and the evaluations). The last stdout line is
JSON: ``{"before": {...}, "after": {...}, "full": {...}, "after_explore": {...},
"gap_closed_heldout": ..., "promoted": [...], "seeds": [...], "runs": {...}, ...}``; each
evaluation holds its held-out-rows figures under ``"heldout"``, each round its guard's
``holdout_replay``.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchlib import machine, write_section  # noqa: E402

from semroute.config import DecisionSettings, Settings  # noqa: E402
from semroute.encoder import CachedEncoder, OnnxEncoder  # noqa: E402
from semroute.exemplars import read_targets_csv  # noqa: E402
from semroute.explore import Explored  # noqa: E402
from semroute.explore import explore as explore_chain  # noqa: E402
from semroute.index import ExemplarIndex, build_index, switch_current  # noqa: E402
from semroute.loop.arms import Agreement  # noqa: E402
from semroute.loop.decision_log import DecisionLog  # noqa: E402
from semroute.loop.learn import (  # noqa: E402
    LearnedRow,
    ReplayScore,
    ReplayVerdict,
    prepare_learning,
    replay,
)
from semroute.loop.promote import promote  # noqa: E402
from semroute.loop.records import DecisionRecord, Feedback, query_fields  # noqa: E402
from semroute.loop.store import open_store  # noqa: E402
from semroute.quality.evaluate import evaluate_outcomes  # noqa: E402
from semroute.quality.testfiles import read_outcome_csv  # noqa: E402
from semroute.router import Router  # noqa: E402
from semroute.types import Encoder, Query  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "llmrouter"
TOLERANCE = 0.1  # exploration: alternatives within this much predicted quality of the best
COUNT_NEIGHBOURS = 32  # count-aware exploration: observations counted over this many neighbours
# the learnt index evaluated again with these feedback corrections (name, shrinkage, T)
FIXED_FEEDBACK: tuple[tuple[str, float | None, float], ...] = (
    ("off", None, 0.05), ("m3_T0.05", 3.0, 0.05), ("m10_T0.05", 10.0, 0.05),
    ("m30_T0.1", 30.0, 0.1),
)
LOOP_HEADER = (
    "# The loop: decision log, feedback, learning\n\n"
    "Figures written by scripts (the command is beside each section); one run each, on the\n"
    "machine named there.\n"
)


def _write_csv(path: Path, targets: list[str], texts: list[str], scores: Any) -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", *targets])
        for text, row in zip(texts, scores, strict=True):
            writer.writerow([text, *(f"{v:.6g}" for v in row)])
    return path


def _evaluate(router: Router, test: Path, prices: Any, work: Path) -> dict[str, Any]:
    """AIQ and maximum quality on the test split, and why: the mean absolute error of the
    predicted quality per target, and the decision settings the build's tuning chose."""
    report = evaluate_outcomes(router, test, work, prices).report
    texts, truth, names = read_outcome_csv(test)
    decisions = router.route_batch([Query(t) for t in texts])
    predicted = np.array([[d.scores[t] for t in names] for d in decisions])
    tuned = router.index.manifest.decision
    return {"aiq": round(float(report.aiq), 4),
            "max_quality": round(float(report.router_max_quality), 4),
            "mae": round(float(np.nanmean(np.abs(predicted - truth))), 4),
            "mae_per_target": {t: round(float(np.nanmean(np.abs(predicted[:, j] - truth[:, j]))),
                                        4) for j, t in enumerate(names)},
            "tuned": {k: tuned[k] for k in ("k", "use_neighbours", "feedback_shrinkage",
                                            "feedback_temperature") if k in tuned}}


def _router(path: Path, encoder: Encoder, settings: Settings) -> Router:
    """A router over ``path`` sharing the one cached encoder (no text is embedded twice)."""
    return Router(encoder, ExemplarIndex.load(path), settings)


def _uniform(chain: tuple[str, ...], targets: list[str], rate: float,
             rng: random.Random) -> Explored:
    """With probability ``rate`` a target drawn uniformly from all of them serves (the decided
    one included): at rate 1 every target is equally likely whatever the index predicts, the
    widest logging policy one answer per query allows."""
    pick = rng.choice(targets) if rng.random() < rate else chain[0]
    propensity = (1.0 - rate) * (pick == chain[0]) + rate / len(targets)
    return Explored((pick, *(t for t in chain if t != pick)), pick != chain[0], propensity)


class Observations:
    """Which targets have been observed near a query so far, as a dispatcher could count them
    from its decision log: the start rows (every target scored) and each query served since
    (the served target only), counted over the ``COUNT_NEIGHBOURS`` nearest of them."""

    def __init__(self, vectors: Any, observed: Any, capacity: int) -> None:
        n, dim = vectors.shape
        self.vectors = np.zeros((n + capacity, dim), dtype=np.float32)
        self.observed = np.zeros((n + capacity, observed.shape[1]), dtype=bool)
        self.vectors[:n], self.observed[:n], self.size = vectors, observed, n

    def least_observed(self, vector: Any) -> list[int]:
        """The targets (column numbers) observed least often among the nearest rows."""
        sims = self.vectors[:self.size] @ vector
        k = min(COUNT_NEIGHBOURS, self.size)
        near = np.argpartition(-sims, k - 1)[:k]
        counts = self.observed[near].sum(axis=0)
        return [int(j) for j in np.flatnonzero(counts == counts.min())]

    def add(self, vector: Any, column: int) -> None:
        self.vectors[self.size] = vector
        self.observed[self.size, column] = True
        self.size += 1


def _count_aware(chain: tuple[str, ...], targets: list[str], least: list[int], rate: float,
                 rng: random.Random) -> Explored:
    """With probability ``rate`` one of the targets observed least near the query serves
    (uniform among them; the decided one may be among them)."""
    pick = targets[rng.choice(least)] if rng.random() < rate else chain[0]
    share = rate / len(least) if targets.index(pick) in least else 0.0
    propensity = (1.0 - rate) * (pick == chain[0]) + share
    return Explored((pick, *(t for t in chain if t != pick)), pick != chain[0], propensity)


def _serve(router: Router, texts: list[str], scores: Any, targets: list[str], log: DecisionLog,
           explore: Exploration, rng: random.Random, offset: int = 0,
           observations: Observations | None = None) -> dict[str, float]:
    """Route the traffic, log each decision with the feedback of the target that served it."""
    served_quality = []
    explored = 0
    index = {t: j for j, t in enumerate(targets)}
    start = 0
    batch = 256
    while start < len(texts):
        chunk = texts[start:start + batch]
        decisions = router.route_batch([Query(t) for t in chunk])
        vectors = router.encoder.encode(chunk) if observations is not None else None
        for i, (text, decision) in enumerate(zip(chunk, decisions, strict=True)):
            row = start + i
            if observations is not None and vectors is not None:
                least = observations.least_observed(vectors[i])
                tried = _count_aware(tuple(decision.targets), targets, least, explore.rate, rng)
                observations.add(vectors[i], index[tried.chain[0]])
            elif explore.uniform:
                tried = _uniform(tuple(decision.targets), targets, explore.rate, rng)
            else:
                tried = explore_chain(decision.targets, decision.scores, rate=explore.rate,
                                      tolerance=TOLERANCE, rng=rng)
            target, was_explored = tried.chain[0], tried.explored
            explored += was_explored
            score = float(scores[row][index[target]])
            served_quality.append(score)
            rid = f"sim-{offset + row}"
            # as the dispatcher logs it: the first target served, and its odds of being so
            log.record(DecisionRecord(
                rid, time.time(), decision.route, target, target, decision.confidence,
                decision.fallback, "ok", index_version=router.index.version, explored=was_explored,
                propensity=tried.propensity,
                **query_fields(text, keep_text=True),  # type: ignore[arg-type]
            ))
            log.feedback(Feedback(rid, score, ts=time.time(), target=target))
        start += batch
    log.flush()
    return {"served_mean_quality": round(sum(served_quality) / len(served_quality), 4),
            "explored": explored}


def run(explore: Exploration, args: argparse.Namespace, work: Path, encoder: Encoder,
        start_version: Path, traffic: tuple[list[str], Any], targets: list[str],
        settings: Settings, yardsticks: Yardsticks, fixed: bool = True) -> dict[str, Any]:
    """Serve the traffic in ``args.rounds`` rounds; after each, learn from the feedback so far
    (a stable ``args.holdout`` share of it kept out), replay serving and candidate on the
    held-out feedback and promote the candidate only when the replay prefers it (all of them
    with ``--no-guard``), so the next round is served (and imputed) by the index that won."""
    tag = explore.tag
    serving_root = work / f"serving-{tag}"
    serving_root.mkdir()
    switch_current(serving_root, start_version)
    log = DecisionLog(open_store(f"sqlite:{work / f'log-{tag}.db'}"), max_queue=100_000)
    texts, scores = traffic
    rng = random.Random(args.seed + 1)
    bounds = [round(i * len(texts) / args.rounds) for i in range(args.rounds + 1)]
    served: list[dict[str, float]] = []
    agreement: list[float] = []
    rounds: list[dict[str, Any]] = []
    learned = 0
    candidate_version = start_version
    observations = None
    if explore.count_aware:
        start_index = ExemplarIndex.load(start_version)
        observations = Observations(encoder.encode(list(start_index.texts)),
                                    np.isfinite(start_index.scores), len(texts))
    for r in range(args.rounds):
        serving = _router(serving_root, encoder, settings)
        part = slice(bounds[r], bounds[r + 1])
        served.append(_serve(serving, texts[part], scores[part], targets, log, explore, rng,
                             offset=bounds[r], observations=observations))

        def predict(batch: list[str], router: Router = serving) -> list[dict[str, float]]:
            return [dict(d.scores) for d in router.route_batch([Query(t) for t in batch])]

        learnt = prepare_learning(start_version, log.store.with_feedback(),
                                  work / f"learn-{tag}-{r}", holdout=args.holdout,
                                  predict=predict if args.impute else None)
        learned = len(learnt.train)
        candidate_version = build_index(
            [learnt.exemplars_csv], work / f"candidates-{tag}", encoder,
            targets_file=args.data / "models.csv", settings=settings.index, progress=False,
        )
        # shadow: the candidate decides the next round's traffic next to the serving index
        upcoming = texts[bounds[r + 1]: bounds[r + 1] + 500] or texts[:500]
        candidate = _router(candidate_version, encoder, settings)
        shadow = Agreement()
        for by_serving, by_candidate in zip(serving.route_batch([Query(t) for t in upcoming]),
                                            candidate.route_batch([Query(t) for t in upcoming]),
                                            strict=True):
            shadow.record(by_serving, by_candidate)
        agreement.append(round(shadow.overall.rate, 4))
        verdict = ReplayVerdict(_replay(serving, learnt.holdout), _replay(candidate,
                                                                          learnt.holdout))
        promoted = verdict.prefers_candidate or args.no_guard
        if promoted:
            promote(serving_root, str(candidate_version), by="simulate_feedback",
                    reason=f"round {r}: learned from {len(learnt.train)} feedback rows; shadow "
                    f"agreement {shadow.overall.rate:.3f}; held-out replay serving "
                    f"{verdict.serving.weighted_score}, candidate "
                    f"{verdict.candidate.weighted_score}")
        rounds.append({"promoted": promoted, "learned_rows": len(learnt.train),
                       "holdout_rows": len(learnt.holdout),
                       "holdout_replay": verdict.as_dict()})
    log.close()
    after = yardsticks.measure(_router(serving_root, encoder, settings), work / f"eval-a-{tag}")
    # the last candidate whether promoted or not: what learning gave, apart from the guard
    last = (after if rounds[-1]["promoted"] else
            yardsticks.measure(_router(candidate_version, encoder, settings),
                               work / f"eval-c-{tag}"))
    # the same learnt index with the feedback correction set by hand instead of by the build's
    # CV: what each strength gives on test (not a choice: the CV above picks without test)
    fixed_aiq = {}
    for name, m, t in FIXED_FEEDBACK if fixed else ():
        pinned = settings.model_copy(update={"decision": DecisionSettings(
            feedback_shrinkage=m, feedback_temperature=t)})
        fixed_aiq[name] = yardsticks.test_aiq(_router(candidate_version, encoder, pinned),
                                              work / f"eval-fixed-{tag}-{name}")
    return {"after": after, "candidate": last, "promoted": [x["promoted"] for x in rounds],
            "rounds": rounds, "served": served, "learned_rows": learned,
            "shadow_agreement": agreement, "fixed_feedback_aiq": fixed_aiq}


def _replay(router: Router, rows: list[LearnedRow]) -> ReplayScore:
    """``learn``'s held-out replay of ``router`` (its choices routed in one batch)."""
    chosen = {t: d.target for t, d in zip(
        [r.text for r in rows], router.route_batch([Query(r.text) for r in rows]), strict=True)}
    return replay(chosen.__getitem__, rows)


class Exploration:
    """One exploration setting: ``rate``, Thompson among near targets (the dispatcher's),
    uniform over every target (``u`` suffix in ``--explore-grid``) or toward the targets
    observed least near the query (``c`` suffix, ``Observations``)."""

    def __init__(self, rate: float, uniform: bool = False, count_aware: bool = False) -> None:
        self.rate, self.uniform, self.count_aware = rate, uniform, count_aware
        self.tag = f"{rate:g}{'u' if uniform else ''}{'c' if count_aware else ''}"

    @classmethod
    def parse(cls, text: str) -> Exploration:
        text = text.strip()
        return cls(float(text.rstrip("uc")), text.endswith("u"), text.endswith("c"))

    def label(self) -> str:
        if self.rate <= 0:
            return "no exploration"
        if self.count_aware:
            return (f"{self.rate:.0%} toward the least observed of the {COUNT_NEIGHBOURS} "
                    "nearest")
        return f"{self.rate:.0%} " + ("uniform over all targets" if self.uniform else
                                      f"Thompson within {TOLERANCE}")


class Yardsticks:
    """Where an index is measured: the test split, and ``eval_rows`` train rows kept out of the
    start rows, the traffic and the full-label index (every target's score known)."""

    def __init__(self, data: Path, heldout_csv: Path | None, prices: Any) -> None:
        self.test, self.heldout, self.prices = data / "test.csv", heldout_csv, prices

    def measure(self, router: Router, work: Path) -> dict[str, Any]:
        out = _evaluate(router, self.test, self.prices, work / "test")
        if self.heldout is not None:
            held = _evaluate(router, self.heldout, self.prices, work / "heldout")
            out["heldout"] = {k: held[k] for k in ("aiq", "max_quality", "mae")}
        return out

    def test_aiq(self, router: Router, work: Path) -> float:
        return float(_evaluate(router, self.test, self.prices, work)["aiq"])


def _closed(before: dict[str, Any], after: dict[str, Any], full: dict[str, Any],
            heldout: bool = False) -> float | None:
    """Share of the AIQ gap start -> full closed by ``after`` (on test, or the held-out rows)."""
    if heldout:
        if "heldout" not in before:
            return None
        before, after, full = before["heldout"], after["heldout"], full["heldout"]
    gap = full["aiq"] - before["aiq"]
    return round((after["aiq"] - before["aiq"]) / gap, 4) if gap > 0 else None


def _seed(seed: int, args: argparse.Namespace, work: Path, encoder: Encoder, pool: list[int],
          n_start: int, texts: list[str], scores: Any, targets: list[str], settings: Settings,
          yardsticks: Yardsticks, full: dict[str, Any], settings_run: list[Exploration],
          fixed: bool) -> dict[str, Any]:
    """Steps 1-4 with the start rows and the traffic drawn by ``seed`` from ``pool`` (the train
    rows outside the held-out yardstick; the full-label index is the same for every seed)."""
    order = list(pool)
    random.Random(seed).shuffle(order)
    work.mkdir()
    start_csv = _write_csv(work / "start.csv", targets, [texts[i] for i in order[:n_start]],
                           scores[order[:n_start]])
    start_version = build_index([start_csv], work / "start", encoder,
                                targets_file=args.data / "models.csv", settings=settings.index,
                                progress=False)
    before = yardsticks.measure(_router(start_version, encoder, settings), work / "eval-b")
    traffic = ([texts[i] for i in order[n_start:]], scores[order[n_start:]])
    seeded = argparse.Namespace(**{**vars(args), "seed": seed})
    runs = {e.tag: run(e, seeded, work, encoder, start_version, traffic, targets, settings,
                       yardsticks, fixed=fixed) for e in settings_run}
    return {"seed": seed, "before": before, "start_version": start_version,
            "start_rows": n_start, "traffic_rows": len(traffic[0]), "runs": runs,
            "summary": {tag: {
                "after": r["after"]["aiq"], "candidate": r["candidate"]["aiq"],
                "promoted": r["promoted"],
                "gap_closed": _closed(before, r["after"], full),
                "gap_closed_candidate": _closed(before, r["candidate"], full),
                **({"after_heldout": r["after"]["heldout"]["aiq"],
                    "candidate_heldout": r["candidate"]["heldout"]["aiq"],
                    "gap_closed_heldout": _closed(before, r["after"], full, True),
                    "gap_closed_candidate_heldout": _closed(before, r["candidate"], full, True)}
                   if "heldout" in before else {}),
            } for tag, r in runs.items()}}


def _heldout_rows(texts: list[str], n: int) -> tuple[list[int], list[int]]:
    """``n`` train rows drawn once (seed 7919, whatever ``--seed``), minus those whose text is
    also elsewhere in train, and the other rows (the pool start rows and traffic come from)."""
    order = list(range(len(texts)))
    random.Random(7919).shuffle(order)
    count = Counter(texts)
    kept = sorted(i for i in order[:n] if count[texts[i]] == 1)
    taken = set(kept)
    return kept, [i for i in range(len(texts)) if i not in taken]


def _flags(args: argparse.Namespace) -> str:
    """The non-default options of this run, as typed."""
    flags = f" --rounds {args.rounds}" if args.rounds != 1 else ""
    flags += f" --explore {args.explore:g}" if args.explore != 0.1 else ""
    flags += f" --seeds {args.seeds}" if args.seeds != 1 else ""
    flags += f" --explore-grid {args.explore_grid}" if args.explore_grid else ""
    flags += f" --holdout {args.holdout:g}" if args.holdout != 0.2 else ""
    flags += f" --eval-rows {args.eval_rows}" if args.eval_rows != 1000 else ""
    flags += f" --reference-shares '{args.reference_shares}'" \
        if args.reference_shares != "0.2" else ""
    flags += " --no-guard" if args.no_guard else ""
    return flags + (" --impute" if args.impute else "")


def _mean(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if r[key] is not None]
    return round(sum(values) / len(values), 4) if values else None


def _tuned(result: dict[str, Any]) -> str:
    tuned = result.get("tuned", {})
    if tuned.get("use_neighbours") is False:
        return "neighbours off"
    if "feedback_shrinkage" in tuned:
        return (f"{tuned.get('k', '?')}; feedback rows: shrinkage {tuned['feedback_shrinkage']:g}"
                f", T {tuned.get('feedback_temperature', 0.05):g}")
    return str(tuned.get("k", "?"))


def _table_rows(seeds: list[dict[str, Any]], tag: str, key: str) -> str:
    values = [x["summary"][tag].get(key) for x in seeds]
    mean = _mean([{"v": v} for v in values], "v")
    return " / ".join("-" if v is None else f"{v:.2f}" for v in values) + f" (mean {mean})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--start-share", type=float, default=0.1)
    parser.add_argument("--explore", type=float, default=0.1)
    parser.add_argument("--explore-grid", default="",
                        help="comma-separated exploration rates, a 'u' suffix for uniform over "
                        "all targets, 'c' for toward the least observed near the query (e.g. "
                        "0.1,0.3,1,1u,0.3c): each is run beside no exploration on "
                        "every seed, without the fixed-correction evaluations, and tabulated in "
                        "their own section of docs/LOOP.md")
    parser.add_argument("--impute", action="store_true",
                        help="fill the targets without feedback with the serving index's "
                        "predictions instead of leaving them unknown (measured worse)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="learn and promote after each of this many slices of traffic")
    parser.add_argument("--holdout", type=float, default=0.2,
                        help="share of the feedback kept out of each candidate for the replay "
                        "that guards its promotion (as `semroute learn --holdout`)")
    parser.add_argument("--no-guard", action="store_true",
                        help="promote every candidate, whatever the held-out replay says")
    parser.add_argument("--eval-rows", type=int, default=1000,
                        help="train rows drawn once (whatever --seed) and kept out of start "
                        "rows, traffic and the full-label index, to measure on beside test "
                        "(a row whose text is elsewhere in train is not drawn); 0: test only")
    parser.add_argument("--reference-shares", default="0.2",
                        help="comma-separated shares of train also built with every score, "
                        "to compare: 0.2 holds as many scores as the start rows plus one "
                        "feedback score per traffic row ('' for none)")
    parser.add_argument("--seeds", type=int, default=1,
                        help="repeat with this many seeds (--seed, --seed + 1, ...) for the "
                        "start rows and the traffic, and report the gap closed by each: a "
                        "500-row test split moves by a few thousandths between draws")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    settings = Settings()
    encoder = CachedEncoder(OnnxEncoder.from_settings(settings.encoder.path, settings.encoder),
                            1_000_000)
    prices = read_targets_csv(args.data / "models.csv")
    texts, scores, targets_t = read_outcome_csv(args.data / "train.csv")
    targets = list(targets_t)
    heldout_rows, pool = (_heldout_rows(texts, args.eval_rows) if args.eval_rows > 0
                          else ([], list(range(len(texts)))))
    n_start = int(len(texts) * args.start_share)
    grid = [Exploration.parse(x) for x in args.explore_grid.split(",") if x.strip()]
    explorations = [Exploration(0.0), *(grid or [Exploration(args.explore)])]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="semroute-sim-") as tmp:
        work = Path(tmp)
        heldout_csv = (_write_csv(work / "heldout.csv", targets,
                                  [texts[i] for i in heldout_rows], scores[heldout_rows])
                       if heldout_rows else None)
        yardsticks = Yardsticks(args.data, heldout_csv, prices)
        full_csv = _write_csv(work / "full.csv", targets, [texts[i] for i in pool], scores[pool])
        full_version = build_index([full_csv], work / "full", encoder,
                                   targets_file=args.data / "models.csv",
                                   settings=settings.index, progress=False)
        full = yardsticks.measure(_router(full_version, encoder, settings), work / "eval-f")
        seeds = [_seed(seed, args, work / f"seed-{seed}", encoder, pool, n_start, texts, scores,
                       targets, settings, yardsticks, full, explorations,
                       fixed=not grid and seed == args.seed)
                 for seed in range(args.seed, args.seed + args.seeds)]
        references = {}
        order = list(pool)
        random.Random(args.seed).shuffle(order)  # as _seed draws: the start rows come first
        for share in (float(x) for x in args.reference_shares.split(",") if x.strip()):
            rows_r = order[:int(len(texts) * share)]
            ref_csv = _write_csv(work / f"ref-{share:g}.csv", targets,
                                 [texts[i] for i in rows_r], scores[rows_r])
            ref_version = build_index([ref_csv], work / f"ref-{share:g}", encoder,
                                      targets_file=args.data / "models.csv",
                                      settings=settings.index, progress=False)
            references[f"{share:g}"] = {"rows": len(rows_r), **yardsticks.measure(
                _router(ref_version, encoder, settings), work / f"eval-r{share:g}")}
    first = seeds[0]
    before = first["before"]
    plain, explored = first["runs"]["0"], first["runs"][explorations[1].tag]
    for x in seeds:
        del x["start_version"]
    result: dict[str, Any] = {
        "before": before, "after": plain["after"], "full": full,
        "after_explore": explored["after"], "explore_rate": explorations[1].rate,
        "gap_closed": _closed(before, plain["after"], full),
        "gap_closed_explore": _closed(before, explored["after"], full),
        "gap_closed_heldout": _closed(before, plain["after"], full, True),
        "gap_closed_explore_heldout": _closed(before, explored["after"], full, True),
        "promoted": plain["promoted"], "promoted_explore": explored["promoted"],
        "start_rows": first["start_rows"], "traffic_rows": first["traffic_rows"],
        "heldout_rows": len(heldout_rows), "holdout": args.holdout, "guard": not args.no_guard,
        "references": references,
        "seeds": [{"seed": x["seed"], "before": x["before"]["aiq"],
                   "before_heldout": x["before"].get("heldout", {}).get("aiq"),
                   **{k: v for k, v in x["summary"].items()}} for x in seeds],
        "runs": {x["seed"]: x["runs"] for x in seeds},
        "seconds": round(time.perf_counter() - started, 1),
    }
    command = f"`.venv/bin/python scripts/simulate_feedback.py{_flags(args)}`"
    setup = (f"{machine()}; {first['start_rows']} start rows, {first['traffic_rows']} traffic "
             f"rows, {len(heldout_rows)} held-out train rows; feedback = the dataset's score of "
             f"the served target only; {args.holdout:.0%} of it held out for the replay; "
             f"{args.rounds} round{'s' if args.rounds != 1 else ''}; test = LLMRouter test "
             f"split, {len(read_outcome_csv(args.data / 'test.csv')[0])} rows")
    if grid:
        lines = _grid_lines(command, setup, seeds, explorations, full, references, args)
        section, title = "simulate_feedback_grid", "## How much can one round close? (simulated)"
    else:
        lines = _main_lines(command, setup, result, seeds, explorations, references, args)
        section, title = "simulate_feedback", "## Learning from feedback (simulated)"
    if not args.no_write:
        write_section(section, f"{title}\n\n" + "\n".join(lines), doc=REPO / "docs" / "LOOP.md",
                      header=LOOP_HEADER)
    if not args.json:
        print("\n".join(lines))
    print(json.dumps(result))
    return 0


def _heldout_cell(r: dict[str, Any]) -> str:
    return f"{r['heldout']['aiq']:.4f}" if "heldout" in r else "-"


def _main_lines(command: str, setup: str, result: dict[str, Any], seeds: list[dict[str, Any]],
                explorations: list[Exploration], references: dict[str, Any],
                args: argparse.Namespace) -> list[str]:
    first = seeds[0]
    plain, explored = first["runs"]["0"], first["runs"][explorations[1].tag]
    rate = explorations[1].rate
    rows = [
        ("start index (10% of train, all scores)", first["before"]),
        ("after learning from feedback", plain["after"]),
        (f"after learning, {rate:.0%} exploration", explored["after"]),
        *((f"{share} of train, all scores ({r['rows']} rows)", r)
          for share, r in references.items()),
        ("train outside the held-out rows, all scores", result["full"]),
    ]

    def fixed_cell(run_: dict[str, Any], name: str) -> str:
        aiq = run_["fixed_feedback_aiq"][name]
        return f"{aiq:.4f} | {_closed(first['before'], {'aiq': aiq}, result['full'])}"

    fixed_rows = [f"| {name} | {fixed_cell(plain, name)} | {fixed_cell(explored, name)} |"
                  for name, _, _ in FIXED_FEEDBACK]
    tag = explorations[1].tag

    def guard(run_: dict[str, Any]) -> str:
        replayed = run_["rounds"][-1]["holdout_replay"]
        return (f"{'promoted' if run_['promoted'][-1] else 'kept the start index'} (replay "
                f"serving {replayed['serving']['weighted_score']}, candidate "
                f"{replayed['candidate']['weighted_score']}, {replayed['candidate']['matched']}"
                f" of {replayed['candidate']['rows']} rows matched)")

    return [
        f"{command} ({setup}; seed {args.seed} below).",
        "",
        "| index | test AIQ | held-out AIQ | max quality (test) | predicted quality MAE (test) "
        "| tuned |",
        "|---|---|---|---|---|---|",
        *(f"| {name} | {r['aiq']:.4f} | {_heldout_cell(r)} | {r['max_quality']:.4f} | "
          f"{r['mae']:.4f} | {_tuned(r)} |" for name, r in rows),
        "",
        f"Share of the AIQ gap (start -> full) closed, test / held-out rows: "
        f"{result['gap_closed']} / {result['gap_closed_heldout']} without exploration, "
        f"{result['gap_closed_explore']} / {result['gap_closed_explore_heldout']} with "
        f"{rate:.0%} (exploration serves a target within {TOLERANCE} predicted quality of the "
        f"best). Promotion guard: without exploration {guard(plain)}; with exploration "
        f"{guard(explored)}. Shadow agreement of each candidate with the index it would "
        f"replace: {plain['shadow_agreement']} / {explored['shadow_agreement']}.",
        "",
        *([
            f"Seeds {args.seed}-{args.seed + args.seeds - 1} (each draws its own start rows "
            "and traffic; the full-label index and the held-out rows are the same). Gap closed "
            "by the index serving after the guard (candidate's own in brackets when it was "
            "not promoted):",
            "",
            "| seed | start AIQ test / held-out | no exploration: test | held-out | "
            f"{rate:.0%} exploration: test | held-out |",
            "|---|---|---|---|---|---|",
            *(f"| {x['seed']} | {x['before']['aiq']:.4f} / {_heldout_cell(x['before'])} | "
              + " | ".join(_guarded(x["summary"][t], h) for t in ("0", tag)
                           for h in (False, True)) + " |" for x in seeds),
            "| mean | | " + " | ".join(
                str(_mean([x["summary"][t] for x in seeds],
                          "gap_closed_heldout" if h else "gap_closed"))
                for t in ("0", tag) for h in (False, True)) + " |",
            "",
        ] if args.seeds > 1 else []),
        "The last candidates (seed "
        f"{args.seed}) with the feedback correction set by hand (shrinkage m, "
        "temperature T; `off` ignores the feedback rows). Test AIQ, shown to size the effect, "
        "not to choose by:",
        "",
        "| feedback correction | AIQ, no exploration | gap closed | AIQ, exploration | "
        "gap closed |",
        "|---|---|---|---|---|",
        *fixed_rows,
    ]


def _guarded(summary: dict[str, Any], heldout: bool) -> str:
    suffix = "_heldout" if heldout else ""
    after = summary.get("gap_closed" + suffix)
    cand = summary.get("gap_closed_candidate" + suffix)
    return f"{after}" + ("" if summary["promoted"][-1] else f" ({cand})")


def _guard_right(seeds: list[dict[str, Any]], tag: str) -> str:
    """How often the guard's call (promote or not) matched the sign of the candidate's change
    on the held-out rows (a change of 0 counts as not worth promoting)."""
    calls = [(x["summary"][tag]["promoted"][-1],
              x["summary"][tag].get("candidate_heldout", 0.0) > x["before"]["heldout"]["aiq"])
             for x in seeds if "heldout" in x["before"]]
    return f"{sum(a == b for a, b in calls)} of {len(calls)}" if calls else "-"


def _grid_lines(command: str, setup: str, seeds: list[dict[str, Any]],
                explorations: list[Exploration], full: dict[str, Any],
                references: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """One row per exploration setting: the candidate's gap closed per seed (the guard aside:
    what learning can give) on both yardsticks, how often it was promoted and how often that
    call was right on the held-out rows; then the fully scored reference indexes."""
    first = seeds[0]["before"]
    return [
        f"{command} ({setup}; seeds {args.seed}-{args.seed + args.seeds - 1}; full-label "
        f"AIQ {full['aiq']:.4f} test / {_heldout_cell(full)} held-out).",
        "",
        "Gap closed by the candidate learnt in "
        + ("one round" if args.rounds == 1 else f"the last of {args.rounds} rounds")
        + ", per seed (mean), whether the guard promoted it or not; the promotions the "
        "held-out replay allowed, and how often that call agreed with the held-out rows "
        "(promoted when the candidate's held-out AIQ is above the start's, kept otherwise):",
        "",
        "| exploration | test | held-out rows | promoted | guard right (held-out) | "
        "mean served quality |",
        "|---|---|---|---|---|---|",
        *(f"| {e.label()} | {_table_rows(seeds, e.tag, 'gap_closed_candidate')} | "
          f"{_table_rows(seeds, e.tag, 'gap_closed_candidate_heldout')} | "
          f"{sum(x['summary'][e.tag]['promoted'][-1] for x in seeds)} of {len(seeds)} | "
          f"{_guard_right(seeds, e.tag)} | "
          + " / ".join(f"{x['runs'][e.tag]['served'][-1]['served_mean_quality']:.3f}"
                       for x in seeds) + " |" for e in explorations),
        *(f"| no feedback: {share} of train with every score ({r['rows']} rows, seed "
          f"{args.seed}'s first rows) | {_closed(first, r, full)} | "
          f"{_closed(first, r, full, True)} | | | |" for share, r in references.items()),
        "",
        "Start AIQ per seed, test / held-out: " + ", ".join(
            f"{x['before']['aiq']:.4f} / {_heldout_cell(x['before'])}" for x in seeds) + ".",
    ]


if __name__ == "__main__":
    raise SystemExit(main())
