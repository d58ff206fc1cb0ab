"""The feedback loop, shown on LLMRouter: start small, serve traffic, collect feedback, learn.

    .venv/bin/python scripts/simulate_feedback.py [--json] [--explore 0.1] [--rounds 1]
        [--seeds 1] [--impute] [--no-write] [--reference-shares 0.2]

1. An outcome index from a seeded 10% of LLMRouter's train split (``before``), and one from all
   of train with every score (``full``: the ceiling of what labels can give).
2. The rest of train is traffic through the real router, in process: each query is routed by the
   serving index, logged in a SQLite decision log with its text, and given feedback from the
   dataset's score for the served target only (what a user's thumbs-up would say). With
   ``--explore E`` a share E of queries is served by another target instead, chosen as the
   dispatcher's ``explore_rate`` does (``semroute.explore``: Thompson-drawn among the targets
   predicted within ``TOLERANCE`` of the chosen one), recorded as explored with its propensity.
3. ``learn``: the logged feedback joins the serving exemplars (one known score per row, the
   other targets unknown; ``--impute`` fills them with the serving index's predictions instead,
   to measure that) in a candidate index; the candidate is shadowed on the next traffic
   (agreement with the serving
   decisions, counted per route as the router's shadow mode does, ``semroute.loop.arms``) and
   promoted (``semroute.loop.promote``: the serving root's ``current`` switched to it and the
   promotion recorded in its ``promotions.jsonl``).
4. Before, after and full are evaluated on LLMRouter's test split: AIQ (area under the
   cost-quality hull, as RouterBench) and the maximum quality. For scale, indexes from larger
   shares of train with every score (``--reference-shares``; 0.2 holds as many scores as the
   start rows plus one per traffic row) and the learnt indexes with the feedback correction
   pinned to a few fixed strengths (``FIXED_FEEDBACK``; ``off`` separates learning from the
   larger index's approximate search) are evaluated too.

By default both runs are made, without and with exploration (``--explore`` sets its rate,
0.1 by default), and docs/LOOP.md gets the table; ``--seeds N`` repeats steps 1-4 with N
seeds (the start rows and the traffic drawn by each) and tabulates the gap closed by each.
Every text is embedded once (one cached encoder shared by the builds, the routers and the
evaluations). The last stdout line is JSON:
``{"before": {...}, "after": {...}, "full": {...}, "after_explore": {...}, ...}``.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchlib import machine, write_section  # noqa: E402

from semroute.config import DecisionSettings, Settings  # noqa: E402
from semroute.encoder import CachedEncoder, OnnxEncoder  # noqa: E402
from semroute.exemplars import read_targets_csv  # noqa: E402
from semroute.explore import explore as explore_chain  # noqa: E402
from semroute.index import ExemplarIndex, build_index, switch_current  # noqa: E402
from semroute.loop.arms import Agreement  # noqa: E402
from semroute.loop.decision_log import DecisionLog  # noqa: E402
from semroute.loop.learn import prepare_learning  # noqa: E402
from semroute.loop.promote import promote  # noqa: E402
from semroute.loop.records import DecisionRecord, Feedback, query_fields  # noqa: E402
from semroute.loop.store import open_store  # noqa: E402
from semroute.quality.evaluate import evaluate_outcomes  # noqa: E402
from semroute.quality.testfiles import read_outcome_csv  # noqa: E402
from semroute.router import Router  # noqa: E402
from semroute.types import Encoder, Query  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "llmrouter"
TOLERANCE = 0.1  # exploration: alternatives within this much predicted quality of the best
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


def _serve(router: Router, texts: list[str], scores: Any, targets: list[str], log: DecisionLog,
           explore: float, rng: random.Random, offset: int = 0) -> dict[str, float]:
    """Route the traffic, log each decision with the feedback of the target that served it."""
    served_quality = []
    explored = 0
    index = {t: j for j, t in enumerate(targets)}
    start = 0
    batch = 256
    while start < len(texts):
        chunk = texts[start:start + batch]
        decisions = router.route_batch([Query(t) for t in chunk])
        for i, (text, decision) in enumerate(zip(chunk, decisions, strict=True)):
            row = start + i
            tried = explore_chain(decision.targets, decision.scores, rate=explore,
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


def run(explore: float, args: argparse.Namespace, work: Path, encoder: Encoder,
        start_version: Path, traffic: tuple[list[str], Any], targets: list[str],
        settings: Settings) -> dict[str, Any]:
    """Serve the traffic in ``args.rounds`` rounds; after each, learn from all feedback so far
    and promote the candidate, so the next round is served (and imputed) by the better index."""
    tag = f"{explore:g}"
    serving_root = work / f"serving-{tag}"
    serving_root.mkdir()
    switch_current(serving_root, start_version)
    log = DecisionLog(open_store(f"sqlite:{work / f'log-{tag}.db'}"), max_queue=100_000)
    texts, scores = traffic
    rng = random.Random(args.seed + 1)
    bounds = [round(i * len(texts) / args.rounds) for i in range(args.rounds + 1)]
    served: list[dict[str, float]] = []
    agreement: list[float] = []
    learned = 0
    for r in range(args.rounds):
        serving = _router(serving_root, encoder, settings)
        part = slice(bounds[r], bounds[r + 1])
        served.append(_serve(serving, texts[part], scores[part], targets, log, explore, rng,
                             offset=bounds[r]))

        def predict(batch: list[str], router: Router = serving) -> list[dict[str, float]]:
            return [dict(d.scores) for d in router.route_batch([Query(t) for t in batch])]

        learnt = prepare_learning(start_version, log.store.with_feedback(),
                                  work / f"learn-{tag}-{r}", holdout=0.0,
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
        promote(serving_root, str(candidate_version), by="simulate_feedback",
                reason=f"round {r}: learned from {len(learnt.train)} feedback rows; shadow "
                f"agreement {shadow.overall.rate:.3f}")
    log.close()
    prices = read_targets_csv(args.data / "models.csv")
    promoted = _router(serving_root, encoder, settings)
    after = _evaluate(promoted, args.data / "test.csv", prices, work / f"eval-after-{tag}")
    # the same learnt index with the feedback correction set by hand instead of by the build's
    # CV: what each strength gives on test (not a choice: the CV above picks without test)
    fixed = {}
    for name, m, t in FIXED_FEEDBACK:
        pinned = settings.model_copy(update={"decision": DecisionSettings(
            feedback_shrinkage=m, feedback_temperature=t)})
        fixed[name] = _evaluate(_router(serving_root, encoder, pinned), args.data / "test.csv",
                                prices, work / f"eval-fixed-{tag}-{name}")["aiq"]
    return {"after": after, "served": served, "learned_rows": learned,
            "shadow_agreement": agreement, "fixed_feedback_aiq": fixed}


def _other_seed(seed: int, args: argparse.Namespace, work: Path, encoder: Encoder,
                texts: list[str], scores: Any, targets: list[str], settings: Settings,
                full_aiq: float) -> dict[str, Any]:
    """Steps 1-4 again with the start rows and the traffic drawn by ``seed`` (the full-label
    index is the same): the start, learnt and explored AIQ and the gap closed."""
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    n_start = int(len(order) * args.start_share)
    work.mkdir()
    start_csv = _write_csv(work / "start.csv", targets, [texts[i] for i in order[:n_start]],
                           scores[order[:n_start]])
    start_version = build_index([start_csv], work / "start", encoder,
                                targets_file=args.data / "models.csv", settings=settings.index,
                                progress=False)
    prices = read_targets_csv(args.data / "models.csv")
    before = _evaluate(_router(start_version, encoder, settings), args.data / "test.csv",
                       prices, work / "eval-b")["aiq"]
    traffic = ([texts[i] for i in order[n_start:]], scores[order[n_start:]])
    seeded = argparse.Namespace(**{**vars(args), "seed": seed})
    out: dict[str, Any] = {"seed": seed, "before": before}
    for key, rate in (("after", 0.0), ("after_explore", args.explore)):
        aiq = run(rate, seeded, work, encoder, start_version, traffic, targets,
                  settings)["after"]["aiq"]
        out[key] = aiq
        gap = full_aiq - before
        out["gap_closed" + key.removeprefix("after")] = (
            round((aiq - before) / gap, 4) if gap > 0 else None)
    return out


def _flags(args: argparse.Namespace) -> str:
    """The non-default options of this run, as typed."""
    flags = f" --rounds {args.rounds}" if args.rounds != 1 else ""
    flags += f" --explore {args.explore:g}" if args.explore != 0.1 else ""
    flags += f" --seeds {args.seeds}" if args.seeds != 1 else ""
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--start-share", type=float, default=0.1)
    parser.add_argument("--explore", type=float, default=0.1)
    parser.add_argument("--impute", action="store_true",
                        help="fill the targets without feedback with the serving index's "
                        "predictions instead of leaving them unknown (measured worse)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="learn and promote after each of this many slices of traffic")
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
    order = list(range(len(texts)))
    random.Random(args.seed).shuffle(order)
    n_start = int(len(order) * args.start_share)
    start_rows, traffic_rows = order[:n_start], order[n_start:]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="semroute-sim-") as tmp:
        work = Path(tmp)
        start_csv = _write_csv(work / "start.csv", targets, [texts[i] for i in start_rows],
                               scores[start_rows])
        start_version = build_index([start_csv], work / "start", encoder,
                                    targets_file=args.data / "models.csv",
                                    settings=settings.index, progress=False)
        full_version = build_index([args.data / "train.csv"], work / "full", encoder,
                                   targets_file=args.data / "models.csv",
                                   settings=settings.index, progress=False)
        test = args.data / "test.csv"
        before = _evaluate(_router(start_version, encoder, settings), test, prices,
                           work / "eval-b")
        full = _evaluate(_router(full_version, encoder, settings), test, prices, work / "eval-f")
        references = {}
        for share in (float(s) for s in args.reference_shares.split(",") if s.strip()):
            rows_r = order[:int(len(order) * share)]
            ref_csv = _write_csv(work / f"ref-{share:g}.csv", targets,
                                 [texts[i] for i in rows_r], scores[rows_r])
            ref_version = build_index([ref_csv], work / f"ref-{share:g}", encoder,
                                      targets_file=args.data / "models.csv",
                                      settings=settings.index, progress=False)
            references[f"{share:g}"] = {"rows": len(rows_r), **_evaluate(
                _router(ref_version, encoder, settings), test, prices, work / f"eval-r{share:g}")}
        traffic = ([texts[i] for i in traffic_rows], scores[traffic_rows])
        plain = run(0.0, args, work, encoder, start_version, traffic, targets, settings)
        explored = run(args.explore, args, work, encoder, start_version, traffic, targets,
                       settings)
        others = [_other_seed(seed, args, work / f"seed-{seed}", encoder, texts, scores,
                              targets, settings, full["aiq"])
                  for seed in range(args.seed + 1, args.seed + args.seeds)]
    gap = full["aiq"] - before["aiq"]

    def closed(after: dict[str, float]) -> float | None:
        return round((after["aiq"] - before["aiq"]) / gap, 4) if gap > 0 else None

    result: dict[str, Any] = {
        "before": before, "after": plain["after"], "full": full,
        "after_explore": explored["after"], "explore_rate": args.explore,
        "gap_closed": closed(plain["after"]), "gap_closed_explore": closed(explored["after"]),
        "start_rows": len(start_rows), "traffic_rows": len(traffic_rows),
        "references": references,
        "seeds": [{"seed": args.seed, "before": before["aiq"], "after": plain["after"]["aiq"],
                   "after_explore": explored["after"]["aiq"], "gap_closed": closed(plain["after"]),
                   "gap_closed_explore": closed(explored["after"])}, *others],
        "runs": {"plain": plain, "explore": explored},
        "seconds": round(time.perf_counter() - started, 1),
    }
    rows = [
        ("start index (10% of train, all scores)", before),
        ("after learning from feedback", plain["after"]),
        (f"after learning, {args.explore:.0%} exploration", explored["after"]),
        *((f"{share} of train, all scores ({r['rows']} rows)", r)
          for share, r in references.items()),
        ("full train, all scores", full),
    ]
    fixed_rows = [f"| {name} | {plain['fixed_feedback_aiq'][name]:.4f} | "
                  f"{closed({'aiq': plain['fixed_feedback_aiq'][name]})} | "
                  f"{explored['fixed_feedback_aiq'][name]:.4f} | "
                  f"{closed({'aiq': explored['fixed_feedback_aiq'][name]})} |"
                  for name, _, _ in FIXED_FEEDBACK]
    lines = [
        f"`.venv/bin/python scripts/simulate_feedback.py{_flags(args)}` ({machine()}; seed "
        f"{args.seed}; "
        f"{len(start_rows)} start rows, {len(traffic_rows)} traffic rows, feedback = the dataset's "
        "score of the served target only; test = LLMRouter test split, 500 rows).",
        "",
        "| index | AIQ | max quality | predicted quality MAE | tuned |",
        "|---|---|---|---|---|",
        *(f"| {name} | {r['aiq']:.4f} | {r['max_quality']:.4f} | {r['mae']:.4f} | "
          f"{_tuned(r)} |" for name, r in rows),
        "",
        f"Share of the AIQ gap (start -> full) closed by learning: {result['gap_closed']} without "
        f"exploration, {result['gap_closed_explore']} with {args.explore:.0%} (exploration "
        f"serves a target within {TOLERANCE} predicted quality of the best). {args.rounds} "
        f"round{'s' if args.rounds != 1 else ''} of learn + shadow + promote; shadow agreement "
        "of each candidate with the index it "
        f"replaced: {plain['shadow_agreement']} (no exploration), {explored['shadow_agreement']} "
        "(exploration). Targets without feedback are "
        + ("filled with the serving index's predictions (`--impute`)." if args.impute else
           "left unknown: targets are compared on the fully scored rows, corrected by the "
           "feedback rows' residuals (`decision.feedback_step`: the shared part moves all "
           "targets, a target's own part moves it against the others) with the strength the "
           "build chose by replaying its choices on held-out feedback rows (tuned: no "
           "feedback setting = the build kept them out)."),
        "",
        *([
            f"Seeds {args.seed}-{args.seed + args.seeds - 1} (each draws its own start rows "
            "and traffic; the full-label index is the same):",
            "",
            "| seed | start AIQ | after learning | gap closed | after, exploration | gap closed |",
            "|---|---|---|---|---|---|",
            *(f"| {r['seed']} | {r['before']:.4f} | {r['after']:.4f} | {r['gap_closed']} | "
              f"{r['after_explore']:.4f} | {r['gap_closed_explore']} |"
              for r in result["seeds"]),
            f"| mean | | | {_mean(result['seeds'], 'gap_closed')} | | "
            f"{_mean(result['seeds'], 'gap_closed_explore')} |",
            "",
        ] if args.seeds > 1 else []),
        "The same learnt indexes with the feedback correction set by hand (shrinkage m, "
        "temperature T; `off` ignores the feedback rows: what is left of the difference from "
        "the start index is the larger index's approximate search, not learning). Test AIQ, "
        "shown to size the effect, not to choose by:",
        "",
        "| feedback correction | AIQ, no exploration | gap closed | AIQ, exploration | "
        "gap closed |",
        "|---|---|---|---|---|",
        *fixed_rows,
    ]
    if not args.no_write:
        write_section("simulate_feedback", "## Learning from feedback (simulated)\n\n"
                      + "\n".join(lines), doc=REPO / "docs" / "LOOP.md", header=LOOP_HEADER)
    if not args.json:
        print("\n".join(lines))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
