"""In-process routing speed and index build rate (issue: core).

    .venv/bin/python scripts/bench_route.py [--queries N] [--no-write]

On the Banking77 train set (10,003 exemplars) it measures:
- index build rate (validate + embed + write), exemplars/s, default settings;
- `Router.route()` latency, one short query at a time (embedding cache off, so every call
  embeds), p50/p99, for three set-ups: the defaults (int8 encoder, HNSW above 5,000
  exemplars), an exact flat index, and the fp32 export of the encoder with HNSW;
- `route_batch()` cost per query in batches of 32;
- where the time goes (encode / search / decide) for single queries.
Writes the `bench:route` section of docs/BENCHMARKS.md. Targets: build >= 800 exemplars/s,
route p50 <= 2 ms.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import statistics
import sys
import time
from pathlib import Path

import benchlib

from semroute.config import EncoderSettings, IndexSettings, Settings
from semroute.encoder import OnnxEncoder
from semroute.index import build_index
from semroute.router import Router
from semroute.types import Query

OUT = benchlib.ROOT / "out" / "bench_route"


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def build(encoder: OnnxEncoder, encoder_dir: Path, out: Path, settings: IndexSettings) -> float:
    """Build from scratch; returns exemplars/s."""
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    build_index(
        [benchlib.BANKING / "train.csv"],
        out,
        encoder,
        settings=settings,
        progress=False,
        encoder_path=encoder_dir,
    )
    return 10_003 / (time.perf_counter() - start)


def accuracy(router: Router) -> float:
    """Banking77 accuracy over the whole test split (3,080 queries), routed in batches."""
    with (benchlib.BANKING / "test.csv").open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    decisions = router.route_batch([Query(r["text"]) for r in rows])
    return sum(d.route == r["label"] for d, r in zip(decisions, rows, strict=True)) / len(rows)


def measure(router: Router, queries: list[str], short: set[str]) -> dict[str, float]:
    for q in queries[:50]:
        router.route(q)  # warm-up
    total, encode, search, decide, short_total = [], [], [], [], []
    for q in queries:
        t = time.perf_counter()
        _, timings = router.route_batch_timed([Query(q)])
        total.append((time.perf_counter() - t) * 1000)
        if q in short:
            short_total.append(total[-1])
        encode.append(timings.encode_s * 1000)
        search.append(timings.search_s * 1000)
        decide.append(timings.decide_s * 1000)
    per_query = []
    for i in range(0, len(queries) - 31, 32):
        chunk = [Query(q) for q in queries[i : i + 32]]
        t = time.perf_counter()
        router.route_batch(chunk)
        per_query.append((time.perf_counter() - t) * 1000 / 32)
    return {
        "p50": statistics.median(total),
        "p99": percentile(total, 99),
        "short_p50": statistics.median(short_total),
        "encode": statistics.median(encode),
        "search": statistics.median(search),
        "decide": statistics.median(decide),
        "batch32": statistics.median(per_query),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    machine = benchlib.machine()
    queries = benchlib.read_texts(benchlib.BANKING / "test.csv")[: args.queries]
    no_cache = Settings(encoder=EncoderSettings(cache_size=0))

    int8 = OnnxEncoder.load(benchlib.ENCODER_DIR, threads=2)
    fp32 = OnnxEncoder.load(benchlib.FP32_ENCODER_DIR, threads=2)
    # "Short": at most 10 tokens with [CLS]/[SEP] (e.g. "my card is lost"), about a quarter.
    short = {q for q in queries if int8.count_tokens(q) <= 10}

    setups = [
        ("int8 encoder, HNSW32 (default)", int8, benchlib.ENCODER_DIR, IndexSettings()),
        ("int8 encoder, exact flat", int8, benchlib.ENCODER_DIR, IndexSettings(exact_max=10**9)),
        ("fp32 encoder, HNSW32", fp32, benchlib.FP32_ENCODER_DIR, IndexSettings()),
    ]
    rows = []
    build_rate = 0.0
    for i, (name, encoder, encoder_dir, index_settings) in enumerate(setups):
        out = OUT / f"index-{i}"
        rate = build(encoder, encoder_dir, out, index_settings)
        if i == 0:
            build_rate = rate
        router = Router.load(out, no_cache, encoder_path=encoder_dir)
        m = measure(router, queries, short)
        m["accuracy"] = accuracy(router)
        rows.append((name, m))
        print(
            f"{name:34s} p50 {m['p50']:.2f} ms  p99 {m['p99']:.2f} ms  short p50 "
            f"{m['short_p50']:.2f} ms  (encode {m['encode']:.2f}, "
            f"search {m['search']:.2f}, decide {m['decide']:.2f})  batch32 {m['batch32']:.2f} ms/q"
            f"  accuracy {m['accuracy']:.4f}"
        )
    print(f"index build (defaults): {build_rate:,.0f} exemplars/s")

    table = (
        "| set-up | route() p50 | p99 | p50, short queries | encode | search | decide "
        "| route_batch(32) per query | Banking77 accuracy |\n"
        "|---|---|---|---|---|---|---|---|---|\n"
        + "\n".join(
            f"| {name} | {m['p50']:.2f} ms | {m['p99']:.2f} ms | {m['short_p50']:.2f} ms "
            f"| {m['encode']:.2f} ms | "
            f"{m['search']:.2f} ms | {m['decide']:.2f} ms | {m['batch32']:.2f} ms | {m['accuracy']:.4f} |"
            for name, m in rows
        )
    )
    body = (
        "## In-process routing (`scripts/bench_route.py`)\n\n"
        f"Command: `.venv/bin/python scripts/bench_route.py` — {machine}.\n"
        f"Banking77 train as the index (10,003 exemplars), {len(queries)} Banking77 test queries\n"
        f"(14 tokens on average; {len(short)} of them short, <= 10 tokens) one at a time,\n"
        "embedding cache off (every call embeds); encode/search/decide are medians of the parts;\n"
        "all-MiniLM-L6-v2 exported by `semroute encoder export --int8` (the default: fused graph,\n"
        "int8 weights, each text run alone: a lone text on both cores, a batch's texts side by\n"
        "side on one core each) or\n"
        "`semroute encoder export` (fp32 reference: padded batches, 2 onnxruntime threads).\n"
        "Accuracy: all 3,080 test queries, with the settings each default build chose by\n"
        "cross-validation (docs/EVAL.md, \"Self-tuning builds\").\n\n"
        f"Index build with the defaults: **{build_rate:,.0f} exemplars/s** (target >= 800/s;\n"
        "the build's cross-validated tuning is part of it, `--no-tune` skips it).\n\n"
        + table
        + "\n\nTarget: route() p50 <= 2 ms. Reference: semantic-router 1.1.1 `IndexedRouter` on the\n"
        "same data and weights, p50 21.1 ms / p99 35.3 ms (ANCHORS.md).\n"
    )
    if not args.no_write:
        benchlib.write_section("route", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
