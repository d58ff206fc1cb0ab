"""In-process routing speed and index build rate (issue: core).

    .venv/bin/python scripts/bench_route.py [--queries N]

Measures, on the Banking77 train set (10,003 exemplars) with the stock encoder:
- index build rate (validate + embed + write), exemplars/s;
- `Router.route()` latency for one short query at a time (embedding cache off, so every call
  embeds), p50/p99;
- `route_batch()` throughput in batches of 32;
and writes the `bench:route` section of docs/BENCHMARKS.md. Targets: build >= 800 exemplars/s,
route p50 <= 2 ms.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib

from semroute.config import EncoderSettings, Settings
from semroute.encoder import OnnxEncoder
from semroute.index import build_index
from semroute.router import Router
from semroute.types import Query

OUT = benchlib.ROOT / "out" / "bench_route"


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=1000)
    args = parser.parse_args()
    machine = benchlib.machine()
    train = benchlib.BANKING / "train.csv"

    # Build from scratch (timed), twice; report the faster (the first run warms the page cache).
    encoder = OnnxEncoder.load(benchlib.ENCODER_DIR, threads=2)
    rates = []
    for _ in range(2):
        shutil.rmtree(OUT, ignore_errors=True)
        start = time.perf_counter()
        build_index([train], OUT, encoder, progress=False, encoder_path=benchlib.ENCODER_DIR)
        rates.append(10_003 / (time.perf_counter() - start))
    build_rate = max(rates)

    settings = Settings(encoder=EncoderSettings(cache_size=0))
    router = Router.load(OUT, settings, encoder_path=benchlib.ENCODER_DIR)
    queries = benchlib.read_texts(benchlib.BANKING / "test.csv")[: args.queries]
    for q in queries[:50]:
        router.route(q)  # warm-up
    single = []
    for q in queries:
        t = time.perf_counter()
        router.route(q)
        single.append((time.perf_counter() - t) * 1000)
    batch_times = []
    batch = 32
    for i in range(0, len(queries) - batch + 1, batch):
        chunk = [Query(q) for q in queries[i : i + batch]]
        t = time.perf_counter()
        router.route_batch(chunk)
        batch_times.append((time.perf_counter() - t) * 1000 / batch)
    _, timings = router.route_batch_timed([Query(q) for q in queries[:32]])

    p50, p99 = statistics.median(single), percentile(single, 99)
    rows = [
        ("index build, 10,003 exemplars", f"{build_rate:,.0f} exemplars/s", ">= 800/s"),
        ("route(), one short query, p50", f"{p50:.2f} ms", "<= 2 ms"),
        ("route(), one short query, p99", f"{p99:.2f} ms", ""),
        ("route_batch(32), per query, median", f"{statistics.median(batch_times):.2f} ms", ""),
        ("semantic-router 1.1.1 (ANCHORS.md), p50", "21.1 ms", "reference"),
    ]
    table = "| what | figure | target |\n|---|---|---|\n" + "\n".join(
        f"| {a} | {b} | {c} |" for a, b, c in rows
    )
    for a, b, c in rows:
        print(f"{a:45s} {b:>20s} {c}")
    split = (
        f"One batch of 32: encode {timings.encode_s * 1000:.1f} ms, FAISS search "
        f"{timings.search_s * 1000:.2f} ms, decide {timings.decide_s * 1000:.2f} ms."
    )
    body = (
        "## In-process routing (`scripts/bench_route.py`)\n\n"
        f"Command: `.venv/bin/python scripts/bench_route.py` — {machine}.\n"
        f"Banking77 train (10,003 exemplars, exact FAISS index), {len(queries)} test queries one\n"
        "at a time with the embedding cache off (every call embeds), stock all-MiniLM-L6-v2 ONNX,\n"
        "2 onnxruntime threads.\n\n" + table + "\n\n" + split + "\n"
    )
    benchlib.write_section("route", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
