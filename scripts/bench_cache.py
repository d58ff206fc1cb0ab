"""Response cache and accounting: time to first token of a cache hit through the HTTP door, and
what the ledger (rate limit, cache lookup, budget reservation, settlement, cache store) adds
to a miss.

    .venv/bin/python scripts/bench_cache.py [--n 300] [--no-write]

1. Hit TTFT: a dispatcher process with the exact cache on (``deploy/stack.yaml``) and a budget
   and rate limit for its tenant, its HTTP door streaming one cached request (``model: auto``;
   a hit skips routing) over a warm loopback connection: time from sending to the first
   content chunk. Targets: p50 <= 2 ms.
   Timed twice: with a bare HTTP/1.1 client on one keep-alive connection (the door's own time),
   and with httpx's streaming API (what a Python client sees; httpx adds its own cost).
2. Miss overhead, in process: the ledger's calls for one miss (``open`` with a budgeted and
   rate-limited tenant, a unique prompt so the lookup misses, ``reserve``, ``settle`` which
   stores the answer), timed per request, with the in-process state and with a local Redis
   (``redis-server`` started on a free port). Target (in process): p50 <= 0.3 ms.
3. Miss overhead end to end: door TTFT for unique prompts (misses) with that ledger minus a
   dispatcher with cache and budgets off, alternating pairs (noisy: context for 2.).

Backend: our fault server, zero delay, as a process of its own. Writes the ``bench:cache``
section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml
from benchlib import DOC, ENCODER_DIR, ROOT, machine, write_section

from semroute.config import load_settings
from semroute.dispatch.backend_config import BackendConfig
from semroute.dispatch.ledger import build_ledger
from semroute.dispatch.metrics import DispatchMetrics
from semroute.testing.devstack import (
    ManagedProcess,
    child_env,
    start_dispatcher,
    start_router,
    wait_until,
    write_backends,
)
from semroute.testing.redis import running_redis
from semroute.types import ChatRequest, DoneEvent, GenerationParams, Message

INDEX_DIR = ROOT / "index_data" / "build" / "default"
PROMPT = "Write a short poem about autumn leaves"
TOKEN = "bench-token"
LIMITS = {"usd_per_day": 1000.0, "usd_per_month": 10000.0, "requests_per_minute": 1_000_000,
          "tokens_per_minute": 1_000_000_000}


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
            if seen is None and '"content":"' in line.replace(": ", ":") and (
                '"content":""' not in line.replace(": ", ":")
            ):
                seen = time.perf_counter() - start
    if seen is None:
        raise RuntimeError(f"{url}: no content chunk")
    return seen


class RawClient:
    """HTTP/1.1 over one keep-alive loopback connection, by hand: what the door takes to the
    first content chunk without a client library's own per-request cost (httpx's streaming
    path alone adds milliseconds here)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def first_content(self, body: dict[str, Any]) -> float:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        data = json.dumps(body).encode()
        head = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: {self.host}\r\n"
            f"Authorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n"
        ).encode()
        start = time.perf_counter()
        self.writer.write(head + data)
        buf = b""
        while b'"content":"' not in buf.replace(b'"content":""', b""):
            chunk = await self.reader.read(65536)
            if not chunk:
                raise RuntimeError("the door closed the connection")
            buf += chunk
        seen = time.perf_counter() - start
        while not buf.endswith(b"0\r\n\r\n"):  # the rest of the chunked stream
            buf += await self.reader.read(65536)
        if b" 200 OK" not in buf.split(b"\r\n", 1)[0]:
            raise RuntimeError(f"door answered {buf[:80]!r}")
        return seen

    async def aclose(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _body(text: str, model: str = "auto") -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], "stream": True,
            "max_tokens": 64}


async def measure_door(ledger_url: str, plain_url: str, n: int) -> dict[str, list[float]]:
    headers = {"authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(trust_env=False, timeout=30, headers=headers) as client:
        hit_url, plain = f"{ledger_url}/chat/completions", f"{plain_url}/chat/completions"
        for i in range(20):  # warm pools, the router's encoder, and the one cached entry
            await first_content(client, hit_url, _body(PROMPT))
            await first_content(client, plain, _body(f"warm {i} {PROMPT}", "local-small"))
            await first_content(client, hit_url, _body(f"warm {i} {PROMPT}", "local-small"))
        hits = [await first_content(client, hit_url, _body(PROMPT)) for _ in range(n)]
        raw = RawClient("127.0.0.1", int(ledger_url.rsplit(":", 1)[1].split("/")[0]))
        try:
            for _ in range(20):
                await raw.first_content(_body(PROMPT))
            raw_hits = [await raw.first_content(_body(PROMPT)) for _ in range(n)]
        finally:
            await raw.aclose()
        whole: list[float] = []
        for _ in range(n):
            start = time.perf_counter()
            r = await client.post(hit_url, json={**_body(PROMPT), "stream": False})
            r.raise_for_status()
            whole.append(time.perf_counter() - start)
        floor: list[float] = []
        for _ in range(n):
            start = time.perf_counter()
            (await client.get(f"{ledger_url}/models")).raise_for_status()
            floor.append(time.perf_counter() - start)
        delta: list[float] = []
        for i in range(n):
            text = f"miss {i} {time.time_ns()} {PROMPT}"
            a = await first_content(client, plain, _body(text, "local-small"))
            b = await first_content(client, hit_url, _body(text, "local-small"))
            delta.append(b - a)
    return {"hits": hits, "raw_hits": raw_hits, "delta": delta, "floor": floor, "whole": whole}


async def measure_ledger(n: int, redis_url: str) -> dict[str, list[float]]:
    configs = {"local-small": BackendConfig("local-small", "http://127.0.0.1:9/v1", "local-small",
                                            input_cost=0.02, output_cost=0.02, local=True)}
    rows: dict[str, list[float]] = {}
    for name, url in (("in process", ""), ("Redis", redis_url)):
        settings = load_settings(cache__exact=True, state__url=url,
                                 budgets__tenants={"bench": LIMITS})
        ledger = build_ledger(settings, configs, DispatchMetrics(), {"bench"})
        done = DoneEvent("stop", 12, 4, 1e-6, "local-small", 1, 0.01)
        times: list[float] = []
        try:
            for i in range(n + 50):
                req = ChatRequest((Message("user", f"{i} {time.time_ns()} {PROMPT}"),),
                                  params=GenerationParams(max_tokens=64), tenant="bench")
                start = time.perf_counter()
                ticket = await ledger.open(req, False)
                await ledger.reserve(ticket, req, ("local-small",))
                ticket.chunks.extend(("Hello", ",", " world", "!"))
                await ledger.settle(ticket, "general", ("local-small",), done)
                if i >= 50:
                    times.append(time.perf_counter() - start)
                if ticket.status != "miss":
                    raise RuntimeError(f"expected a miss, got {ticket.status}")
        finally:
            await ledger.aclose()
        rows[name] = times
    return rows


def report(door: dict[str, list[float]], ledger: dict[str, list[float]], n: int, where: str) -> str:
    ms = 1000.0
    hits, delta = door["hits"], door["delta"]
    lines = [
        "## Response cache and accounting",
        "",
        f"`.venv/bin/python scripts/bench_cache.py --n {n}` on {where}.",
        "Backend: our fault server, zero delay, own process. Dispatcher processes with the exact "
        "cache on and a budgeted, rate-limited tenant (in-process state).",
        "",
        "| measure | p50 ms | p95 ms | target |",
        "| --- | ---: | ---: | --- |",
        f"| cache hit, HTTP door, TTFT (`model: auto`), raw HTTP/1.1 client "
        f"| {statistics.median(door['raw_hits']) * ms:.3f} | {pct(door['raw_hits'], 95) * ms:.3f} "
        "| p50 <= 2 ms |",
        f"| the same with httpx (`client.stream`, `aiter_lines`) | "
        f"{statistics.median(hits) * ms:.3f} | {pct(hits, 95) * ms:.3f} | - |",
        f"| cache hit, HTTP door, not streamed: whole response | "
        f"{statistics.median(door['whole']) * ms:.3f} | {pct(door['whole'], 95) * ms:.3f} | - |",
        f"| reference: `GET /v1/models` round trip, same door | "
        f"{statistics.median(door['floor']) * ms:.3f} | {pct(door['floor'], 95) * ms:.3f} | - |",
    ]
    for name, times in ledger.items():
        target = "p50 <= 0.3 ms" if name == "in process" else "-"
        lines.append(
            f"| ledger on a miss ({name}): rate limit + lookup + reserve + settle + store "
            f"| {statistics.median(times) * ms:.3f} | {pct(times, 95) * ms:.3f} | {target} |"
        )
    lines.append(
        f"| miss TTFT, HTTP door: with ledger minus without (alternating pairs) "
        f"| {statistics.median(delta) * ms:.3f} | {pct(delta, 95) * ms:.3f} | (context) |"
    )
    return "\n".join(lines)


def _config(path: Path, tokens: Path, on: bool) -> Path:
    data: dict[str, Any] = {"auth": {"tokens_file": str(tokens)}, "loop": {"decision_log": ""}}
    if on:
        data |= {"cache": {"exact": True}, "budgets": {"tenants": {"bench": LIMITS}}}
    path.write_text(yaml.safe_dump(data))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--no-write", action="store_true", help=f"print only, leave {DOC.name}")
    args = parser.parse_args(argv)
    where = machine()
    log_dir = Path(tempfile.mkdtemp(prefix="semroute-bench-cache-"))
    tokens = log_dir / "tokens"
    tokens.write_text(f"bench {TOKEN}\n")
    backend = ManagedProcess(
        "faultserver", [sys.executable, "-m", "semroute.testing.faultserver", "--chunks", "4"],
        log_dir / "faultserver.log", child_env(),
    )
    backend.start()
    started: list[ManagedProcess] = [backend]
    try:
        wait_until(backend, lambda: "listening on" in backend.log_tail(), 30.0, "listening")
        port = backend.log_tail().split("listening on", 1)[1].split()[0].rsplit(":", 1)[-1]
        backend_url = f"http://127.0.0.1:{port}/v1"
        backends = write_backends(
            ROOT / "deploy" / "backends.yaml", log_dir / "backends.yaml",
            {"local-small": backend_url, "local-large": backend_url},
        )
        router = start_router(INDEX_DIR, log_dir, encoder=ENCODER_DIR)
        started.append(router)
        urls = []
        for name, on in (("ledger", True), ("plain", False)):
            sub = log_dir / name
            sub.mkdir()
            config = _config(sub / "config.yaml", tokens, on)
            service = start_dispatcher(router.address, backends, sub, http_port=0,
                                       extra_args=("--config", str(config)))
            started.append(service)
            urls.append(f"http://127.0.0.1:{service.http_port}/v1")
        door = asyncio.run(measure_door(urls[0], urls[1], args.n))
    finally:
        for proc in reversed(started):
            proc.stop()
    with running_redis() as redis:
        ledger = asyncio.run(measure_ledger(args.n * 10, redis.url))
    text = report(door, ledger, args.n, where)
    print(text)
    if not args.no_write:
        write_section("cache", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
