"""The two-stage encoder on Banking77 (issue 15, part 3).

    .venv/bin/python scripts/bench_two_stage.py [--queries N] [--no-write]

Builds the Banking77 train set (10,003 rows) as an index with the static stage (the static
model `make setup` distils, models/all-MiniLM-L6-v2-int8-static), then routes the 3,080 test
queries with the two-stage encoder off and on: accuracy both ways, the share the static stage
decided alone, and how often its decisions agree with the full encoder's. Latency: in-process
`route()` one query at a time, embedding cache off, both routers alternating in blocks of 25 so
both see the same load. Writes the `bench:two_stage` section of docs/BENCHMARKS.md.
Targets: p50 <= 0.6 ms with two-stage on, static share >= 60%, accuracy drop <= 0.3 pt,
out-of-scope recall at 95% in-scope coverage no lower than with two-stage off.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import statistics
import sys
import time

import benchlib

from semroute.config import DEFAULT_STATIC_DIR, EncoderSettings, Settings
from semroute.encoder import OnnxEncoder
from semroute.index import build_index, read_manifest, write_thresholds
from semroute.router import Router
from semroute.static_encoder import StaticEncoder
from semroute.types import Decision, Query

OUT = benchlib.ROOT / "out" / "bench_two_stage"
STATIC_DIR = benchlib.ROOT / DEFAULT_STATIC_DIR


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def is_static(d: Decision) -> bool:
    return d.reason.startswith("static stage")


def latencies(off: Router, on: Router, queries: list[str]) -> dict[str, list[float]]:
    """ms per route() call, the two routers alternating in blocks of 25 (after a warm-up)."""
    for q in queries[:50]:
        off.route(q)
        on.route(q)
    out: dict[str, list[float]] = {
        "off": [], "on": [], "on_static": [], "on_full": [], "off_cpu": [], "on_cpu": [],
    }
    for start in range(0, len(queries), 25):
        block = queries[start : start + 25]
        for q in block:
            t, c = time.perf_counter(), time.process_time()
            off.route(q)
            out["off"].append((time.perf_counter() - t) * 1000)
            out["off_cpu"].append((time.process_time() - c) * 1000)
        for q in block:
            t, c = time.perf_counter(), time.process_time()
            d = on.route(q)
            ms = (time.perf_counter() - t) * 1000
            out["on_cpu"].append((time.process_time() - c) * 1000)
            out["on"].append(ms)
            out["on_static" if is_static(d) else "on_full"].append(ms)
    return out


def abstention(encoder: OnnxEncoder, model: StaticEncoder, reuse: bool) -> dict[str, float]:
    """Out-of-scope recall at 95% in-scope coverage, two-stage off and on: 20 intents held out
    (as scripts/evaluate.py's proxy), the other 57 as a default build with the static stage.

    The threshold is the 5th percentile of the full decision's confidence on the in-scope test
    queries. It is written into the index as `semroute calibrate` writes thresholds, and both
    routers are loaded after that, so the figures are the served behaviour: a query is held
    back when its decision falls back to the default route. The static stage reads the
    threshold too and passes on to the full encoder what its estimate does not clearly put
    above it (semroute/two_stage.py).
    """
    import random

    import numpy as np

    with (benchlib.BANKING / "train.csv").open(newline="", encoding="utf-8") as fh:
        train = list(csv.DictReader(fh))
    with (benchlib.BANKING / "test.csv").open(newline="", encoding="utf-8") as fh:
        test = list(csv.DictReader(fh))
    held = set(random.Random(0).sample(sorted({r["label"] for r in train}), 20))
    root = OUT / "oos"
    if not (reuse and (root / "index" / "current").exists()):
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        with (root / "train.csv").open("w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=["text", "label"])
            writer.writeheader()
            writer.writerows({"text": r["text"], "label": r["label"]}
                             for r in train if r["label"] not in held)
        build_index([root / "train.csv"], root / "index", encoder, progress=False,
                    encoder_path=benchlib.ENCODER_DIR, static_model=model)
    queries = [Query(r["text"]) for r in test]
    oos = np.array([r["label"] in held for r in test])

    def routed(on: bool) -> list[Decision]:
        settings = Settings(encoder=EncoderSettings(cache_size=0, two_stage=on))
        return Router.load(root / "index", settings,
                           encoder_path=benchlib.ENCODER_DIR).route_batch(queries)

    write_thresholds(root / "index", None, {})  # a reused index keeps the last run's threshold
    conf = np.array([d.confidence for d in routed(False)])
    threshold = float(np.quantile(conf[~oos], 0.05))
    write_thresholds(root / "index", threshold, {})
    runs = {on: routed(on) for on in (False, True)}
    held_full = np.array([d.fallback for d in runs[False]])
    held_two = np.array([d.fallback for d in runs[True]])
    static = np.array([is_static(d) for d in runs[True]])
    labels = np.array([r["label"] for r in test])
    right = {on: np.array([d.route for d in runs[on]]) == labels for on in (False, True)}
    return {
        "threshold": threshold,
        "recall_off": float(held_full[oos].mean()), "recall_on": float(held_two[oos].mean()),
        "coverage_off": float((~held_full[~oos]).mean()),
        "coverage_on": float((~held_two[~oos]).mean()),
        "oos_static": float(static[oos].mean()), "in_static": float(static[~oos].mean()),
        # out-of-scope queries the full encoder holds back that the static stage answered
        "oos_lost": int((static & held_full & oos).sum()),
        # static decisions whose full confidence is below the threshold (any query)
        "static_below": int((static & (conf < threshold)).sum()),
        "in_accuracy_off": float(right[False][~oos].mean()),
        "in_accuracy_on": float(right[True][~oos].mean()),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=1000, help="queries timed one at a time")
    parser.add_argument("--no-write", action="store_true",
                        help="print the docs/BENCHMARKS.md section instead of writing it")
    parser.add_argument("--reuse", action="store_true",
                        help="keep the index of an earlier run (out/bench_two_stage) if present")
    args = parser.parse_args()
    machine = benchlib.machine()
    with (benchlib.BANKING / "test.csv").open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))

    encoder = OnnxEncoder.load(benchlib.ENCODER_DIR, threads=2)
    model = StaticEncoder.load(STATIC_DIR)
    started = time.perf_counter()
    if args.reuse and (OUT / "index" / "current").exists():
        version = (OUT / "index" / "current").resolve()
        built = "reused from an earlier run of this script"
    else:
        shutil.rmtree(OUT, ignore_errors=True)
        version = build_index([benchlib.BANKING / "train.csv"], OUT / "index", encoder,
                              progress=False, encoder_path=benchlib.ENCODER_DIR,
                              static_model=model)
        built = f"built in {time.perf_counter() - started:.1f} s"
    record = read_manifest(version).static
    assert record is not None
    loo = record.figures

    def router(on: bool) -> Router:
        settings = Settings(encoder=EncoderSettings(cache_size=0, two_stage=on))
        return Router.load(OUT / "index", settings, encoder_path=benchlib.ENCODER_DIR)

    off, on = router(False), router(True)
    queries = [Query(r["text"]) for r in rows]
    full = off.route_batch(queries)
    two = on.route_batch(queries)
    labels = [r["label"] for r in rows]
    acc_full = sum(d.route == y for d, y in zip(full, labels, strict=True)) / len(rows)
    acc_two = sum(d.route == y for d, y in zip(two, labels, strict=True)) / len(rows)
    static_pairs = [(t, f) for t, f in zip(two, full, strict=True) if is_static(t)]
    share = len(static_pairs) / len(rows)
    agree = sum(t.route == f.route for t, f in static_pairs) / max(1, len(static_pairs))
    agree_all = sum(t.route == f.route for t, f in zip(two, full, strict=True)) / len(rows)
    static_right = [t.route == y for t, y in zip(two, labels, strict=True) if is_static(t)]
    acc_static = sum(static_right) / max(1, len(static_right))

    t = latencies(off, on, [r["text"] for r in rows[: args.queries]])
    ab = abstention(encoder, model, args.reuse)
    print(f"abstention: {ab}")
    p50_off, p50_on = statistics.median(t["off"]), statistics.median(t["on"])
    timed_share = len(t["on_static"]) / max(1, len(t["on"]))
    drop_pt = (acc_full - acc_two) * 100
    print(f"static share {share:.3f} (timed subset {timed_share:.3f}), agreement {agree:.4f}, "
          f"accuracy full {acc_full:.4f} two-stage {acc_two:.4f} (drop {drop_pt:+.2f} pt)")
    print(f"route() p50 off {p50_off:.3f} ms on {p50_on:.3f} ms; p99 off "
          f"{percentile(t['off'], 99):.3f} on {percentile(t['on'], 99):.3f}")
    print(f"LOO: {loo}")

    def verdict(ok: bool) -> str:
        return "met" if ok else "**not met**"

    static_p50 = statistics.median(t["on_static"]) if t["on_static"] else float("nan")
    full_p50 = statistics.median(t["on_full"]) if t["on_full"] else float("nan")
    gate = (f"T={record.temperature}, null similarity "
            f"{'none' if record.null_similarity is None else f'{record.null_similarity:.3f}'}, "
            f"share >= {record.threshold:.3f}")
    cpu_off, cpu_on = statistics.median(t["off_cpu"]), statistics.median(t["on_cpu"])
    recall = (f"{ab['recall_off']:.3f} | {ab['recall_on']:.3f} | "
              f">= two_stage off ({verdict(ab['recall_on'] >= ab['recall_off'])})")
    coverage = f"{ab['coverage_off']:.3f} | {ab['coverage_on']:.3f}"
    decided = f"{ab['oos_static']:.1%} / {ab['in_static']:.1%}"
    lost = f"{ab['oos_lost']} / {ab['static_below']}"
    in_acc = f"{ab['in_accuracy_off']:.4f} | {ab['in_accuracy_on']:.4f}"
    all_met = (p50_on <= 0.6 and share >= 0.6 and drop_pt <= 0.3
               and ab["recall_on"] >= ab["recall_off"])
    acc_line = f"drop <= 0.3 pt ({verdict(drop_pt <= 0.3)}: {drop_pt:+.2f} pt)"
    body = f"""## Two-stage encoder (`scripts/bench_two_stage.py`)

Command: `.venv/bin/python scripts/bench_two_stage.py` — {machine}.
Index: Banking77 train (10,003 rows) built with the defaults plus the static stage
(`semroute index build` does this when `make setup` has distilled the static model),
{built}. Static model (`semroute encoder distill`, semroute/static_encoder.py, run by
`make setup`): every vocabulary token through the served int8 encoder alone
(`[CLS] token [SEP]`), centred, PCA to {model.dimension} dimensions; a query is the sum of its
tokens' rows (SIF weights from the Banking77 train frequencies did worse: the gate answered
19% of the test queries instead of 35%, without the map below). At build (semroute/two_stage.py) one
ridge map, fitted on the exemplars, takes those sums to the full encoder's vectors (static kNN
accuracy 0.81 -> 0.90, the gate's share 35% -> 73%, in a run on the untuned index), and the
gate is fitted by leave-one-out on the exemplars: {gate}; it answers
{loo.get('answered_share', 0):.1%} of the exemplars and agrees with the full decision on
{loo.get('agreement', 0):.2%} of those (target >= 99.5%).
Accuracy, share and agreement: all {len(rows):,} test queries (route_batch); latency:
`route()` one query at a time, first {len(t['on'])} test queries, embedding cache off, the
two routers alternating in blocks of 25.

| measure | full encoder only (two_stage off) | two-stage on | target |
|---|---|---|---|
| route() p50 | {p50_off:.3f} ms | {p50_on:.3f} ms | <= 0.6 ms ({verdict(p50_on <= 0.6)}) |
| route() process CPU time (all threads), p50 | {cpu_off:.3f} ms | {cpu_on:.3f} ms | |
| route() p99 | {percentile(t['off'], 99):.3f} ms | {percentile(t['on'], 99):.3f} ms | |
| route() p50, queries the static stage decided / passed on | - | {static_p50:.3f} / {full_p50:.3f} ms | |
| share of test queries decided by the static stage | 0% | {share:.1%} | >= 60% ({verdict(share >= 0.6)}) |
| static decisions agreeing with the full encoder's | - | {agree:.2%} | |
| all decisions agreeing with two_stage off | - | {agree_all:.2%} | |
| Banking77 accuracy (3,080 test queries) | {acc_full:.4f} | {acc_two:.4f} | {acc_line} |
| accuracy of the static stage's own decisions | - | {acc_static:.4f} | |
| out-of-scope recall at 95% in-scope coverage | {recall} |
| in-scope coverage at that threshold | {coverage} | |
| out-of-scope / in-scope test queries the static stage decided | - | {decided} | |
| out-of-scope queries held back off, answered statically / static decisions under it | - | {lost} | |
| in-scope accuracy (fallbacks count as wrong) | {in_acc} | |

Abstention rows: 20 intents held out as in scripts/evaluate.py's proxy, the other 57 built
the same way; the threshold ({ab['threshold']:.3f}) is the 5th percentile of the full
decision's confidence on the in-scope test queries, written into the index as
`semroute calibrate` does, and a query counts as held back when its served decision falls back
to the default route. Where a threshold applies, the static stage decides only when its
estimate of the full decision's confidence (the same formula over its own neighbours) reaches
the cut fitted for that threshold by leave-routes-out at build
({loo.get('scope_rows', 0):.0f} exemplars, each queried against the other routes'); otherwise
the full encoder decides and its abstention applies. Without a threshold (the rows above)
the cut is not consulted.

{"Every target is met in this run." if all_met else "Not every target is met in this run."}
The static stage is on by default (`encoder.two_stage`; off: `SEMROUTE_ENCODER__TWO_STAGE=0`)
for indexes built with the static model, as `semroute index build` does after `make setup`.
"""
    if args.no_write:
        print(body)
    else:
        benchlib.write_section("two_stage", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
