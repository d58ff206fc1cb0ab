"""Benchmark the router gRPC service: latency at one client, throughput at 64 concurrent clients.

    .venv/bin/python scripts/bench_grpc.py            # prints a table, updates docs/BENCHMARKS.md
    .venv/bin/python scripts/bench_grpc.py --processes 1,2 --channels 16   # + a 2-process column
    .venv/bin/python scripts/bench_grpc.py --starvation   # only: single-call latency while two
                                                          # clients send big RouteBatch calls

Setup, so the figures can be reproduced and compared:
- index: Banking77 train (../shared/data/banking77/train.csv, 10,003 exemplars, 77 routes),
  built once into out/bench_grpc/index with the exported encoder (reused while its encoder
  fingerprint and size still match);
- queries: Banking77 test (short customer questions), in file order;
- server: `semroute serve router` in its own process with default settings except the
  embedding cache, which is turned off so that every call pays for a real encoder run;
  logs at INFO (one access line and one decision line per call) go to out/bench_grpc/router.log;
- clients, in this process: at one client, the blocking `SyncRouterClient` (grpc's synchronous
  stub, no event loop) and the async `RouterClient` (grpc.aio), each measured;
  the load clients are grpc.aio, `--channels` connections shared among them. Latency is
  measured at the client, end to end; in-process `route()`, both 1-client kinds and the empty
  call (GetIndexInfo: no encoder, no search) are measured in the same run, in alternating
  blocks (each taking its turn to go first), with numpy's BLAS on one thread as in the server
  (`semroute.serve.limit_blas_threads`). The client shares the machine's cores with the server.

Data: Banking77 (PolyAI-LDN/task-specific-datasets), CC BY 4.0.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import benchlib

if TYPE_CHECKING:
    from semroute.router import Router

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "banking77"
ENCODER_DIR = benchlib.ENCODER_DIR  # the served default
FP32_ENCODER_DIR = benchlib.FP32_ENCODER_DIR
OUT = ROOT / "out" / "bench_grpc"


def read_texts(path: Path) -> list[str]:
    with path.open(newline="") as f:
        return [row["text"] for row in csv.DictReader(f)]


def ensure_index(train: Path, root: Path, encoder_dir: Path, *, hnsw: bool = False,
                 static: bool = False) -> Path:
    """Build the Banking77 index under ``root`` unless one built from the same file with the
    same encoder is already there (a stamp records the source and the encoder fingerprint).
    ``hnsw``: approximate HNSW32 index instead of the exact flat one. ``static``: with the
    two-stage encoder's static stage (the static model `make setup` distilled), as `semroute
    index build` adds it by default."""
    from semroute.config import IndexSettings
    from semroute.encoder import OnnxEncoder
    from semroute.index import build_index

    encoder = OnnxEncoder.load(encoder_dir, threads=2)
    static_model = None
    if static:
        from semroute.cli.static_cmds import static_for_build
        from semroute.config import Settings

        static_model = static_for_build(None, False, Settings(), encoder)
        if static_model is None:
            raise SystemExit(f"no static model distilled from {encoder_dir}: run `make setup`")
    stat = train.stat()
    source = f"{train.resolve()} {stat.st_size} {int(stat.st_mtime)} {encoder.fingerprint} {hnsw}"
    if static_model is not None:
        source += f" static {static_model.fingerprint}"
    stamp = root.parent / f"{root.name}.source"
    if stamp.exists() and stamp.read_text() == source and (root / "current").exists():
        print(f"index: reusing {root} (built from {train.name})")
        return root
    start = time.perf_counter()
    # Explicit either way: the default switches to HNSW above index.exact_max (5,000).
    settings = IndexSettings(exact_max=1) if hnsw else IndexSettings(exact_max=10**9)
    build_index([train], root, encoder, progress=False, encoder_path=encoder_dir,
                settings=settings, static_model=static_model)
    stamp.write_text(source)
    print(f"index: built from {train} in {time.perf_counter() - start:.1f} s")
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(
    index: Path, encoder_dir: Path, port: int, metrics_port: int, log_path: Path,
    overrides: dict[str, str], processes: int = 1,
) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "SEMROUTE_ENCODER__CACHE_SIZE": "0",
        "SEMROUTE_ROUTER_SERVER__WATCH_INTERVAL_S": "0",
        **overrides,
    }
    semroute = Path(sys.executable).parent / "semroute"
    with log_path.open("w") as log:
        return subprocess.Popen(
            [str(semroute), "serve", "router", "--index", str(index), "--host", "127.0.0.1",
             "--port", str(port), "--metrics-port", str(metrics_port),
             "--encoder", str(encoder_dir),
             *(["--processes", str(processes)] if processes != 1 else [])],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )


async def wait_serving(addr: str, proc: subprocess.Popen[bytes], log_path: Path) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async with grpc.aio.insecure_channel(addr) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for _ in range(1200):
            if proc.poll() is not None:
                raise SystemExit(f"router exited:\n{log_path.read_text()[-2000:]}")
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.1)
    raise SystemExit("router never became SERVING")


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU time of a process (this one if None), from /proc or os.times()."""
    if pid is None:
        t = os.times()
        return t.user + t.system
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def memory_kib(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of a process in KiB. PSS splits shared pages (the memory-mapped index, the
    shared libraries) among the processes mapping them, so the PSS of N workers adds up."""
    rss = pss = 0
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Rss:"):
            rss = int(line.split()[1])
        elif line.startswith("Pss:"):
            pss = int(line.split()[1])
    return rss, pss


def children(pid: int) -> list[int]:
    """The direct children of ``pid`` (the router's worker processes)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with_children = task / "children"
        if with_children.exists():
            found.extend(int(c) for c in with_children.read_text().split())
    return found


@dataclass
class Paired:
    """Latencies (s) measured in the same alternating blocks: in-process ``route()``; per
    server, Route with the blocking client (``SyncRouterClient``: grpc's synchronous stub) and
    with the async one (``RouterClient``: grpc.aio); and the empty call (GetIndexInfo) with
    each client, against the first server."""

    local: list[float]
    sync: list[list[float]]
    aio: list[list[float]]
    empty_sync: list[float]
    empty_aio: list[float]


def local_block(router: Router, texts: list[str], out: list[float]) -> None:
    for text in texts:
        start = time.perf_counter()
        router.route(text)
        out.append(time.perf_counter() - start)


async def paired_latencies(
    addrs: list[str], index: Path, encoder_dir: Path, texts: list[str], block: int = 25,
    threads: int = 2, two_stage: bool = False,
) -> Paired:
    """``Router.route()`` in this process (no gRPC), 1-client Route calls to each server in
    ``addrs`` with each client kind, and empty calls, on the same queries, in alternating
    blocks of ``block`` calls (each taking its turn to go first), so all see the same load from
    whatever else shares the machine.
    In process: the same index, encoder and settings as the server (embedding cache off); the
    servers are idle meanwhile, and the client's loop is blocked."""
    from semroute.config import EncoderSettings, Settings
    from semroute.grpc.router_client import RouterClient, SyncRouterClient
    from semroute.router import Router
    from semroute.serve import limit_blas_threads

    limit_blas_threads()  # as `serve router` does: in process and served alike
    settings = Settings(encoder=EncoderSettings(cache_size=0, threads=threads,
                                                two_stage=two_stage))
    router = Router.load(index, settings, encoder_path=encoder_dir)
    for text in texts[-200:]:  # warm-up (not measured)
        router.route(text)
    out = Paired([], [[] for _ in addrs], [[] for _ in addrs], [], [])
    clients = [RouterClient(addr, timeout=30) for addr in addrs]
    blocking = [SyncRouterClient(addr, timeout=30) for addr in addrs]
    try:
        for client, sync_client in zip(clients, blocking, strict=True):
            for text in texts[-200:]:
                await client.route(text)
                sync_client.route(text)
        for first in range(0, len(texts), block):
            part = texts[first:first + block]
            # In process, servers and client kinds take turns going first: whatever runs right
            # after a busy block starts on a machine still busy with it.
            sync_first = (first // block) % 2 == 0
            if sync_first:
                local_block(router, part, out.local)
            turn = list(enumerate(zip(clients, blocking, strict=True)))
            for i, (client, sync_client) in turn if sync_first else turn[::-1]:
                for kind in ("sync", "aio") if sync_first else ("aio", "sync"):
                    for text in part:
                        start = time.perf_counter()
                        if kind == "sync":
                            sync_client.route(text)
                        else:
                            await client.route(text)
                        (out.sync if kind == "sync" else out.aio)[i].append(
                            time.perf_counter() - start)
            for kind in ("sync", "aio") if sync_first else ("aio", "sync"):
                for _ in part:
                    start = time.perf_counter()
                    if kind == "sync":
                        blocking[0].index_info()
                    else:
                        await clients[0].index_info()
                    (out.empty_sync if kind == "sync" else out.empty_aio).append(
                        time.perf_counter() - start)
            if not sync_first:
                local_block(router, part, out.local)
    finally:
        for sync_client in blocking:
            sync_client.close()
        await asyncio.gather(*(c.close() for c in clients))
    return out


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def single_client(addr: str, texts: list[str]) -> list[float]:
    """Route calls one after another with the blocking client (as the 1-client rows)."""
    from semroute.grpc.router_client import SyncRouterClient

    latencies = []
    with SyncRouterClient(addr, timeout=30) as client:
        for text in texts:
            start = time.perf_counter()
            client.route(text)
            latencies.append(time.perf_counter() - start)
    return latencies


async def concurrent_clients(
    addr: str, texts: list[str], clients: int, seconds: float, channels: int
) -> tuple[int, float, list[float], int]:
    """``clients`` concurrent callers sharing ``channels`` channels (each channel is one HTTP/2
    connection, so one server process: with several processes, clients need several)."""
    from semroute.grpc.router_client import RouterClient

    stop_at = time.perf_counter() + seconds
    latencies: list[float] = []
    errors = 0

    async def one(worker: int, client: RouterClient) -> None:
        nonlocal errors
        i = worker
        while time.perf_counter() < stop_at:
            start = time.perf_counter()
            try:
                await client.route(texts[i % len(texts)])
                latencies.append(time.perf_counter() - start)
            except Exception:  # counted and reported
                errors += 1
            i += clients

    pool = [RouterClient(addr, timeout=30) for _ in range(min(channels, clients))]
    try:
        start = time.perf_counter()
        await asyncio.gather(*(one(w, pool[w % len(pool)]) for w in range(clients)))
        elapsed = time.perf_counter() - start
    finally:
        await asyncio.gather(*(c.close() for c in pool))
    return len(latencies), elapsed, latencies, errors


def scrape(metrics_port: int) -> dict[str, float]:
    import httpx

    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
    wanted = {}
    for line in text.splitlines():
        for name in ("semroute_router_batch_size_sum", "semroute_router_batch_size_count",
                     "semroute_router_encode_seconds_sum", "semroute_router_encode_seconds_count",
                     "semroute_router_search_seconds_sum"):
            if line.startswith(name + " "):
                wanted[name] = float(line.split()[1])
    return wanted


@dataclass(frozen=True)
class Variant:
    label: str
    encoder_dir: Path
    hnsw: bool = False
    settings: tuple[str, ...] = ()  # SECTION__FIELD=VALUE for the server
    processes: int = 1
    two_stage: bool = False  # index with the static stage; encoder.two_stage on, both sides


def run_variant(
    variant: Variant, args: argparse.Namespace, queries: list[str]
) -> tuple[list[tuple[str, str, str]], str]:
    """Build/reuse the variant's index, start a server, measure. Returns the table rows
    (measure, result, target) and a one-line note."""
    encoder_dir = variant.encoder_dir
    manifest = json.loads((encoder_dir / "manifest.json").read_text())
    name = "index" if encoder_dir == ENCODER_DIR else f"index-{manifest['fingerprint'][7:19]}"
    name += "-hnsw" if variant.hnsw else ""
    name += "-static" if variant.two_stage else ""
    index = ensure_index(args.train, OUT / name, encoder_dir, hnsw=variant.hnsw,
                         static=variant.two_stage)
    port, metrics_port = free_port(), free_port()
    log_path = OUT / "router.log"
    overrides = {}
    two_stage = (f"encoder__two_stage={'true' if variant.two_stage else 'false'}",)
    for item in [*variant.settings, *two_stage, *args.set]:
        key, _, value = item.partition("=")
        overrides[f"SEMROUTE_{key.upper()}"] = value
    load_before = os.getloadavg()[0]
    proc = start_server(index, encoder_dir, port, metrics_port, log_path, overrides,
                        variant.processes)
    addr = f"127.0.0.1:{port}"
    other: subprocess.Popen[bytes] | None = None
    other_addr: list[str] = []
    if args.compare_tree is not None and variant.processes == 1:
        # The same server from another source tree (e.g. the previous commit), measured in the
        # same alternating blocks: a before/after under identical load.
        other_port = free_port()
        other = start_server(index, encoder_dir, other_port, free_port(),
                             OUT / "router-compare.log",
                             {**overrides, "PYTHONPATH": str(args.compare_tree)})
        other_addr = [f"127.0.0.1:{other_port}"]
    try:
        asyncio.run(wait_serving(addr, proc, log_path))
        if other is not None:
            asyncio.run(wait_serving(other_addr[0], other, OUT / "router-compare.log"))
        server_pids = [proc.pid, *children(proc.pid)]
        paired = asyncio.run(
            paired_latencies([addr, *other_addr], index, encoder_dir, queries[: args.single],
                             # as many encoder threads as each server process has
                             threads=2 if variant.processes == 1
                             else max(1, (os.cpu_count() or 1) // variant.processes),
                             two_stage=variant.two_stage)
        )
        local, (single, *compared), single_aio = paired.local, paired.sync, paired.aio[0]
        if other is not None:
            other.send_signal(signal.SIGTERM)
            other.wait(30)
        cpu0 = (sum(cpu_seconds(p) for p in server_pids), cpu_seconds())
        single_client(addr, queries[: args.single // 2])
        cpu1 = (sum(cpu_seconds(p) for p in server_pids), cpu_seconds())
        before = scrape(metrics_port)
        done, elapsed, loaded, errors = asyncio.run(
            concurrent_clients(addr, queries, args.clients, args.seconds, args.channels)
        )
        after = scrape(metrics_port)
        cpu2 = (sum(cpu_seconds(p) for p in server_pids), cpu_seconds())
        memory = [memory_kib(p) for p in server_pids]
    finally:
        for server in (proc, other):
            if server is None or server.poll() is not None:
                continue
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
    load_after = os.getloadavg()[0]

    def delta(metric: str) -> float:
        return after.get(metric, 0.0) - before.get(metric, 0.0)

    batches = delta("semroute_router_batch_size_count")
    mean_batch = delta("semroute_router_batch_size_sum") / batches if batches else 0.0
    encode_ms = 1000 * delta("semroute_router_encode_seconds_sum") / batches if batches else 0.0
    ms = 1000.0
    n1, nn = args.single // 2, max(done, 1)
    local_p50, grpc_p50 = statistics.median(local), statistics.median(single)
    workers = memory[1:] or memory
    aio_p50 = statistics.median(single_aio)
    empty = {"blocking": statistics.median(paired.empty_sync),
             "async": statistics.median(paired.empty_aio)}
    p50 = {"blocking": grpc_p50, "async": aio_p50}

    def both(value: dict[str, float], sign: str = "") -> str:
        """``blocking / async`` in ms."""
        return " / ".join(f"{v * ms:{sign}.2f}" for v in value.values()) + " ms"

    def compared_row() -> str:
        if not compared:
            return "-"
        other = {"blocking": statistics.median(compared[0]),
                 "async": statistics.median(paired.aio[1])}
        return (both({k: v - local_p50 for k, v in other.items()}, "+")
                + f" (p50 {both(other)})")

    rows = [
        ("in-process route() p50 (same run, no gRPC)", f"{local_p50 * ms:.2f} ms", ""),
        ("p50 latency of an empty call (GetIndexInfo), 1 client: blocking / async",
         both(empty), ""),
        ("p50 latency, 1 client: blocking / async", both(p50), "<= 2 ms"),
        ("1-client gRPC p50 minus in-process p50: blocking / async",
         both({k: v - local_p50 for k, v in p50.items()}, "+"), "<= +0.6 ms"),
        ("the same minus the empty call (what Route adds to it): blocking / async",
         both({k: v - local_p50 - empty[k] for k, v in p50.items()}, "+"), ""),
        *([(f"gRPC minus in-process, 1-process server from {args.compare_tree} "
            "(--compare-tree): blocking / async", compared_row(), "")]
          if args.compare_tree is not None else []),
        ("p90 latency, 1 blocking client", f"{pct(single, 0.90) * ms:.2f} ms", ""),
        ("p99 latency, 1 blocking client", f"{pct(single, 0.99) * ms:.2f} ms", "<= 6 ms"),
        (f"throughput, {args.clients} clients over {min(args.channels, args.clients)} channels",
         f"{done / elapsed:,.0f} routes/s", ">= 1,000 routes/s"),
        (f"p50 / p99 latency, {args.clients} clients",
         f"{pct(loaded, 0.5) * ms:.1f} / {pct(loaded, 0.99) * ms:.1f} ms", ""),
        ("mean encoder batch under load", f"{mean_batch:.1f} queries in {encode_ms:.1f} ms", ""),
        ("failed calls under load", str(errors), "0"),
        ("CPU per call, 1 blocking client: server + client",
         f"{(cpu1[0] - cpu0[0]) / n1 * ms:.2f} + {(cpu1[1] - cpu0[1]) / n1 * ms:.2f} ms", ""),
        (f"CPU per call, {args.clients} clients: server + client",
         f"{(cpu2[0] - cpu1[0]) / nn * ms:.2f} + {(cpu2[1] - cpu1[1]) / nn * ms:.2f} ms",
         ""),
        ("server processes (serving)", str(len(workers)), ""),
        ("RSS per serving process (PSS)",
         " / ".join(f"{r / 1024:.0f} ({p / 1024:.0f})" for r, p in workers) + " MiB", ""),
        ("RSS total, all server processes (PSS)",
         f"{sum(r for r, _ in memory) / 1024:.0f} ({sum(p for _, p in memory) / 1024:.0f}) MiB",
         ""),
    ]
    note = (f"1-client mean {statistics.mean(single) * ms:.2f} ms over {len(single)} calls; "
            f"{done} calls "
            f"in {elapsed:.1f} s under load; load average {load_before:.1f} before, "
            f"{load_after:.1f} after")
    return rows, note


def encoder_ceiling(texts: list[str]) -> float:
    """Texts/s the default encoder embeds in this process, on both cores, with no gRPC, search
    or decision: the most any number of clients could get from the service with the embedding
    cache off."""
    from semroute.config import Settings
    from semroute.encoder import OnnxEncoder, embed_many

    encoder = OnnxEncoder.from_settings(ENCODER_DIR, Settings().encoder)
    embed_many(encoder, texts[:100])  # warm-up
    start = time.perf_counter()
    embed_many(encoder, texts)
    return len(texts) / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=Path, default=DATA / "train.csv")
    parser.add_argument("--queries", type=Path, default=DATA / "test.csv")
    parser.add_argument("--fp32", action="store_true",
                        help="also measure the fp32 reference encoder (HNSW); its index is built "
                        "under out/")
    parser.add_argument("--single", type=int, default=1000, help="calls at one client")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--channels", type=int, default=64,
                        help="channels (connections) the load clients share [64: one each]")
    parser.add_argument("--processes", default="1", metavar="N[,N...]",
                        help="server processes (`serve router --processes`); a list adds a "
                        "column per count beyond the first [1]")
    parser.add_argument("--compare-tree", type=Path, default=None, metavar="DIR",
                        help="also run a 1-process server from the semroute package under DIR "
                        "(PYTHONPATH, e.g. an export of the previous commit) and measure it in "
                        "the same alternating 1-client blocks")
    parser.add_argument("--defaults-only", action="store_true",
                        help="measure the default index only (no exact-flat column)")
    parser.add_argument("--no-two-stage", dest="two_stage", action="store_false",
                        help="leave out the two-stage columns (the default encoder.two_stage on, "
                        "an HNSW index with the static stage: one process, and the last "
                        "--processes count when there are several)")
    parser.add_argument("--seconds", type=float, default=15.0, help="length of the load phase")
    parser.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION__FIELD=VALUE",
                        help="extra server setting, e.g. router_server__workers=1 (repeatable)")
    parser.add_argument("--starvation", action="store_true",
                        help="only measure single Route latency under two big RouteBatch "
                        "clients (256 x 8,192 characters each call), on the starter index")
    args = parser.parse_args()

    OUT.mkdir(parents=True, exist_ok=True)
    if args.starvation:
        return starvation_main(args)
    queries = read_texts(args.queries)
    counts = [int(n) for n in args.processes.split(",")]
    variants = [
        Variant("int8, HNSW32, full encoder" + (f", {counts[0]} processes" if counts[0] > 1
                                                else ""),
                ENCODER_DIR, hnsw=True, processes=counts[0]),
    ]
    if not args.defaults_only:
        variants.append(Variant("int8, exact flat", ENCODER_DIR))
    variants += [Variant(f"int8, HNSW32, {n} processes", ENCODER_DIR, hnsw=True, processes=n)
                 for n in counts[1:]]
    if args.two_stage:
        variants += [Variant("int8, HNSW32, two-stage (defaults)"
                             + (f", {n} processes" if n > 1 else ""),
                             ENCODER_DIR, hnsw=True, processes=n, two_stage=True)
                     for n in sorted({1, counts[-1]})]
    if args.fp32:
        variants.append(Variant("fp32, HNSW32", FP32_ENCODER_DIR, hnsw=True))
    load_at_start = os.getloadavg()[0]
    ceiling = encoder_ceiling(queries[:1000])
    print(f"encoder alone, in-process, both cores: {ceiling:,.0f} texts/s")
    results = []
    for variant in variants:
        rows, note = run_variant(variant, args, queries)
        results.append((variant.label, rows, note))
        print(f"{variant.label}: {note}")

    measures = [(name, target) for name, _, target in results[0][1]]
    header = ["measure", *[label for label, _, _ in results], "target"]
    table = [header] + [
        [name, *[rows[i][1] for _, rows, _ in results], target]
        for i, (name, target) in enumerate(measures)
    ]
    widths = [max(len(row[c]) for row in table) for c in range(len(header))]
    print()
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))

    if not args.no_write:
        md = "\n".join(
            ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(row) + " |" for row in table[1:]]
        )
        notes = "\n".join(f"- {label}: {note}." for label, _, note in results)
        overrides = f"Setting overrides: {', '.join(args.set)}.\n" if args.set else ""
        cores = os.cpu_count() or 1
        busy = (f"\n**This run shared the machine** (load average {load_at_start:.1f} on {cores} "
                "cores at the start): every figure is inflated by waiting for a core, and "
                "differences of a millisecond or so between columns, or between in-process "
                "and gRPC, are within the noise." if load_at_start > cores else "")
        command = " ".join(["scripts/bench_grpc.py", *sys.argv[1:]])
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        body = f"""## Router gRPC service (`scripts/bench_grpc.py`)

Command: `.venv/bin/python {command}`, {when}.
Index: Banking77 train, 10,003 rows (9,999 after exact duplicates are dropped), 77 routes;
HNSW32 (efSearch 64, the default above 5,000 exemplars) or exact flat, as each column says.
Two-stage columns: the same HNSW index plus the static stage (`semroute index build` adds it
after `make setup`), `encoder.two_stage` on (the default) in the server and in process; the
other columns have no static stage, so every call runs the full encoder.
Queries: Banking77 test, short customer questions, distinct. Server:
`semroute serve router` in its own process(es), default settings (batch_max 32, batch_wait_ms 1,
2 worker threads, encoder 2 threads; with `--processes N`, N processes on one port, each with
cores/N encoder threads, the index memory-mapped) except the embedding cache, turned off so
every call runs the encoder; INFO logs to a file. Clients, in one process: at one client the
blocking `SyncRouterClient` (grpc's synchronous stub, no event loop) and the async
`RouterClient` (grpc.aio), each measured: rows marked "blocking / async" give both; the load
clients are grpc.aio. In-process `route()`, 1-client Route with each client kind and the empty
call are measured in the same run on the same {args.single} queries, in alternating blocks
of 25 (the server idle while this process routes; in process with as many encoder threads as
one server process and numpy's BLAS on one thread, as `serve router` sets it; in process, each
server and each client kind take turns going first), so all see the same load from the rest
of the machine; the difference between gRPC and in process is what the service adds to a
decision, and the empty call (interceptor, a 4 KB reply; no encoder, no search) is close to the
least any call to this server costs. Then
{args.seconds:.0f} s of {args.clients} clients sharing {min(args.channels, args.clients)}
channels, each channel its own connection (a multi-process router spreads connections, not
calls, over its processes). CPU per call is process CPU time (user + system, all server
processes) divided by calls. RSS counts shared pages (the mapped index, libraries) in every
process; PSS shares them out, so PSS adds up. The empty call (GetIndexInfo: no encoder, no
search) shows what gRPC in Python costs per call on this machine, client and server together;
`scripts/profile_route.py --floor` splits it by client and server kind.
{overrides}
{md}

Ceiling: the encoder alone (default settings, in the benchmark process before any server
starts, no gRPC, no search) embeds **{ceiling:,.0f} Banking77 queries/s** on both cores. That
bounds the throughput of any client count while every call runs the encoder (two-stage
columns: only the queries the static stage passes on run it; "mean encoder batch" counts the
batches that reached the router, whichever stage decided them).

{notes}

Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}.
The 1-minute load average includes this script's own earlier columns; one well above 2 before
the first column means other work shared the cores.{busy}

Reference, measured elsewhere (issue 15, before the lean request path: a 16-core Xeon, int8
encoder, Banking77 index, cache off, the load generator on other cores; not rerun here):

| server | routes/s at 64 clients | 1-client p50 |
|---|---|---|
| 1 process, 2 cores (defaults) | 629 | 3.68 ms |
| 1 process, 4 cores, 4 workers x 1 encoder thread | 1,029 | 3.70 ms |
| 1 process, 8 cores, 8 workers x 1 encoder thread | 1,181 - 1,290 | 3.6-4.2 ms |
| 4 processes x 2 cores, same port (SO_REUSEPORT), 16 client channels | 1,723 - 2,066 | 3.3-3.6 ms |
| 8 processes x 1 core, same port, 16 client channels | 2,550 | 3.56 ms |

Data: Banking77 (PolyAI-LDN/task-specific-datasets), CC BY 4.0.
"""
        benchlib.write_section("grpc", body)
    summary = {label: {n: v for n, v, _ in rows} for label, rows, _ in results}
    (OUT / "result.json").write_text(json.dumps(summary, indent=2))
    return 0


# ---- big batches vs single calls (issue 18 item 5) ----------------------------------------------

STARTER_INDEX = ROOT / "index_data" / "build" / "default"
SINGLE_QUERIES = ["Hi there!", "What is 17 times 23?", "Write a haiku about rain",
                  "Summarise this article about interest rates", "Fix this Python error"]


async def single_latencies(addr: str, seconds: float) -> list[float]:
    """Route calls one after another for ``seconds``; each call's latency in ms."""
    from semroute.grpc.router_client import RouterClient

    out: list[float] = []
    async with RouterClient(addr, timeout=60) as client:
        end = time.perf_counter() + seconds
        i = 0
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            await client.route(f"{SINGLE_QUERIES[i % len(SINGLE_QUERIES)]} #{i}")
            out.append((time.perf_counter() - t0) * 1000)
            i += 1
            await asyncio.sleep(0.01)
    return out


async def batch_load(addr: str, stop: asyncio.Event, done: list[float]) -> None:
    """RouteBatch calls of 256 long queries, back to back, until ``stop``."""
    from semroute.grpc.router_client import RouterClient
    from semroute.types import Query

    filler = "please explain the history of this topic in detail "
    async with RouterClient(addr, timeout=600) as client:
        n = 0
        while not stop.is_set():
            queries = [Query((f"{n}.{i} " + filler * 200)[:8192]) for i in range(256)]
            t0 = time.perf_counter()
            await client.route_batch(queries)
            done.append(time.perf_counter() - t0)
            n += 1


async def measure_starvation(addr: str, seconds: float) -> dict[str, float]:
    """Single-call p50/p99 alone, then with two big-batch clients running."""
    alone = await single_latencies(addr, min(seconds, 5.0))
    stop = asyncio.Event()
    batches: list[float] = []
    loaders = [asyncio.create_task(batch_load(addr, stop, batches)) for _ in range(2)]
    await asyncio.sleep(1.0)  # both batch clients are in flight
    loaded = await single_latencies(addr, seconds)
    stop.set()
    for task in loaders:  # a batch in flight may take a minute: no need to wait for it
        task.cancel()
    await asyncio.gather(*loaders, return_exceptions=True)
    return {
        "alone_p50_ms": pct(alone, 0.5), "alone_p99_ms": pct(alone, 0.99),
        "loaded_p50_ms": pct(loaded, 0.5), "loaded_p99_ms": pct(loaded, 0.99),
        "loaded_max_ms": max(loaded), "loaded_calls": float(len(loaded)),
        "batches": float(len(batches)),
        "batch_s_median": statistics.median(batches) if batches else -1.0,
    }


def starvation_main(args: argparse.Namespace) -> int:
    port, metrics_port = free_port(), free_port()
    log_path = OUT / "router-starvation.log"
    overrides = dict(o.split("=", 1) for o in args.set)
    env = {f"SEMROUTE_{k.upper()}": v for k, v in overrides.items()}
    proc = start_server(STARTER_INDEX, ENCODER_DIR, port, metrics_port, log_path, env)
    addr = f"127.0.0.1:{port}"
    try:
        asyncio.run(wait_serving(addr, proc, log_path))
        result = asyncio.run(measure_starvation(addr, args.seconds))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    rows = [
        ("single Route p50, alone", f"{result['alone_p50_ms']:.1f} ms"),
        ("single Route p99, alone", f"{result['alone_p99_ms']:.1f} ms"),
        ("single Route p50, 2 big-batch clients", f"{result['loaded_p50_ms']:.1f} ms"),
        ("single Route p99, 2 big-batch clients", f"{result['loaded_p99_ms']:.1f} ms"),
        ("single Route max, 2 big-batch clients", f"{result['loaded_max_ms']:.1f} ms"),
        ("single calls measured under load", f"{result['loaded_calls']:.0f}"),
        ("RouteBatch calls (256 x 8,192 chars) completed", f"{result['batches']:.0f}"),
    ]
    for name, value in rows:
        print(f"{name:48s} {value}")
    if not args.no_write:
        command = " ".join(["scripts/bench_grpc.py", *sys.argv[1:]])
        table = "\n".join(["| measure | value |", "|---|---|"]
                          + [f"| {n} | {v} |" for n, v in rows])
        body = f"""## Big batches vs single calls (`scripts/bench_grpc.py --starvation`)

Command: `.venv/bin/python {command}`; {benchlib.machine()}.
Server: `semroute serve router` on the starter index, defaults (2 workers; RouteBatch cut into
slices of `limits.batch_slice_tokens` = 2,048 estimated tokens that run one at a time in a lane
one worker short, so single calls always find a worker). Load: two clients sending RouteBatch
calls of 256 queries of 8,192 characters back to back while one client sends single Route calls
(10 ms apart) for {args.seconds:.0f} s (one such batch takes tens of seconds on this machine, so
few complete in the window). Before the fix the tester measured 9.8 s for a single call under
this load.

{table}
"""
        benchlib.write_section("grpc-starvation", body)
    (OUT / "starvation.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
