"""Profile the router's Route path: where a 1-client gRPC call spends its time beyond routing.

    .venv/bin/python scripts/profile_route.py                 # cProfile, top 35 by own time
    .venv/bin/python scripts/profile_route.py --calls 3000 --sort cumulative

A router server (the same code as ``semroute serve router``: interceptor, servicer, coalescer,
worker threads) and one grpc.aio client run in this process on the Banking77 index of
``scripts/bench_grpc.py`` (embedding cache off). cProfile sees the event-loop thread (gRPC,
interceptor, servicer, conversions, logs, metrics, and the client's side of each call); the
encoder and FAISS run on worker threads, so they show as the wait in ``run_in_executor`` when
the service hops to a thread. Log lines go to /dev/null (INFO, JSON: rendering is measured).
For a view of every thread of a separate server process use py-spy instead:
``.venv/bin/py-spy record -p PID`` while ``scripts/bench_grpc.py`` runs.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import statistics
import sys
import time
from pathlib import Path

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
    args = parser.parse_args()

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


if __name__ == "__main__":
    sys.exit(main())
