"""HTTP door overhead: time to first token through the OpenAI-compatible door minus calling the
backend directly.

    .venv/bin/python scripts/bench_http_door.py [--n 300] [--no-write]

The backend is our fault server streaming with zero delay (so the figures are the door's and the
dispatcher's, not an LLM's). Backend, router and dispatcher (with ``--http-port``) each run as a
process of their own, as deployed. Pairs are measured alternately over warm, pooled loopback connections:

* direct: httpx streaming ``/v1/chat/completions`` from the backend, time to the first content;
* door: httpx streaming the same request from the door, time to the first content chunk, with
  ``model`` = the target (forced, no routing) or ``auto`` (router process: embedding + FAISS).

Overhead = door - direct, per pair. Also the door's ``GET /v1/models`` round trip. Writes the
``bench:http_door`` section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from benchlib import DOC, ENCODER_DIR, ROOT, machine, write_section

from semroute.testing.devstack import (
    ManagedProcess,
    child_env,
    start_dispatcher,
    start_router,
    wait_until,
    write_backends,
)

INDEX_DIR = ROOT / "index_data" / "build" / "default"
PROMPT = "Write a short poem about autumn leaves"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def first_content(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> float:
    """Seconds from sending the request to the first SSE chunk with text; drains the rest."""
    start = time.perf_counter()
    seen: float | None = None
    async with client.stream("POST", url, json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if seen is None and '"content":"' in line.replace(": ", ":") and '"content":""' not in line:
                seen = time.perf_counter() - start
    if seen is None:
        raise RuntimeError(f"{url}: no content chunk")
    return seen


async def measure(backend_url: str, door_url: str, n: int) -> dict[str, Any]:
    direct_body = {"model": "m", "messages": [{"role": "user", "content": PROMPT}], "stream": True}
    rows: dict[str, Any] = {}
    async with httpx.AsyncClient(trust_env=False, timeout=30) as client:
        for model in ("local-small", "auto"):
            door_body = {**direct_body, "model": model}
            for _ in range(20):  # warm both connection pools, the encoder and the caches
                await first_content(client, f"{backend_url}/chat/completions", direct_body)
                await first_content(client, f"{door_url}/chat/completions", door_body)
            direct: list[float] = []
            door: list[float] = []
            for _ in range(n):
                direct.append(await first_content(client, f"{backend_url}/chat/completions",
                                                  direct_body))
                door.append(await first_content(client, f"{door_url}/chat/completions", door_body))
            rows[model] = (direct, door, [b - a for a, b in zip(direct, door, strict=True)])
        models = []
        for _ in range(n):
            start = time.perf_counter()
            (await client.get(f"{door_url}/models")).raise_for_status()
            models.append(time.perf_counter() - start)
        rows["models"] = models
    return rows


def report(rows: dict[str, Any], n: int, where: str) -> str:
    ms = 1000.0
    lines = [
        "## HTTP door (OpenAI-compatible)",
        "",
        f"`.venv/bin/python scripts/bench_http_door.py --n {n}` on {where}.",
        "Backend: our fault server, zero delay. Time to first content chunk, ms, "
        f"{n} alternating pairs per row.",
        "",
        "| model | direct p50 | door p50 | overhead p50 | overhead p95 |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for model, label in (("local-small", "target name (forced)"), ("auto", "auto (router)")):
        direct, door, overhead = rows[model]
        lines.append(
            f"| {label} | {statistics.median(direct) * ms:.2f} | {statistics.median(door) * ms:.2f} "
            f"| {statistics.median(overhead) * ms:.2f} | {pct(overhead, 95) * ms:.2f} |"
        )
    models = rows["models"]
    lines += [
        "",
        f"`GET /v1/models` round trip: p50 {statistics.median(models) * ms:.2f} ms, "
        f"p95 {pct(models, 95) * ms:.2f} ms.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--no-write", action="store_true", help=f"print only, leave {DOC.name}")
    args = parser.parse_args(argv)
    where = machine()
    log_dir = Path(tempfile.mkdtemp(prefix="semroute-bench-http-"))
    # Nothing shares a GIL with the measuring client.
    backend = ManagedProcess(
        "faultserver",
        [sys.executable, "-m", "semroute.testing.faultserver", "--chunks", "4"],
        log_dir / "faultserver.log",
        child_env(),
    )
    backend.start()
    try:
        wait_until(backend, lambda: "listening on" in backend.log_tail(), 30.0, "listening")
        port = backend.log_tail().split("listening on", 1)[1].split()[0].rsplit(":", 1)[-1]
        backend_url = f"http://127.0.0.1:{port}/v1"
        backends = write_backends(
            ROOT / "deploy" / "backends.yaml",
            log_dir / "backends.yaml",
            {"local-small": backend_url, "local-large": backend_url},
        )
        router = start_router(INDEX_DIR, log_dir, encoder=ENCODER_DIR)
        try:
            dispatcher = start_dispatcher(router.address, backends, log_dir, http_port=0)
            try:
                door_url = f"http://127.0.0.1:{dispatcher.http_port}/v1"
                rows = asyncio.run(measure(backend_url, door_url, args.n))
            finally:
                dispatcher.stop()
        finally:
            router.stop()
    finally:
        backend.stop()
    text = report(rows, args.n, where)
    print(text)
    if not args.no_write:
        write_section("http_door", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
