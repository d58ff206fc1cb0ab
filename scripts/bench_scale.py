"""A million-exemplar index: quantised FAISS types, memory-mapped (issue 16, scale-out).

    .venv/bin/python scripts/bench_scale.py [--n 1000000] [--kinds ivf-sq,ivfpq,hnsw-sq]
                                            [--queries 1000] [--work DIR] [--no-write]

Exemplars: the Banking77 train texts (10,003) embedded once with the served encoder, then
``--n`` synthetic vectors drawn around them: each is a real embedding moved part of the way
(uniform 0-0.5) towards one of its 10 nearest real neighbours, plus isotropic Gaussian noise
(``--noise`` per dimension), L2-normalised. Neighbourhoods are therefore those of real
customer questions, without embedding a million texts. The vectors are generated chunk by chunk
from a seeded generator (chunk i from seed (1, i)), never held all at once.

Queries: the Banking77 test texts (held out: no test text is an exemplar), embedded by the same
encoder; ``--queries`` of them. Ground truth: exact inner-product top 10 over all ``--n``
vectors, chunk by chunk.

Each kind is built by ``semroute.index_types`` (what ``semroute index build --faiss KIND``
builds), written to ``--work``, then measured in a fresh process: read memory-mapped (the
router's read flags for that kind), time to the first answer, RSS, then single-query search
latency (one FAISS thread, as the router searches) and recall@10 for each search setting.
Writes the ``bench:scale`` section of docs/BENCHMARKS.md. Targets: search p50 <= 1 ms at
recall@10 >= 0.95, RSS <= 1.5 GB with the index loaded, cold start <= 5 s.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import benchlib
import numpy as np
import numpy.typing as npt

from semroute import index_types

F32 = npt.NDArray[np.float32]
CHUNK = 50_000
K = 10
# Search settings tried per kind; the second is the one the cold start uses.
# ivfpq: nprobe 16 and the re-ranking depth swept (at 1M its recall is bound by the shortlist:
# 0.79-0.80 at every nprobe from 4 to 32 with k_factor 16).
SWEEPS: dict[str, tuple[str, tuple[int, ...]]] = {
    "hnsw-sq": ("efSearch", (32, 64, 128, 256)),
    "ivf-sq": ("nprobe", (2, 4, 8, 16)),
    "ivfpq": ("k_factor", (16, 64, 128)),
}
IVFPQ_NPROBE = 16


def apply_setting(index: Any, param: str, value: int) -> None:
    if param == "k_factor":
        index_types.set_search_params(index, ef_search=0, nprobe=IVFPQ_NPROBE)
        index.k_factor = value
    else:
        index_types.set_search_params(index, ef_search=value, nprobe=value)


# ---- data -----------------------------------------------------------------------------------


def real_embeddings(work: Path) -> tuple[F32, F32]:
    """Banking77 train and test embeddings by the served encoder (cached in ``work``)."""
    train_file, test_file = work / "banking77-train.npy", work / "banking77-test.npy"
    if not (train_file.exists() and test_file.exists()):
        from semroute.encoder import OnnxEncoder, embed_many

        encoder = OnnxEncoder.load(benchlib.ENCODER_DIR, threads=2)
        for split, file in (("train", train_file), ("test", test_file)):
            texts = benchlib.read_texts(benchlib.BANKING / f"{split}.csv")
            started = time.perf_counter()
            np.save(file, embed_many(encoder, texts, 64))
            print(f"embedded {len(texts)} Banking77 {split} texts in "
                  f"{time.perf_counter() - started:.1f} s", flush=True)
    return np.load(train_file), np.load(test_file)


def nearest_real(base: F32, k: int = 10) -> npt.NDArray[np.int64]:
    """Each real embedding's ``k`` nearest other real embeddings (exact, in blocks)."""
    out = np.empty((len(base), k), dtype=np.int64)
    for start in range(0, len(base), 1000):
        sims = base[start:start + 1000] @ base.T
        rows = np.arange(sims.shape[0])
        sims[rows, rows + start] = -np.inf
        out[start:start + 1000] = np.argpartition(-sims, k, axis=1)[:, :k]
    return out


class Synthetic:
    """``n`` vectors around the real embeddings, generated chunk by chunk (deterministic)."""

    def __init__(self, base: F32, n: int, noise: float) -> None:
        self.base, self.n, self.noise = base, n, noise
        self.neighbours = nearest_real(base)

    def chunk(self, number: int, size: int = CHUNK, stream: int = 1) -> F32:
        rng = np.random.default_rng((stream, number))
        seeds = rng.integers(0, len(self.base), size)
        towards = self.neighbours[seeds, rng.integers(0, self.neighbours.shape[1], size)]
        alpha = rng.uniform(0.0, 0.5, (size, 1)).astype(np.float32)
        v = self.base[seeds] * (1 - alpha) + self.base[towards] * alpha
        v += rng.standard_normal(v.shape, dtype=np.float32) * np.float32(self.noise)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        return v

    def chunks(self) -> list[tuple[int, int]]:
        return [(i, min(CHUNK, self.n - i * CHUNK)) for i in range((self.n + CHUNK - 1) // CHUNK)]


def exact_top(data: Synthetic, queries: F32, work: Path) -> npt.NDArray[np.int64]:
    """Exact top-K ids of each query over all synthetic vectors (cached in ``work``)."""
    file = work / f"truth-{data.n}-{data.noise}-{len(queries)}.npy"
    if file.exists():
        cached: npt.NDArray[np.int64] = np.load(file)
        return cached
    started = time.perf_counter()
    best_s = np.full((len(queries), K), -np.inf, dtype=np.float32)
    best_i = np.full((len(queries), K), -1, dtype=np.int64)
    for number, size in data.chunks():
        vectors = data.chunk(number, size)
        for sub in range(0, size, 10_000):  # (queries x 10k) sims and ids: ~120 MB at 1000
            sims = queries @ vectors[sub:sub + 10_000].T
            top = np.argpartition(-sims, K, axis=1)[:, :K]
            s = np.concatenate([best_s, np.take_along_axis(sims, top, 1)], axis=1)
            i = np.concatenate([best_i, top + number * CHUNK + sub], axis=1)
            keep = np.argsort(-s, axis=1)[:, :K]
            best_s, best_i = np.take_along_axis(s, keep, 1), np.take_along_axis(i, keep, 1)
    np.save(file, best_i)
    print(f"exact top-{K} of {len(queries)} queries over {data.n:,} vectors in "
          f"{time.perf_counter() - started:.1f} s", flush=True)
    return best_i


# ---- build and measure ------------------------------------------------------------------------


def build(kind: str, data: Synthetic, out: Path) -> dict[str, Any]:
    """Build ``kind`` over the synthetic vectors chunk by chunk; write it to ``out``."""
    import faiss

    factory, _ = index_types.factory(kind, data.n, data.base.shape[1], exact_max=0,
                                     approx_factory="")
    started = time.perf_counter()
    # Training rows: a separate stream of the same distribution, as many as the kind samples.
    probe = faiss.index_factory(data.base.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.try_extract_index_ivf(probe)
    want = max(10_000, index_types.MAX_POINTS_PER_LIST * (ivf.nlist if ivf is not None else 0))
    train = np.concatenate([data.chunk(i, CHUNK, stream=2)
                            for i in range((want + CHUNK - 1) // CHUNK)])[:want]
    index = index_types.new_index(factory, train)
    trained = time.perf_counter() - started
    for number, size in data.chunks():
        index.add(data.chunk(number, size))
    built = time.perf_counter() - started
    faiss.write_index(index, str(out))
    print(f"{kind} ({factory}): trained in {trained:.1f} s, built in {built:.1f} s, "
          f"{out.stat().st_size / 2**20:.0f} MiB", flush=True)
    return {"factory": factory, "train_s": trained, "build_s": built,
            "file_mib": out.stat().st_size / 2**20}


def rss_mib() -> tuple[float, float]:
    """(RSS, its anonymous part) of this process in MiB."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon"):
            fields[key] = int(value.split()[0]) / 1024
    return fields["VmRSS"], fields["RssAnon"]


def measure(kind: str, index_file: Path, queries_file: Path, truth_file: Path) -> dict[str, Any]:
    """In a fresh process: load as the router does, first answer, RSS, latency and recall."""
    import faiss

    faiss.omp_set_num_threads(1)
    queries = np.load(queries_file)
    truth = np.load(truth_file)
    rss_before, _ = rss_mib()
    param, values = SWEEPS[kind]
    started = time.perf_counter()
    index = faiss.read_index(str(index_file), index_types.read_flags(kind, True))
    apply_setting(index, param, values[1])
    index.search(queries[:1], K)
    cold = time.perf_counter() - started
    rss_loaded, anon_loaded = rss_mib()
    rows = []
    for value in values:
        apply_setting(index, param, value)
        _, ids = index.search(queries, K)
        recall = float(np.mean([len(set(a) & set(b)) / K for a, b in zip(ids, truth, strict=True)]))
        times = []
        for q in queries:
            t = time.perf_counter()
            index.search(q[None, :], K)
            times.append((time.perf_counter() - t) * 1000)
        rows.append({"value": value, "recall": recall, "p50": float(np.percentile(times, 50)),
                     "p99": float(np.percentile(times, 99))})
    rss_after, anon_after = rss_mib()
    return {"param": param, "cold_s": cold, "rss_before": rss_before, "rss_loaded": rss_loaded,
            "anon_loaded": anon_loaded, "rss_after": rss_after, "anon_after": anon_after,
            "rows": rows}


def measure_in_child(kind: str, index_file: Path, queries: Path, truth: Path) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, "--measure", kind, str(index_file), str(queries), str(truth)],
        check=True, capture_output=True, text=True,
    )
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


# ---- report -----------------------------------------------------------------------------------


def report(args: argparse.Namespace, data: Synthetic, results: dict[str, dict[str, Any]],
           where: str) -> str:
    lines = [
        "## A million exemplars: quantised, memory-mapped indexes (`scripts/bench_scale.py`)",
        "",
        f"Command: `.venv/bin/python scripts/bench_scale.py --n {args.n} --kinds "
        f"{args.kinds} --queries {args.queries}` — {where}.",
        f"Exemplars: {data.n:,} synthetic vectors around the {len(data.base):,} Banking77 train "
        f"embeddings (int8 encoder): each a real embedding moved 0-50 % of the way to one of its "
        f"10 nearest real neighbours plus Gaussian noise {data.noise} per dimension, normalised. "
        f"Queries: {args.queries} Banking77 test embeddings (held out). Recall@10 is against "
        f"exact inner-product search over the same {data.n:,} vectors. Each index is read "
        "memory-mapped (`IO_FLAG_MMAP_IFC | IO_FLAG_READ_ONLY`, the router's flags for these "
        "kinds) in a fresh process; cold start = read to first answer with the file in the page "
        "cache (just written); latency = one query per `search()` call, one FAISS thread. RSS "
        "counts the mapped file pages the process has touched (shared between replicas, "
        "evictable); \"anon\" is the private part. Index files are cached in `--work`: a rerun "
        "measures again and keeps the build figures of the run that built them (`--rebuild` "
        "builds again); builds use FAISS's threads on both cores, training on a sample of 64 "
        "vectors per inverted list.",
        "",
        "What the router serves: `semroute index build --faiss ivf-sq|ivfpq|hnsw-sq` builds these "
        "factories (semroute/index_types.py, recorded in the manifest with nprobe or efSearch; "
        "`index.ivf_nprobe` defaults to 8) and the router reads them with the same flags. The "
        "figures are for the FAISS index alone; a router at this size also holds the exemplars' "
        "texts and labels in memory and checks the index file's checksum when it loads "
        "(not measured here). A load average well above 2 means other work shared the two "
        "cores: p99 and the slower settings suffer most.",
        "",
        "| kind (factory) | build | file | cold start | RSS loaded (anon) | RSS after queries "
        "(anon) | setting | recall@10 | p50 | p99 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for kind, r in results.items():
        m = r["measure"]
        first = True
        for row in m["rows"]:
            head = (f"`{kind}` ({r['factory']}) | {r['build_s']:.0f} s | {r['file_mib']:.0f} MiB | "
                    f"{m['cold_s']:.2f} s | {m['rss_loaded']:.0f} ({m['anon_loaded']:.0f}) MiB | "
                    f"{m['rss_after']:.0f} ({m['anon_after']:.0f}) MiB" if first else
                    " | | | | | ")
            setting = f"{m['param']} {row['value']}" + (
                f", nprobe {IVFPQ_NPROBE}" if m["param"] == "k_factor" else "")
            lines.append(f"| {head} | {setting} | {row['recall']:.3f} | "
                         f"{row['p50']:.3f} ms | {row['p99']:.3f} ms |")
            first = False
    lines += ["", f"Process RSS before reading the index (Python, numpy, FAISS): "
              f"{next(iter(results.values()))['measure']['rss_before']:.0f} MiB.", "",
              "Targets: search p50 <= 1 ms at recall@10 >= 0.95, RSS <= 1.5 GB, cold start "
              "<= 5 s. Per kind, the first setting that reaches recall@10 0.95:", ""]
    for kind, r in results.items():
        m = r["measure"]
        good = [row for row in m["rows"] if row["recall"] >= 0.95]
        if good:
            row = good[0]
            met = row["p50"] <= 1.0 and m["rss_after"] <= 1536 and m["cold_s"] <= 5
            lines.append(f"- `{kind}`: {m['param']} {row['value']}, recall@10 "
                         f"{row['recall']:.3f}, p50 {row['p50']:.3f} ms, RSS "
                         f"{m['rss_after']:.0f} MiB, cold start {m['cold_s']:.2f} s: "
                         f"{'**targets met**' if met else 'targets missed'}")
        else:
            best = max(m["rows"], key=lambda row: row["recall"])
            lines.append(f"- `{kind}`: no setting tried reaches 0.95 (best {best['recall']:.3f} "
                         f"at {m['param']} {best['value']}, p50 {best['p50']:.3f} ms)")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--kinds", default="ivf-sq,ivfpq,hnsw-sq")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--noise", type=float, default=0.03)
    parser.add_argument("--work", type=Path, default=Path("/tmp/semroute-bench-scale"))
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--rebuild", action="store_true", help="rebuild index files in --work")
    parser.add_argument("--measure", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        kind, index_file, queries, truth = args.measure
        print(json.dumps(measure(kind, Path(index_file), Path(queries), Path(truth))))
        return 0
    where = benchlib.machine()
    args.work.mkdir(parents=True, exist_ok=True)
    base, test = real_embeddings(args.work)
    queries = test[: args.queries]
    queries_file = args.work / f"queries-{args.queries}.npy"
    np.save(queries_file, queries)
    data = Synthetic(base, args.n, args.noise)
    truth_file = args.work / f"truth-{data.n}-{data.noise}-{len(queries)}.npy"
    exact_top(data, queries, args.work)
    results: dict[str, dict[str, Any]] = {}
    for kind in args.kinds.split(","):
        index_file = args.work / f"{kind}-{data.n}-{data.noise}.faiss"
        meta_file = index_file.with_suffix(".json")
        if args.rebuild or not (index_file.exists() and meta_file.exists()):
            meta_file.write_text(json.dumps(build(kind, data, index_file)))
        results[kind] = json.loads(meta_file.read_text())
        results[kind]["measure"] = measure_in_child(kind, index_file, queries_file, truth_file)
        print(json.dumps({kind: results[kind]}), flush=True)
        text = report(args, data, results, where)
        if not args.no_write:  # after each kind: a long run that stops keeps what it measured
            benchlib.write_section("scale", text)
    print(text)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    raise SystemExit(main())
