"""What shadow mode costs the served path: Route latency and throughput, shadow off vs on.

    .venv/bin/python scripts/bench_shadow.py [--index index_data/build/default] [--n 400]

An in-process router server (real encoder with its embedding cache, real FAISS, grpc.aio on
127.0.0.1) serves the index; with shadow on, the candidate is the same index version loaded a
second time (the same work as a real candidate: a second FAISS search and decision per query,
the embedding a cache hit). Queries are Banking77 test texts (each mode gets its own slice, so
the served path always pays for a real encoder run). Sequential: one client, latency at the
client; concurrent: 16 clients. Prints a table; writes nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import grpc  # noqa: E402

from semroute._proto.semroute.v1 import router_pb2 as pb  # noqa: E402
from semroute._proto.semroute.v1 import router_pb2_grpc as pb_grpc  # noqa: E402
from semroute.config import load_settings  # noqa: E402
from semroute.grpc.router_service import create_router_server  # noqa: E402
from semroute.index import resolve_version_dir  # noqa: E402
from semroute.logs import configure_logging  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "banking77" / "test.csv"


def _texts() -> list[str]:
    with DATA.open(newline="", encoding="utf-8") as fh:
        return [row["text"] for row in csv.DictReader(fh)]


async def _run(index: Path, texts: list[str], shadow: bool, clients: int) -> dict[str, float]:
    settings = load_settings(None, router_server__watch_interval_s=0,
                             router_server__metrics_port=0, loop__decision_log="")
    server, port, handle = await create_router_server(settings, index, host="127.0.0.1", port=0)
    await server.start()
    try:
        await handle.load()
        if shadow:
            await handle.set_candidate("shadow", resolve_version_dir(index), 0.0)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb_grpc.RouterStub(ch)
            await stub.Route(pb.RouteRequest(query="warm up"), timeout=30)
            lat: list[float] = []

            async def client(part: list[str]) -> None:
                for text in part:
                    t0 = time.perf_counter()
                    await stub.Route(pb.RouteRequest(query=text), timeout=30)
                    lat.append((time.perf_counter() - t0) * 1000)

            started = time.perf_counter()
            await asyncio.gather(*(client(texts[i::clients]) for i in range(clients)))
            wall = time.perf_counter() - started
        compared = handle.arms.agreement.overall.compared
        for _ in range(600):  # let the lane finish, so its counts are complete
            if not shadow or handle.arms.lane.pending == 0:
                break
            await asyncio.sleep(0.05)
        lat.sort()
        return {"p50": statistics.median(lat), "p95": lat[int(0.95 * (len(lat) - 1))],
                "qps": len(texts) / wall, "compared_at_end": compared,
                "dropped": handle.arms.lane.dropped}
    finally:
        await server.stop(0)
        await handle.close()


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", type=Path, default=REPO / "index_data" / "build" / "default")
    parser.add_argument("--n", type=int, default=400, help="queries per run")
    args = parser.parse_args()
    configure_logging(load_settings(None, log__level="WARNING").log)  # no access line per call
    texts = _texts()
    rows = []
    slot = 0
    for clients in (1, 16):
        for shadow in (False, True):
            part = texts[slot * args.n:(slot + 1) * args.n]
            slot += 1
            rows.append((clients, shadow, await _run(args.index, part, shadow, clients)))
    print("| clients | shadow | p50 ms | p95 ms | queries/s | compared when the last answer "
          "arrived | dropped |")
    print("|---|---|---|---|---|---|---|")
    for clients, shadow, r in rows:
        print(f"| {clients} | {'on' if shadow else 'off'} | {r['p50']:.2f} | {r['p95']:.2f} | "
              f"{r['qps']:.0f} | {int(r['compared_at_end'])} | {int(r['dropped'])} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
