"""Profile the router's Route path: where a 1-client gRPC call spends its time beyond routing.

    .venv/bin/python scripts/profile_route.py                 # cProfile, top 35 by own time
    .venv/bin/python scripts/profile_route.py --calls 3000 --sort cumulative
    .venv/bin/python scripts/profile_route.py --threads   # CPU per call of every thread
    .venv/bin/python scripts/profile_route.py --ab DIR --clients 64   # routes/s vs another tree
    .venv/bin/python scripts/profile_route.py --floor     # empty call: client x server kind
    .venv/bin/python scripts/profile_route.py --path      # our Python per Route call, no gRPC
    .venv/bin/python scripts/profile_route.py --designs   # Route by server design (writes docs)

A router server (the same code as ``semroute serve router``: interceptor, servicer, coalescer,
worker threads) and one grpc.aio client run in this process on the Banking77 index of
``scripts/bench_grpc.py`` (embedding cache off). cProfile sees the event-loop thread (gRPC,
interceptor, servicer, conversions, logs, metrics, and the client's side of each call); the
encoder and FAISS run on worker threads, so they show as the wait in ``run_in_executor`` when
the service hops to a thread. Log lines go to /dev/null (INFO, JSON: rendering is measured).
For a view of every thread of a separate server process use py-spy instead:
``.venv/bin/py-spy record -p PID`` while ``scripts/bench_grpc.py`` runs.

``--floor`` splits the empty call (no encoder, no search) by who makes it and who serves it:
a bare grpc.aio server and a bare synchronous ``grpc.server`` (thread pool) answering an empty
message, and a ``semroute serve router`` answering GetIndexInfo (interceptor, servicer,
conversions), each called by grpc.aio and by grpc's synchronous stub, plus the synchronous
stub with latency channel arguments (``grpc.optimization_target=latency``, retries off), in
alternating blocks; each server is its own process.

``--path`` times our own Python per Route call with gRPC taken out: the interceptor's scope
and the servicer (conversions, checks, arm, coalescer, annotations) around a decision that is
already made, called directly on the event loop with a stand-in context; then the work
scheduled after the reply (metrics, the ``rpc`` log line rendered to /dev/null, arm counts).
CPU time, not a round trip, so it holds on a busy machine.

``--designs`` asks whether the 1-client target (gRPC p50 <= in-process p50 + 0.6 ms) is
within reach of any Python gRPC server on this machine: the same Route call (our protobuf
conversions around ``Router.route_batch``, run inline in the handler) served by a bare
synchronous ``grpc.server`` (thread pool), by a bare ``grpc.aio`` server, by that aio server
with semroute's ``CallInterceptor`` (request id, access log, metrics), by that aio server with
the interceptor's per-call scope wrapped around the handler at registration instead (no
server interceptor: what grpc.aio's interceptor machinery costs), and by ``semroute serve
router``, each its own process, against in-process routing, called by the blocking stub in
rotating blocks of 25; and in process with an idle gap before each call (a served call
always follows one: the round trip), which shows what a gap alone costs the encoder. Writes
the ``bench:grpc_designs`` section of docs/BENCHMARKS.md (``--no-write``: print only).

``--threads`` needs no profiler: it reads each thread's CPU time from /proc before and after
``--calls`` in-process ``route()`` calls, then the same queries as 1-client and ``--clients``
gRPC calls to a ``semroute serve router`` process (started as ``scripts/bench_grpc.py`` does,
embedding cache off), and prints CPU per call of the busiest threads of each side: spinning
onnxruntime workers, the event loop, gRPC's poller.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import bench_grpc
import benchlib


async def run(index: Path, calls: int, texts: list[str], profile: cProfile.Profile) -> None:
    from semroute.config import EncoderSettings, RouterServerSettings, Settings
    from semroute.grpc.router_client import RouterClient
    from semroute.grpc.router_service import create_router_server

    settings = Settings(encoder=EncoderSettings(cache_size=0),
                        router_server=RouterServerSettings(watch_interval_s=0))
    server, port, handle = await create_router_server(
        settings, index, host="127.0.0.1", port=0, encoder_path=benchlib.ENCODER_DIR
    )
    await server.start()
    await handle.load()
    try:
        async with RouterClient(f"127.0.0.1:{port}", timeout=30) as client:
            for text in texts[-200:]:  # warm-up
                await client.route(text)
            latencies = []
            profile.enable()
            for i in range(calls):
                start = time.perf_counter()
                await client.route(texts[i % len(texts)])
                latencies.append(time.perf_counter() - start)
            profile.disable()
        print(f"{calls} calls, p50 {statistics.median(latencies) * 1000:.2f} ms (under cProfile)")
    finally:
        await server.stop(0)
        await handle.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--sort", default="tottime", help="pstats sort key [tottime]")
    parser.add_argument("--top", type=int, default=35)
    parser.add_argument("--threads", action="store_true",
                        help="per-thread CPU per call, in process and against a server process")
    parser.add_argument("--clients", type=int, default=16, help="--threads: concurrent clients")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION__FIELD=VALUE",
                        help="--threads: extra server setting (repeatable)")
    parser.add_argument("--ab", type=Path, default=None, metavar="DIR",
                        help="routes/s and CPU per call against a server from the semroute "
                        "package under DIR, in alternating rounds")
    parser.add_argument("--rounds", type=int, default=6, help="--ab: rounds per server")
    parser.add_argument("--round-s", type=float, default=5.0, help="--ab: seconds per round")
    parser.add_argument("--floor", action="store_true",
                        help="empty-call p50 for each client and server kind")
    parser.add_argument("--echo-server", nargs=2, metavar=("KIND", "PORT"),
                        help=argparse.SUPPRESS)  # --floor's bare servers (aio or sync)
    parser.add_argument("--path", action="store_true",
                        help="our Python per Route call, gRPC taken out (see the docstring)")
    parser.add_argument("--designs", action="store_true",
                        help="1-client Route p50 by server design against in-process routing "
                        "(writes the bench:grpc_designs section)")
    parser.add_argument("--route-server", nargs=2, metavar=("KIND", "PORT"),
                        help=argparse.SUPPRESS)  # --designs' bare Route servers
    parser.add_argument("--no-write", action="store_true", help="--designs: print only")
    parser.add_argument("--throughput", action="store_true",
                        help="--designs: also routes/s at 64 clients over 16 channels, 2 "
                        "processes, two-stage index: bare grpc.aio servers against `semroute "
                        "serve router --processes 2`")
    args = parser.parse_args()
    if args.path:
        return path_main(args)
    if args.route_server:
        return route_server(args.route_server[0], int(args.route_server[1]))
    if args.designs:
        return designs_main(args)
    if args.echo_server:
        return echo_server(args.echo_server[0], int(args.echo_server[1]))
    if args.floor:
        return floor_main(args)
    if args.threads:
        return threads_main(args)
    if args.ab is not None:
        return ab_main(args)

    from semroute.config import LogSettings
    from semroute.logs import configure_logging

    sys.stderr = Path("/dev/null").open("w")  # noqa: SIM115 - the process's log sink
    configure_logging(LogSettings.model_validate({}))
    index = bench_grpc.ensure_index(bench_grpc.DATA / "train.csv", bench_grpc.OUT / "index-hnsw",
                                    benchlib.ENCODER_DIR, hnsw=True)
    texts = bench_grpc.read_texts(bench_grpc.DATA / "test.csv")
    profile = cProfile.Profile()
    asyncio.run(run(index, args.calls, texts, profile))
    pstats.Stats(profile, stream=sys.stdout).sort_stats(args.sort).print_stats(args.top)
    return 0


# ---- per-thread CPU (--threads) -----------------------------------------------------------------


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) of each thread of ``pid``, keyed ``name/tid``."""
    out: dict[str, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            raw = (task / "stat").read_text()
        except OSError:  # the thread ended
            continue
        name = raw[raw.index("(") + 1 : raw.rindex(")")]
        fields = raw.rsplit(")", 1)[1].split()
        out[f"{name}/{task.name}"] = (int(fields[11]) + int(fields[12])) / tick
    return out


def cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0) > 0}


def by_thread(delta: dict[str, float], calls: int) -> str:
    """Busy threads, heaviest first, as ``name/tid ms-per-call``."""
    busy = sorted(delta.items(), key=lambda kv: -kv[1])
    return ", ".join(f"{k} {v / calls * 1000:.2f}" for k, v in busy[:6] if v / calls >= 5e-5)


async def grpc_calls(addr: str, texts: list[str], clients: int = 1) -> tuple[list[float], int]:
    from semroute.grpc.router_client import RouterClient

    latencies: list[float] = []

    async def one(worker: int, client: RouterClient) -> None:
        for text in texts[worker::clients]:
            start = time.perf_counter()
            await client.route(text)
            latencies.append(time.perf_counter() - start)

    pool = [RouterClient(addr, timeout=60) for _ in range(clients)]
    try:
        await asyncio.gather(*(one(w, pool[w]) for w in range(clients)))
    finally:
        await asyncio.gather(*(c.close() for c in pool))
    return latencies, len(latencies)


def threads_main(args: argparse.Namespace) -> int:
    """Per-thread CPU per call: in-process ``route()`` here and 1-client gRPC calls to a
    ``semroute serve router`` process (the server of bench_grpc.py, same settings), alternating
    in blocks of 25 so both see the same load; then ``--clients`` concurrent gRPC clients."""
    from semroute.config import Settings
    from semroute.grpc.router_client import RouterClient
    from semroute.router import Router
    from semroute.serve import limit_blas_threads

    limit_blas_threads()  # as `serve router` does
    index = bench_grpc.ensure_index(bench_grpc.DATA / "train.csv", bench_grpc.OUT / "index-hnsw",
                                    benchlib.ENCODER_DIR, hnsw=True)
    texts = bench_grpc.read_texts(bench_grpc.DATA / "test.csv")
    env = {f"SEMROUTE_{k.upper()}": v for k, v in (item.split("=", 1) for item in args.set)}
    os.environ.update({**env, "SEMROUTE_ENCODER__CACHE_SIZE": "0"})  # in process as served
    log_path = bench_grpc.OUT / "router-profile.log"
    port = bench_grpc.free_port()
    proc = bench_grpc.start_server(index, benchlib.ENCODER_DIR, port, bench_grpc.free_port(),
                                   log_path, env)
    addr = f"127.0.0.1:{port}"
    me = os.getpid()
    ms = 1000.0

    async def paired(router: Router, sample: list[str]) -> list[tuple[str, list[float],
                                                                     dict[str, float]]]:
        local: list[float] = []
        remote: list[float] = []
        local_cpu: dict[str, float] = {}
        server_cpu: dict[str, float] = {}
        async with RouterClient(addr, timeout=60) as client:
            for text in texts[-200:]:  # warm-up
                await client.route(text)
            for first in range(0, len(sample), 25):
                part = sample[first:first + 25]
                c0 = thread_cpu(me)
                for text in part:
                    start = time.perf_counter()
                    router.route(text)
                    local.append(time.perf_counter() - start)
                for k, v in cpu_delta(c0, thread_cpu(me)).items():
                    local_cpu[k] = local_cpu.get(k, 0.0) + v
                s0 = thread_cpu(proc.pid)
                for text in part:
                    start = time.perf_counter()
                    await client.route(text)
                    remote.append(time.perf_counter() - start)
                for k, v in cpu_delta(s0, thread_cpu(proc.pid)).items():
                    server_cpu[k] = server_cpu.get(k, 0.0) + v
        return [("in-process route()", local, local_cpu),
                ("gRPC, 1 client: server", remote, server_cpu)]

    try:
        asyncio.run(bench_grpc.wait_serving(addr, proc, log_path))
        router = Router.load(index, Settings(), encoder_path=benchlib.ENCODER_DIR)
        sample = texts[: args.calls]
        for text in texts[-200:]:
            router.route(text)
        rows = [(what, statistics.median(lat) * ms, len(lat),
                 f"{sum(cpu.values()) / len(lat) * ms:.2f}", by_thread(cpu, len(lat)))
                for what, lat, cpu in asyncio.run(paired(router, sample))]
        s0 = thread_cpu(proc.pid)
        start = time.perf_counter()
        lat, n = asyncio.run(grpc_calls(addr, sample, args.clients))
        wall = time.perf_counter() - start
        sd = cpu_delta(s0, thread_cpu(proc.pid))
        rows.append((f"gRPC, {args.clients} clients: server ({n / wall:.0f} routes/s)",
                     statistics.median(lat) * ms, n, f"{sum(sd.values()) / n * ms:.2f}",
                     by_thread(sd, n)))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    print(f"load average {os.getloadavg()[0]:.1f}; settings: {args.set or 'defaults'}")
    print("what | p50 ms | calls | CPU ms/call | busiest threads (name/tid: CPU ms per call)")
    for what, p50, n, cpu, threads in rows:
        print(f"{what} | {p50:.2f} | {n} | {cpu} | {threads}")
    return 0

# ---- throughput A/B against another source tree (--ab) -----------------------------------------


def ab_main(args: argparse.Namespace) -> int:
    """Routes/s and server CPU per call at ``--clients`` concurrent clients, for a server from
    this tree and one from ``--ab DIR`` (PYTHONPATH, e.g. an export of the previous commit), in
    alternating rounds of ``--round-s`` seconds so both see the same load from the rest of the
    machine."""
    index = bench_grpc.ensure_index(bench_grpc.DATA / "train.csv", bench_grpc.OUT / "index-hnsw",
                                    benchlib.ENCODER_DIR, hnsw=True)
    texts = bench_grpc.read_texts(bench_grpc.DATA / "test.csv")
    env = {f"SEMROUTE_{k.upper()}": v for k, v in (item.split("=", 1) for item in args.set)}
    trees = {"this tree": env, str(args.ab): {**env, "PYTHONPATH": str(args.ab)}}
    servers: dict[str, tuple[subprocess.Popen[bytes], str]] = {}
    calls = dict.fromkeys(trees, 0)
    seconds = dict.fromkeys(trees, 0.0)
    cpu = dict.fromkeys(trees, 0.0)
    try:
        for i, (name, tree_env) in enumerate(trees.items()):
            port = bench_grpc.free_port()
            log_path = bench_grpc.OUT / f"router-ab-{i}.log"
            proc = bench_grpc.start_server(index, benchlib.ENCODER_DIR, port,
                                           bench_grpc.free_port(), log_path, tree_env)
            servers[name] = (proc, f"127.0.0.1:{port}")
            asyncio.run(bench_grpc.wait_serving(servers[name][1], proc, log_path))
        for _, addr in servers.values():  # warm-up
            asyncio.run(bench_grpc.concurrent_clients(addr, texts, args.clients, 2.0, 64))
        for r in range(args.rounds):
            order = list(servers.items()) if r % 2 == 0 else list(servers.items())[::-1]
            for name, (proc, addr) in order:
                c0 = bench_grpc.cpu_seconds(proc.pid)
                done, elapsed, _, errors = asyncio.run(bench_grpc.concurrent_clients(
                    addr, texts, args.clients, args.round_s, 64))
                cpu[name] += bench_grpc.cpu_seconds(proc.pid) - c0
                calls[name] += done
                seconds[name] += elapsed
                if errors:
                    print(f"{name}: {errors} failed calls in round {r}")
    finally:
        for proc, _ in servers.values():
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    print(f"{args.clients} clients, {args.rounds} alternating rounds of {args.round_s:.0f} s; "
          f"load average {os.getloadavg()[0]:.1f}; settings: {args.set or 'defaults'}")
    print("server | routes/s | server CPU ms/call")
    for name in trees:
        n = max(calls[name], 1)
        print(f"{name} | {calls[name] / seconds[name]:.0f} | {cpu[name] / n * 1000:.2f}")
    return 0

# ---- our Python per call, gRPC taken out (--path) ------------------------------------------------


class _StandInContext:
    """What the interceptor and the servicer ask of a grpc.aio context on a successful call."""

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return ()

    def set_trailing_metadata(self, metadata: Any) -> None:
        pass

    def code(self) -> None:
        return None

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"


async def time_path(index: Path, calls: int, texts: list[str]) -> tuple[list[float], list[float]]:
    """(before the reply, after it) seconds per call of our server path, decision canned."""
    import grpc

    from semroute._proto.semroute.v1 import router_pb2 as pb
    from semroute.auth import TokenSet
    from semroute.config import EncoderSettings, RouterServerSettings, Settings
    from semroute.grpc.interceptors import CallInterceptor, wrap_handler
    from semroute.grpc.router_service import RouterServicer, create_router_server
    from semroute.router import Router, Timings
    from semroute.types import Decision, Query

    settings = Settings(encoder=EncoderSettings(cache_size=0),
                        router_server=RouterServerSettings(watch_interval_s=0))
    _, _, handle = await create_router_server(
        settings, index, host="127.0.0.1", port=0, encoder_path=benchlib.ENCODER_DIR)
    await handle.load()
    try:
        router = handle.current()
        decisions = {t: router.route(t) for t in texts[:50]}
        coalescer = handle.coalescer

        def canned(_: Router, queries: list[Query]) -> list[Decision]:
            # as RouterHandle.route_inline, the routing itself left out
            made = [decisions[q.text] for q in queries]
            asyncio.get_running_loop().call_soon(handle._observe, made, Timings(1e-3, 1e-4, 1e-4))
            return made

        coalescer._run_inline = canned
        # The interceptor the server runs (standard_interceptors), built again to call directly.
        scope = CallInterceptor(TokenSet.from_settings(settings.auth),
                                on_done=handle.metrics.rpc.observe).scope
        handler = wrap_handler(
            grpc.unary_unary_rpc_method_handler(
                RouterServicer(handle).Route,
                request_deserializer=pb.RouteRequest.FromString,
                response_serializer=pb.RouteResponse.SerializeToString),
            "/semroute.v1.Router/Route", scope)
        context = _StandInContext()
        wire = [pb.RouteRequest(query=t).SerializeToString() for t in decisions]
        before: list[float] = []
        after: list[float] = []
        for i in range(calls + 500):
            coalescer._inline_budget = 1  # always the idle, inline path
            start = time.perf_counter()
            reply = await handler.unary_unary(handler.request_deserializer(wire[i % 50]), context)
            handler.response_serializer(reply)
            middle = time.perf_counter()
            await asyncio.sleep(0)  # the callbacks scheduled by the call run now
            end = time.perf_counter()
            if i >= 500:  # warm-up
                before.append(middle - start)
                after.append(end - middle)
        return before, after
    finally:
        await handle.close()


def path_main(args: argparse.Namespace) -> int:
    from semroute.config import LogSettings
    from semroute.logs import configure_logging

    sys.stderr = Path("/dev/null").open("w")  # noqa: SIM115 - the process's log sink
    configure_logging(LogSettings.model_validate({}))
    index = bench_grpc.ensure_index(bench_grpc.DATA / "train.csv", bench_grpc.OUT / "index-hnsw",
                                    benchlib.ENCODER_DIR, hnsw=True)
    texts = bench_grpc.read_texts(bench_grpc.DATA / "test.csv")
    before, after = asyncio.run(time_path(index, args.calls, texts))
    us = 1e6
    print(f"our Python per Route call, gRPC taken out, {args.calls} calls; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"before the reply (interceptor + servicer + conversions): p50 "
          f"{statistics.median(before) * us:.0f} us")
    print(f"after the reply (metrics, rpc log line, arm counts): p50 "
          f"{statistics.median(after) * us:.0f} us")
    return 0


# ---- the floor of an empty call (--floor) --------------------------------------------------------

ECHO_SERVICE, ECHO_METHOD = "bench.Echo", "/bench.Echo/Empty"
LATENCY_OPTIONS = [("grpc.optimization_target", "latency"), ("grpc.enable_retries", 0)]


def _raw(data: bytes) -> bytes:
    return data


def echo_server(kind: str, port: int) -> int:
    """A bare gRPC server answering ``ECHO_METHOD`` with an empty message: ``aio`` (grpc.aio,
    as semroute's servers) or ``sync`` (grpc.server on a thread pool)."""
    import concurrent.futures

    import grpc

    options = [("grpc.so_reuseport", 0)]
    address = f"127.0.0.1:{port}"
    if kind == "sync":
        def empty(request: bytes, context: grpc.ServicerContext) -> bytes:
            return b""

        handler = grpc.method_handlers_generic_handler(
            ECHO_SERVICE, {"Empty": grpc.unary_unary_rpc_method_handler(empty, _raw, _raw)})
        server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=4),
                             handlers=[handler], options=options)
        server.add_insecure_port(address)
        server.start()
        server.wait_for_termination()
        return 0

    async def empty(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return b""

    def make() -> Any:
        handler = grpc.method_handlers_generic_handler(
            ECHO_SERVICE, {"Empty": grpc.unary_unary_rpc_method_handler(empty, _raw, _raw)})
        return grpc.aio.server(handlers=[handler], options=options)

    return run_aio_server(make, address)


def run_aio_server(make: Any, address: str) -> int:
    """Serve ``make()`` (a grpc.aio server, built inside the event loop) on ``address`` until
    the process is stopped."""

    async def serve() -> None:
        server = make()
        server.add_insecure_port(address)
        await server.start()
        await server.wait_for_termination()

    asyncio.run(serve())
    return 0


def floor_main(args: argparse.Namespace) -> int:
    """Empty-call latency for each client kind against each server kind (see the module
    docstring), in alternating blocks of 25 calls, ``--calls`` calls each."""
    import grpc

    from semroute._proto.semroute.v1 import router_pb2 as pb
    from semroute._proto.semroute.v1 import router_pb2_grpc as pb_grpc

    index = bench_grpc.ensure_index(bench_grpc.DATA / "train.csv", bench_grpc.OUT / "index-hnsw",
                                    benchlib.ENCODER_DIR, hnsw=True)
    log_path = bench_grpc.OUT / "router-floor.log"
    servers: dict[str, tuple[subprocess.Popen[bytes], str]] = {}
    for kind in ("aio", "sync"):
        port = bench_grpc.free_port()
        servers[f"bare grpc.{'aio.server' if kind == 'aio' else 'server (thread pool)'}"] = (
            subprocess.Popen([sys.executable, __file__, "--echo-server", kind, str(port)]),
            f"127.0.0.1:{port}")
    port = bench_grpc.free_port()
    router = bench_grpc.start_server(index, benchlib.ENCODER_DIR, port, bench_grpc.free_port(),
                                     log_path, {"SEMROUTE_ENCODER__CACHE_SIZE": "0"})
    servers["semroute serve router (GetIndexInfo)"] = (router, f"127.0.0.1:{port}")
    latencies: dict[tuple[str, str], list[float]] = {}

    def methods(name: str, aio: Any, sync: Any, sync_fast: Any) -> list[tuple[str, Any]]:
        if name.startswith("semroute"):
            make = (lambda ch: pb_grpc.RouterStub(ch).GetIndexInfo)  # noqa: E731
            request: Any = pb.GetIndexInfoRequest()
        else:
            make = (lambda ch: ch.unary_unary(  # noqa: E731
                ECHO_METHOD, request_serializer=_raw, response_deserializer=_raw))
            request = b""
        return [("grpc.aio", (make(aio), request)), ("sync stub", (make(sync), request)),
                ("sync stub, latency options", (make(sync_fast), request))]

    async def measure() -> None:
        opened = []
        for name, (_, addr) in servers.items():
            aio = grpc.aio.insecure_channel(addr)
            sync = grpc.insecure_channel(addr)
            sync_fast = grpc.insecure_channel(addr, options=LATENCY_OPTIONS)
            opened.append((name, aio, sync, sync_fast, methods(name, aio, sync, sync_fast)))
        try:
            for _, _, _, _, calls in opened:  # warm-up
                for client, (method, request) in calls:
                    for _ in range(200):
                        reply = method(request, timeout=10)
                        if client == "grpc.aio":
                            await reply
            for block in range(0, args.calls, 25):
                order = opened if (block // 25) % 2 == 0 else opened[::-1]
                for name, _, _, _, calls in order:
                    for client, (method, request) in calls:
                        out = latencies.setdefault((name, client), [])
                        for _ in range(25):
                            start = time.perf_counter()
                            reply = method(request, timeout=10)
                            if client == "grpc.aio":
                                await reply
                            out.append(time.perf_counter() - start)
        finally:
            for _, aio, sync, sync_fast, _ in opened:
                await aio.close()
                sync.close()
                sync_fast.close()

    try:
        asyncio.run(bench_grpc.wait_serving(servers["semroute serve router (GetIndexInfo)"][1],
                                            router, log_path))
        time.sleep(1.0)  # the bare servers start in well under a second
        asyncio.run(measure())
    finally:
        for proc, _ in servers.values():
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    print(f"empty call p50 / p90 (ms), {args.calls} calls each in alternating blocks of 25; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print("server | client | p50 ms | p90 ms")
    for (name, client), lat in latencies.items():
        lat.sort()
        print(f"{name} | {client} | {statistics.median(lat) * 1000:.3f} | "
              f"{lat[int(0.9 * len(lat))] * 1000:.3f}")
    return 0


# ---- Route by server design (--designs) ----------------------------------------------------------

DESIGNS = {
    "sync": "bare grpc.server (thread pool), route inline",
    "aio": "bare grpc.aio server, route inline",
    "aio-interceptor": "bare grpc.aio server + semroute's CallInterceptor, route inline",
    "aio-wrapped": "bare grpc.aio server, the interceptor's per-call scope wrapped around the "
                   "handler at registration (no server interceptor), route inline",
}
IDLE_GAPS_S = (0.0, 0.0015, 0.005)


def _design_router(two_stage: bool = False, threads: int = 2) -> Any:
    from semroute.config import EncoderSettings, Settings
    from semroute.router import Router
    from semroute.serve import limit_blas_threads

    limit_blas_threads()  # as `serve router` does
    index = bench_grpc.OUT / ("index-hnsw-static" if two_stage else "index-hnsw")
    return Router.load(index, Settings(encoder=EncoderSettings(
        cache_size=0, threads=threads, two_stage=two_stage)), encoder_path=benchlib.ENCODER_DIR)


def route_server(kind: str, port: int) -> int:
    """A bare server answering semroute's Route with the same conversions and decision as
    ``serve router`` and nothing else (no coalescer, health, arms; ``aio-interceptor``: plus
    the standard interceptor, its log lines to /dev/null)."""
    import concurrent.futures

    import grpc

    from semroute._proto.semroute.v1 import router_pb2_grpc as pb_grpc
    from semroute.grpc import convert

    # aio-load: one of several processes on one port (SO_REUSEPORT), the two-stage index, one
    # encoder thread each, as `serve router --processes N` runs on N cores.
    load = kind == "aio-load"
    router = _design_router(two_stage=load, threads=1 if load else 2)
    address, options = f"127.0.0.1:{port}", [("grpc.so_reuseport", 1 if load else 0)]

    def decide(request: Any) -> Any:
        return convert.decision_to_proto(router.route_batch([convert.query_from_proto(request)])[0])

    if kind == "sync":
        class SyncServicer(pb_grpc.RouterServicer):  # type: ignore[misc]
            def Route(self, request: Any, context: Any) -> Any:
                return decide(request)

        server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=2),
                             options=options)
        pb_grpc.add_RouterServicer_to_server(SyncServicer(), server)
        server.add_insecure_port(address)
        server.start()
        server.wait_for_termination()
        return 0

    interceptors: list[Any] = []
    scoped: Any = None
    if kind in ("aio-interceptor", "aio-wrapped"):
        from semroute.auth import TokenSet
        from semroute.config import LogSettings
        from semroute.grpc.interceptors import CallInterceptor, wrap_handler
        from semroute.logs import configure_logging
        from semroute.metrics import RouterMetrics

        sys.stderr = Path("/dev/null").open("w")  # noqa: SIM115 - the process's log sink
        configure_logging(LogSettings.model_validate({}))
        interceptor = CallInterceptor(TokenSet(), on_done=RouterMetrics().rpc.observe)
        if kind == "aio-interceptor":
            interceptors = [interceptor]
        else:
            from semroute._proto.semroute.v1 import router_pb2 as pb

            async def behaviour(request: Any, context: Any) -> Any:
                return decide(request)

            method = "/semroute.v1.Router/Route"
            plain = grpc.unary_unary_rpc_method_handler(
                behaviour, request_deserializer=pb.RouteRequest.FromString,
                response_serializer=pb.RouteResponse.SerializeToString)
            scoped = grpc.method_handlers_generic_handler(
                "semroute.v1.Router", {"Route": wrap_handler(plain, method, interceptor.scope)})

    class AioServicer(pb_grpc.RouterServicer):  # type: ignore[misc]
        async def Route(self, request: Any, context: Any) -> Any:
            return decide(request)

    def make() -> Any:
        server = grpc.aio.server(interceptors=interceptors, options=options)
        if scoped is not None:
            server.add_generic_rpc_handlers([scoped])
        else:
            pb_grpc.add_RouterServicer_to_server(AioServicer(), server)
        return server

    return run_aio_server(make, address)


def designs_main(args: argparse.Namespace) -> int:
    from semroute.grpc.router_client import SyncRouterClient
    from semroute.grpc.router_workers import _die_with_parent

    machine = benchlib.machine()  # the load average before anything here starts
    index = bench_grpc.ensure_index(bench_grpc.DATA / "train.csv", bench_grpc.OUT / "index-hnsw",
                                    benchlib.ENCODER_DIR, hnsw=True)
    texts = bench_grpc.read_texts(bench_grpc.DATA / "test.csv")
    calls = min(args.calls, len(texts) - 200)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    addrs: dict[str, str] = {}
    for kind, label in DESIGNS.items():
        port = bench_grpc.free_port()
        procs[label] = subprocess.Popen([sys.executable, __file__, "--route-server", kind,
                                         str(port)], preexec_fn=_die_with_parent())
        addrs[label] = f"127.0.0.1:{port}"
    port = bench_grpc.free_port()
    serve_label = "semroute serve router (defaults, cache off, INFO logs to a file)"
    log_path = bench_grpc.OUT / "router-designs.log"
    procs[serve_label] = bench_grpc.start_server(index, benchlib.ENCODER_DIR, port,
                                                 bench_grpc.free_port(), log_path, {})
    addrs[serve_label] = f"127.0.0.1:{port}"
    clients: dict[str, SyncRouterClient] = {}
    local = "in process, no gap"
    gaps = {f"in process, {gap * 1000:g} ms idle before each call": gap
            for gap in IDLE_GAPS_S[1:]}
    try:
        asyncio.run(bench_grpc.wait_serving(addrs[serve_label], procs[serve_label], log_path))
        router = _design_router()
        for label, addr in addrs.items():
            client = SyncRouterClient(addr, timeout=30)
            for _ in range(300):  # the bare servers load the index in a few seconds
                try:
                    client.route("warm up")
                    break
                except Exception:
                    time.sleep(0.2)
            clients[label] = client
        for text in texts[-200:]:  # warm-up, not measured
            router.route(text)
            for client in clients.values():
                client.route(text)
        order = [local, *gaps, *clients]
        latencies: dict[str, list[float]] = {name: [] for name in order}
        for block, first in enumerate(range(0, calls, 25)):
            part = texts[first:first + 25]
            turn = block % len(order)
            for name in order[turn:] + order[:turn]:  # each takes its turn to go first
                out, gap = latencies[name], gaps.get(name, 0.0)
                for text in part:
                    if gap:
                        time.sleep(gap)
                    start = time.perf_counter()
                    if name in clients:
                        clients[name].route(text)
                    else:
                        router.route(text)
                    out.append(time.perf_counter() - start)
    finally:
        for client in clients.values():
            client.close()
        for proc in procs.values():
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    throughput = designs_throughput(args) if args.throughput else []
    base = statistics.median(latencies[local])
    rows = [f"| {name} | {statistics.median(v) * 1000:.2f} ms | "
            f"{(statistics.median(v) - base) * 1000:+.2f} ms |" for name, v in latencies.items()]
    flags = " --throughput" if args.throughput else ""
    body = f"""## Route by server design (`scripts/profile_route.py --designs`)

Command: `.venv/bin/python scripts/profile_route.py --designs{flags}`, {machine}.
Is issue 15's 1-client target (gRPC p50 <= in-process p50 + 0.6 ms) within reach of a Python
gRPC server here? The same Route call (our protobuf conversions around `Router.route_batch`,
run inline in the handler, int8 encoder on 2 threads, embedding cache off, the bench_grpc
HNSW index) served five ways, each server its own process, called by grpc's blocking stub
(`SyncRouterClient`), against in-process routing; {calls} Banking77 test queries each, in
rotating blocks of 25 (each row takes its turn to go first). The bare servers have no
coalescer, health service, arms, auth or logs: nothing of semroute's but the decision and its
conversions. The "idle" rows route in process after sleeping before each call: a served call
always follows an idle gap (the round trip), and the encoder runs slower after one.

| set-up | p50 | minus in process, no gap |
|---|---|---|
{chr(10).join(rows)}

{throughput_text(throughput, args)}
`profile_route.py --floor` gives the empty call (no routing) on the same kinds of server.
"""
    print(body)
    if not args.no_write:
        benchlib.write_section("grpc_designs", body)
    return 0


def designs_throughput(args: argparse.Namespace) -> list[tuple[str, int, float]]:
    """Routes/s of two bare grpc.aio processes on one port (route inline, two-stage index, one
    encoder thread each) and of `semroute serve router --processes 2` on the same index, in
    alternating rounds of ``THROUGHPUT_S`` at 64 clients over 16 channels."""
    from semroute.grpc.router_workers import _die_with_parent

    index = bench_grpc.ensure_index(bench_grpc.DATA / "train.csv",
                                    bench_grpc.OUT / "index-hnsw-static", benchlib.ENCODER_DIR,
                                    hnsw=True, static=True)
    texts = bench_grpc.read_texts(bench_grpc.DATA / "test.csv")
    bare_label = "2 bare grpc.aio processes on one port, route inline"
    serve_label = "semroute serve router --processes 2"
    results: list[tuple[str, int, float]] = []
    for _ in range(THROUGHPUT_ROUNDS):
        for label in (bare_label, serve_label):
            port = bench_grpc.free_port()
            procs: list[subprocess.Popen[bytes]] = []
            try:
                if label == bare_label:
                    procs = [subprocess.Popen(
                        [sys.executable, __file__, "--route-server", "aio-load", str(port)],
                        preexec_fn=_die_with_parent()) for _ in range(2)]
                    time.sleep(8.0)  # both load the index and bind (no health service)
                else:
                    log_path = bench_grpc.OUT / "router-designs-load.log"
                    procs = [bench_grpc.start_server(
                        index, benchlib.ENCODER_DIR, port, bench_grpc.free_port(), log_path,
                        {"SEMROUTE_ENCODER__TWO_STAGE": "true"}, processes=2)]
                    asyncio.run(bench_grpc.wait_serving(f"127.0.0.1:{port}", procs[0],
                                                        log_path))
                addr = f"127.0.0.1:{port}"
                asyncio.run(bench_grpc.concurrent_clients(addr, texts, 64, 2.0, 16))  # warm-up
                done, elapsed, _, errors = asyncio.run(
                    bench_grpc.concurrent_clients(addr, texts, 64, THROUGHPUT_S, 16))
                results.append((label, done, elapsed))
                print(f"{label}: {done / elapsed:,.0f} routes/s, {errors} failed")
            finally:
                for proc in procs:
                    proc.send_signal(signal.SIGTERM)
                    try:
                        proc.wait(30)
                    except subprocess.TimeoutExpired:
                        proc.kill()
    return results


THROUGHPUT_S = 15.0
THROUGHPUT_ROUNDS = 2


def throughput_text(results: list[tuple[str, int, float]], args: argparse.Namespace) -> str:
    if not results:
        return ""
    by_label: dict[str, list[float]] = {}
    for label, done, elapsed in results:
        by_label.setdefault(label, []).append(done / elapsed)
    rows = "\n".join(f"| {label} | {' / '.join(f'{r:,.0f}' for r in rates)} | "
                      f"{statistics.mean(rates):,.0f} |" for label, rates in by_label.items())
    return f"""
Throughput (`--throughput`): 64 grpc.aio clients over 16 channels on the same 2 cores, 2
server processes, the Banking77 index with the static stage and `encoder.two_stage` on, one
encoder thread per process; {THROUGHPUT_ROUNDS} rounds of {THROUGHPUT_S:.0f} s each, the two
set-ups alternating. The bare processes route inline on their event loop (no coalescer, so no
batching) and do nothing else; issue 15's target is 1,000 routes/s.

| server | routes/s per round | mean |
|---|---|---|
{rows}
"""


if __name__ == "__main__":
    sys.exit(main())
