"""A million-exemplar index: quantised FAISS types, memory-mapped (issue 16, scale-out).

    .venv/bin/python scripts/bench_scale.py [--n 1000000] [--kinds ivf-sq,ivfpq,hnsw-sq]
                                            [--queries 1000] [--work DIR] [--no-write]
                                            [--[no-]router] [--router-only]
                                            [--router-queries 500]

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
Router phase (``--router``; on by default when the ivf-sq file exists, ``--router-only``
keeps the FAISS table already in the section): a labelled index version is written around the
ivf-sq file (``semroute.index.write_prebuilt_version``; a version written by an older semroute,
without the exemplar columns, is rewritten), each vector's exemplar the train text and label it
was drawn around, then the real
``semroute serve router`` process is started on it (once with the index files dropped from the
page cache, once warm), timed to health SERVING, sent ``--router-queries`` Route calls over
gRPC, its memory read from /proc, and stopped with SIGTERM.

Writes the ``bench:scale`` section of docs/BENCHMARKS.md. Targets: search p50 <= 1 ms at
recall@10 >= 0.95, RSS <= 1.5 GB with the index loaded, cold start <= 5 s.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import benchlib
import numpy as np
import numpy.typing as npt

from semroute import index_types

F32 = npt.NDArray[np.float32]
NOT_MEASURED = "(not measured here)"
MEASURED_BELOW = "(measured below, with the router process)"
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

    def sources(self, number: int, size: int = CHUNK, stream: int = 1) -> npt.NDArray[np.int64]:
        """The row of ``base`` each vector of that chunk was drawn around (``chunk``'s first
        draw from the same generator)."""
        rng = np.random.default_rng((stream, number))
        seeds: npt.NDArray[np.int64] = rng.integers(0, len(self.base), size)
        return seeds

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


# ---- the router with the 1M index ------------------------------------------------------------


def labelled_rows(split: str) -> tuple[list[str], list[str]]:
    """(texts, labels) of a Banking77 split, in file order (row i = line i + 2)."""
    with (benchlib.BANKING / f"{split}.csv").open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    return [r["text"].strip() for r in rows], [r["label"] for r in rows]


def sha256_file(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def write_labelled_version(
    root: Path, faiss_file: Path, rows: npt.NDArray[np.int64], *, kind: str, factory: str,
    texts: list[str], labels: list[str], fingerprint: str,
) -> Path:
    """A labelled index version under ``root`` written by ``write_prebuilt_version`` (the
    layout ``semroute index build`` writes, ``current`` switched) around an already-built FAISS
    file: exemplar i is Banking77 train row ``rows[i]`` (text, label, weight 1). Untuned: no
    decision settings, abstention model or density (``--no-tune``)."""
    from semroute.config import IndexSettings
    from semroute.exemplars import ExemplarSet, load_route_table
    from semroute.index import write_prebuilt_version
    from semroute.manifest import EncoderRecord, FaissRecord
    from semroute.types import Exemplar, ExemplarKind

    settings = IndexSettings()
    source = benchlib.BANKING / "train.csv"
    # One record per train row, shared by the ~100 rows drawn around it (records are frozen).
    train = [Exemplar(text, label, 1.0, source=f"{source}:{r + 2}")
             for r, (text, label) in enumerate(zip(texts, labels, strict=True))]
    exemplar_set = ExemplarSet(ExemplarKind.LABELLED, [train[r] for r in rows.tolist()])
    return write_prebuilt_version(
        root, faiss_file, exemplar_set,
        load_route_table(None, sorted(set(labels)), default_route="default"),
        encoder_record=EncoderRecord(fingerprint, 384, str(benchlib.ENCODER_DIR)),
        faiss_record=FaissRecord(factory, kind == "flat", settings.hnsw_ef_search, kind=kind,
                                 nprobe=settings.ivf_nprobe if kind.startswith("ivf") else 0),
        stats={"written_from_precomputed_vectors": 1.0},
    )


def has_columns(root: Path) -> bool:
    """Whether ``root``'s current version carries the exemplar columns (written by this
    semroute; an older one is rewritten)."""
    from semroute.index import read_manifest

    current = root / "current"
    return current.exists() and read_manifest(current.resolve()).columns is not None


def router_index(work: Path, data: Synthetic, faiss_file: Path, factory: str,
                 fingerprint: str) -> Path:
    """The 1M ivf-sq router index root in ``work`` (written once per FAISS file and encoder):
    each synthetic vector's exemplar is the train text it was drawn around."""
    root = work / f"router-{faiss_file.stem}"
    stamp = root / "index.source"
    source = f"{faiss_file} {faiss_file.stat().st_mtime_ns} {fingerprint}"
    if stamp.exists() and stamp.read_text() == source and has_columns(root):
        return root
    if root.exists():
        shutil.rmtree(root)
    texts, labels = labelled_rows("train")
    rows = np.concatenate([data.sources(number, size) for number, size in data.chunks()])
    # Check the rows against the vectors: each is drawn around its source, so the source
    # should nearly always be its nearest real embedding.
    nearest = np.argmax(data.chunk(0)[:2000] @ data.base.T, axis=1)
    print(f"rows of chunk 0 whose nearest real embedding is their source: "
          f"{np.mean(nearest == rows[:2000]):.3f}", flush=True)
    started = time.perf_counter()
    version = write_labelled_version(root, faiss_file, rows, kind="ivf-sq", factory=factory,
                                     texts=texts, labels=labels, fingerprint=fingerprint)
    stamp.write_text(source)
    print(f"wrote router index {version} in {time.perf_counter() - started:.1f} s", flush=True)
    return root


def flat_reference(work: Path, base: F32, fingerprint: str) -> Path:
    """The same writer over the 10,003 real train embeddings, exact: the accuracy reference."""
    import faiss

    root = work / "router-flat-real"
    if has_columns(root):
        return root
    if root.exists():
        shutil.rmtree(root)
    index = faiss.IndexFlatIP(base.shape[1])
    index.add(base)
    faiss_file = work / "flat-real.faiss"
    faiss.write_index(index, str(faiss_file))
    texts, labels = labelled_rows("train")
    write_labelled_version(root, faiss_file, np.arange(len(base)), kind="flat", factory="Flat",
                           texts=texts, labels=labels, fingerprint=fingerprint)
    return root


def drop_from_page_cache(paths: list[Path]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages are not dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cached_mib(paths: list[Path]) -> float:
    """MiB of ``paths`` in the page cache (fincore), NaN when it cannot tell."""
    try:
        out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES",
                              *map(str, paths)], check=True, capture_output=True, text=True)
        return sum(int(v) for v in out.stdout.split()) / 2**20
    except (OSError, subprocess.CalledProcessError, ValueError):
        return float("nan")


def proc_memory(pid: int) -> dict[str, float]:
    """RSS, PSS (smaps_rollup), RssAnon, RssFile and peak RSS (VmHWM) of ``pid`` in MiB."""
    out: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("Rss", "Pss"):
            out[key.lower()] = int(value.split()[0]) / 1024
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile", "VmHWM"):
            out[key.lower()] = int(value.split()[0]) / 1024
    return out


async def wait_serving(addr: str, proc: subprocess.Popen[bytes], log_path: Path) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    # Short reconnect backoff: the default (1 s) would be counted as start time.
    options = [("grpc.initial_reconnect_backoff_ms", 20), ("grpc.min_reconnect_backoff_ms", 20),
               ("grpc.max_reconnect_backoff_ms", 50)]
    async with grpc.aio.insecure_channel(addr, options=options) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        deadline = time.perf_counter() + 300
        while time.perf_counter() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"router exited:\n{log_path.read_text()[-3000:]}")
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.02)
    raise SystemExit("router never reported SERVING")


async def route_all(addr: str, queries: list[tuple[str, str]], warm: list[str]
                    ) -> tuple[list[float], float]:
    """Route each query in turn over one client (after ``warm``): (latencies in ms, accuracy)."""
    from semroute.grpc.router_client import RouterClient

    client = RouterClient(addr, timeout=30)
    try:
        for text in warm:
            await client.route(text)
        times, right = [], 0
        for text, label in queries:
            started = time.perf_counter()
            decision = await client.route(text)
            times.append((time.perf_counter() - started) * 1000)
            right += decision.route == label
    finally:
        await client.close()
    return times, right / len(queries)


def serve_router(root: Path, queries: list[tuple[str, str]], warm: list[str], log_path: Path,
                 *, cold: bool, route: bool) -> dict[str, Any]:
    """Start ``semroute serve router --index root`` (``cold``: its files dropped from the page
    cache first) and time it to health SERVING; with ``route``, route ``queries`` through it.
    The process is stopped with SIGTERM and waited for before return."""
    files = sorted(p for p in (root / "current").resolve().iterdir() if p.is_file())
    if cold:
        drop_from_page_cache(files)
    out: dict[str, Any] = {"cached_mib_at_start": cached_mib(files)}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    env = {**os.environ, "SEMROUTE_ENCODER__CACHE_SIZE": "0",
           "SEMROUTE_ROUTER_SERVER__WATCH_INTERVAL_S": "0"}
    command = [str(Path(sys.executable).parent / "semroute"), "serve", "router", "--index",
               str(root), "--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0",
               "--encoder", str(benchlib.ENCODER_DIR)]
    with log_path.open("w") as log:
        started, wall = time.perf_counter(), time.time()
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        addr = f"127.0.0.1:{port}"
        asyncio.run(wait_serving(addr, proc, log_path))
        out["start_s"] = time.perf_counter() - started
        out["serving"] = proc_memory(proc.pid)
        events = log_times(log_path)
        out["to_listening_s"] = events["listening"] - wall
        out["loading_s"] = events["index loaded"] - events["listening"]
        if route:
            times, accuracy = asyncio.run(route_all(addr, queries, warm))
            out.update(p50=float(np.percentile(times, 50)), p99=float(np.percentile(times, 99)),
                       accuracy=accuracy, after=proc_memory(proc.pid))
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            out["exit"] = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out["exit"] = proc.wait()
    return out


def log_times(log_path: Path) -> dict[str, float]:
    """Unix time of the first ``listening`` and ``index loaded`` events in a router's log."""
    found: dict[str, float] = {}
    for line in log_path.read_text().splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if event.get("event") in ("listening", "index loaded"):
            when = datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00"))
            found.setdefault(event["event"], when.timestamp())
    return found


def load_breakdown(root: Path) -> dict[str, float]:
    """The steps of ``ExemplarIndex.load`` on ``root``, timed one by one in this process (the
    same calls, files cached): each file's checksum, the FAISS mapping, the exemplar columns
    (mapped, labels as strings); then the whole load, the first text read (what explaining a
    decision reads), and, for comparison, the exemplars.jsonl loop a version without columns
    is loaded with."""
    import faiss

    from semroute.index import EXEMPLARS_FILE, FAISS_FILE, ExemplarIndex, read_manifest
    from semroute.index_types import read_flags

    version = (root / "current").resolve()
    manifest = read_manifest(version)
    out: dict[str, float] = {}
    for name in manifest.checksums:
        started = time.perf_counter()
        sha256_file(version / name)
        out[f"sha256 {name}"] = time.perf_counter() - started
    started = time.perf_counter()
    faiss.read_index(str(version / FAISS_FILE), read_flags(manifest.faiss.kind, True))
    out["FAISS read (mapped)"] = time.perf_counter() - started
    if manifest.columns is not None:
        columns = manifest.columns
        started = time.perf_counter()
        codes = np.asarray(np.load(version / columns.labels, mmap_mode="r"))
        np.asarray(np.load(version / columns.weights, mmap_mode="r"))
        np.asarray(np.load(version / columns.offsets, mmap_mode="r"))
        np.asarray(columns.label_names, dtype=np.str_)[codes]
        out["exemplar columns (mapped; labels as strings)"] = time.perf_counter() - started
    started = time.perf_counter()
    index = ExemplarIndex.load(version, mmap=True)
    out["ExemplarIndex.load, all of it"] = time.perf_counter() - started
    started = time.perf_counter()
    index.texts[len(index.texts) // 2]
    out["first text read"] = time.perf_counter() - started
    del index
    started = time.perf_counter()
    texts: list[str] = []
    labels: list[str] = []
    weights: list[float] = []
    with (version / EXEMPLARS_FILE).open(encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            texts.append(row["text"])
            labels.append(row.get("label", ""))
            weights.append(float(row.get("weight", 1.0)))
    np.asarray(labels, dtype=np.str_)
    np.asarray(weights, dtype=np.float32)
    out["(without columns: exemplars.jsonl, json.loads per line, and the arrays)"] = (
        time.perf_counter() - started)
    del texts, labels, weights
    return out


def router_phase(args: argparse.Namespace, data: Synthetic) -> dict[str, Any]:
    from semroute.encoder import OnnxEncoder

    faiss_file = args.work / f"ivf-sq-{data.n}-{data.noise}.faiss"
    if not faiss_file.with_suffix(".json").exists():
        raise SystemExit(f"{faiss_file}: not built yet; run with --kinds ivf-sq first")
    meta = json.loads(faiss_file.with_suffix(".json").read_text())
    fingerprint = OnnxEncoder.load(benchlib.ENCODER_DIR, threads=1).fingerprint
    root = router_index(args.work, data, faiss_file, meta["factory"], fingerprint)
    texts, labels = labelled_rows("test")
    order = np.random.default_rng(7).permutation(len(texts))
    queries = [(texts[i], labels[i]) for i in order[:args.router_queries]]
    warm = [texts[i] for i in order[-50:]]
    result: dict[str, Any] = {"factory": meta["factory"], "files": {
        p.name: p.stat().st_size / 2**20 for p in sorted((root / "current").iterdir())}}
    log_path = args.work / "router.log"
    # Start times vary with the machine's load: each is taken ``--router-starts`` times.
    for cache in ("cold", "warm"):
        result[cache] = [serve_router(root, queries, warm, log_path, cold=cache == "cold",
                                      route=cache == "warm" and i == args.router_starts - 1)
                         for i in range(args.router_starts)]
        print(json.dumps({f"router {cache}": result[cache]}), flush=True)
    result["exact10k"] = [serve_router(flat_reference(args.work, data.base, fingerprint),
                                       queries, warm, args.work / "router-10k.log", cold=False,
                                       route=True)]
    print(json.dumps({"router exact 10k": result["exact10k"]}), flush=True)
    result["steps"] = load_breakdown(root)
    print(json.dumps({"load steps": result["steps"]}), flush=True)
    result["queries"] = len(queries)
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
        f"figures are for the FAISS index alone; {ROUTER_HOLDS} {NOT_MEASURED}. A load "
        "average well above 2 means other work shared the two "
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


ROUTER_HEADING = "### The router with the 1M index"
ROUTER_HOLDS = (
    "a router at this size also holds the exemplars' labels and weights (texts are read from "
    "exemplars.jsonl only to explain a decision) and checks every index file's checksum when "
    "it loads")
# What the section said before the exemplar columns; ``--router-only`` keeps that part, so
# the sentence is brought up to date there.
ROUTER_HELD = (
    "a router at this size also holds the exemplars' texts and labels in memory and checks the "
    "index file's checksum when it loads")


def report_router(args: argparse.Namespace, r: dict[str, Any], where: str) -> str:
    cold, warm, exact = r["cold"], r["warm"], r["exact10k"]

    def span(runs: list[dict[str, Any]], key: str) -> str:
        values = sorted(run[key] for run in runs)
        if len(values) == 1:
            return f"{values[0]:.2f} s"
        return f"{float(np.median(values)):.2f} s ({values[0]:.2f}-{values[-1]:.2f})"

    files = ", ".join(f"{name} {mib:.0f} MiB" for name, mib in r["files"].items()
                      if mib >= 1)
    lines = [
        ROUTER_HEADING, "",
        f"Command: `.venv/bin/python scripts/bench_scale.py --n {args.n}"
        f"{' --router-only' if args.router_only else ''} --router-queries "
        f"{args.router_queries} --router-starts {args.router_starts}` — {where}. The real "
        f"`semroute serve router --index DIR` process (one process, default settings, "
        f"embedding cache off, int8 encoder) over a labelled index version of {args.n:,} "
        f"exemplars ({files}): the `ivf-sq` file above ({r['factory']}, nprobe 8 as "
        "recorded in the manifest), each vector's exemplar the Banking77 train text and label "
        "it was drawn around (so every text appears about 100 times, with a different vector "
        "each time), weight 1, a manifest with the encoder's real fingerprint and the checksums"
        " the router verifies. The script writes the version with "
        "`semroute.index.write_prebuilt_version`, the layout `semroute index build --faiss "
        "ivf-sq` writes (exemplars.jsonl and its columns: labels.npy, weights.npy and the rows' "
        "offsets.npy, which the router loads instead of parsing the JSON lines), around the "
        "precomputed vectors (no 1M embeddings) and untuned: no tuned decision settings, no "
        "abstention model, hence no density file "
        "(confidence is the vote share, no threshold). Reference: the same writer over the "
        "10,003 real train embeddings, "
        "exact (`Flat`), served the same way.",
        "",
        "Start = process start to gRPC health SERVING (polled every 20 ms), split at the "
        "router's `listening` log event. Cold: every file of the index "
        "version dropped from the page cache first (`posix_fadvise DONTNEED` after `fsync`, "
        "checked with `fincore`; any cache below this machine's page cache is not controlled); "
        "Python, the libraries and the encoder model stay cached. "
        f"Warm: the next start, files cached. Then {r['queries']} Route calls over gRPC from "
        "one client, one at a time (Banking77 test texts, a seeded sample, after 50 warm-up "
        "calls), and the process's memory from /proc: RSS and PSS (smaps_rollup), the private "
        "part (RssAnon) and the peak (VmHWM); memory at SERVING is the last start's. "
        "Accuracy = the decision's route equals the test "
        "label (untuned indexes, so below the tuned figures elsewhere in this file). Each "
        "process is stopped with SIGTERM and waited for.",
        "",
        "| index | page cache | index files cached at start | starts | start to SERVING "
        "| to listening | loading | RSS at SERVING (anon) | peak RSS | RSS after Route calls "
        "(anon) | PSS after | Route p50 | Route p99 | accuracy |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, cache, runs in (("1M ivf-sq", "cold", cold), ("1M ivf-sq", "warm", warm),
                              ("10k exact", "warm", exact)):
        m, s = runs[-1], runs[-1]["serving"]
        after = (f"{m['after']['rss']:.0f} ({m['after']['rssanon']:.0f}) MiB | "
                 f"{m['after']['pss']:.0f} MiB | {m['p50']:.1f} ms | {m['p99']:.1f} ms | "
                 f"{m['accuracy']:.3f}" if "after" in m else "not measured | | | | ")
        peak = max(run["after"]["vmhwm"] if "after" in run else run["serving"]["vmhwm"]
                   for run in runs)
        lines.append(
            f"| {name} | {cache} | {m['cached_mib_at_start']:.0f} MiB | {len(runs)} | "
            f"{span(runs, 'start_s')} | {span(runs, 'to_listening_s')} | "
            f"{span(runs, 'loading_s')} | {s['rss']:.0f} ({s['rssanon']:.0f}) MiB | "
            f"{peak:.0f} MiB | {after} |")
    warm_m = warm[-1]
    peak = max(max(run["serving"]["vmhwm"] for run in cold), warm_m["after"]["vmhwm"])
    worst = max(run["start_s"] for run in cold + warm)
    met_rss, met_start = peak <= 1536, worst <= 5
    steps = ", ".join(f"{name} {seconds:.2f} s" for name, seconds in r["steps"].items())
    lines += [
        "",
        f"Targets (issue 16), router with the 1M index: RSS <= 1.5 GB — peak "
        f"{peak:.0f} MiB, {'**met**' if met_rss else '**missed**'}; cold start <= 5 s — "
        f"{span(cold, 'start_s')} with the index files out of the page cache, "
        f"{span(warm, 'start_s')} with them cached (median, range), slowest {worst:.2f} s: "
        f"{'**met**' if met_start else '**missed**'}. Decisions: accuracy "
        f"{warm_m['accuracy']:.3f} against {exact[-1]['accuracy']:.3f} over the exact 10k "
        f"index ({(warm_m['accuracy'] - exact[-1]['accuracy']) * 100:+.1f} points). Exit "
        f"statuses after SIGTERM: {', '.join(str(run['exit']) for run in cold + warm + exact)}.",
        "",
        f"Where the start goes: \"to listening\" is imports and the gRPC server, \"loading\" "
        f"the encoder and `ExemplarIndex.load` (to the `index loaded` log event). The load's "
        f"steps, repeated one by one in the bench process with the files cached: {steps}.",
        "",
        "Not measured: several router processes sharing the mapping (`--processes`), a start "
        "with Python and the encoder out of the page cache too, concurrent clients, a tuned "
        "build (abstention model, 1M density file), 1M distinct texts (these repeat 10,003 "
        "texts: distinct ones make exemplars.jsonl larger, hence its checksum slower; the "
        "router reads a text only to explain a decision), a reload "
        "(`ReloadIndex`) at 1M, and `semroute index build` itself at 1M (the embeddings).",
    ]
    return "\n".join(lines)


def kept_faiss_part() -> str:
    """The FAISS part of the current ``bench:scale`` section (``--router-only`` keeps it)."""
    text = benchlib.DOC.read_text()
    start, end = "<!-- bench:scale -->", "<!-- /bench:scale -->"
    if start not in text or end not in text:
        raise SystemExit("--router-only: docs/BENCHMARKS.md has no bench:scale section yet")
    section = text.split(start, 1)[1].split(end, 1)[0]
    return section.split(ROUTER_HEADING, 1)[0].strip().replace(ROUTER_HELD, ROUTER_HOLDS)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--kinds", default="ivf-sq,ivfpq,hnsw-sq")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--noise", type=float, default=0.03)
    parser.add_argument("--work", type=Path, default=Path("/tmp/semroute-bench-scale"))
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--rebuild", action="store_true", help="rebuild index files in --work")
    parser.add_argument("--router", action=argparse.BooleanOptionalAction, default=None,
                        help="serve the ivf-sq index from a router process (default: when "
                        "the ivf-sq file exists)")
    parser.add_argument("--router-only", action="store_true",
                        help="only the router phase; keep the section's FAISS table")
    parser.add_argument("--router-queries", type=int, default=500)
    parser.add_argument("--router-starts", type=int, default=3,
                        help="router starts timed per page-cache state")
    parser.add_argument("--measure", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        kind, index_file, queries, truth = args.measure
        print(json.dumps(measure(kind, Path(index_file), Path(queries), Path(truth))))
        return 0
    where = benchlib.machine()
    args.work.mkdir(parents=True, exist_ok=True)
    base, test = real_embeddings(args.work)
    data = Synthetic(base, args.n, args.noise)
    text = kept_faiss_part() if args.router_only else faiss_phase(args, data, test, where)
    ivf_file = args.work / f"ivf-sq-{data.n}-{data.noise}.faiss"
    if args.router_only or (args.router if args.router is not None else ivf_file.exists()):
        text = (text.replace(NOT_MEASURED, MEASURED_BELOW) + "\n\n"
                + report_router(args, router_phase(args, data), where))
        if not args.no_write:
            benchlib.write_section("scale", text)
    print(text)
    return 0


def faiss_phase(args: argparse.Namespace, data: Synthetic, test: F32, where: str) -> str:
    """Build (or reuse) and measure each FAISS kind; returns the section text so far."""
    queries = test[: args.queries]
    queries_file = args.work / f"queries-{args.queries}.npy"
    np.save(queries_file, queries)
    truth_file = args.work / f"truth-{data.n}-{data.noise}-{len(queries)}.npy"
    exact_top(data, queries, args.work)
    results: dict[str, dict[str, Any]] = {}
    text = ""
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
    return text


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    raise SystemExit(main())
