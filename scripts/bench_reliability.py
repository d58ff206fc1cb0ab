"""Reliability suite: writes its sections of docs/RELIABILITY.md (a few minutes; not `make test`).

    .venv/bin/python scripts/bench_reliability.py              # everything, writes the doc
    .venv/bin/python scripts/bench_reliability.py --soak-seconds 20 --no-write   # quicker look

Sections (each between ``<!-- bench:reliability-NAME -->`` markers, so other sections of the file,
such as Portability, are kept):

- fault matrix: every fault-server mode x before/after the first token x gRPC and HTTP door:
  outcome, failover used, duplicated text, hung requests;
- soak: Route calls at a target rate against a router process whose index ``current`` moves
  every 5 s (one version is corrupt): failed calls, versions seen;
- router down: chats while the router process is gone (static fallback), and how long routing
  takes to resume once it is back;
- bad input: every kind tried on both doors and whether it was answered as it should;
- issue 18: each hostile-test case and its outcome now.

Everything runs on loopback: fault servers stand in for the LLMs, the router is
`semroute serve router` on the starter index (a copy, so its versions can be moved).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import benchlib
import grpc
import httpx

from semroute.config import load_settings
from semroute.dispatch.backend_config import BackendConfig, Timeouts
from semroute.dispatch.breaker import CircuitBreaker
from semroute.dispatch.dispatcher import Dispatcher
from semroute.dispatch.pool import BackendPool
from semroute.dispatch.router_guard import GuardedRouter
from semroute.errors import SemrouteError
from semroute.grpc.dispatcher_client import DispatcherClient
from semroute.grpc.dispatcher_service import create_dispatcher_server
from semroute.grpc.router_client import RouterClient
from semroute.http.app import start_http_door
from semroute.index import switch_current
from semroute.testing.faultserver import FaultServer, FaultSpec
from semroute.types import ChatRequest, Decision, DecisionEvent, DeltaEvent, DoneEvent, Message

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "RELIABILITY.md"
HEADER = (
    "# Reliability\n\n"
    "What semroute does when things go wrong, measured. Sections between\n"
    "`<!-- bench:reliability-* -->` markers are written by `scripts/bench_reliability.py` (rerun\n"
    "it to refresh them); other sections are written by their own scripts.\n"
)
STARTER_INDEX = ROOT / "index_data" / "build" / "default"
CHUNKS = tuple(f"t{i} " for i in range(8))
FULL = "".join(CHUNKS)
HANG_GUARD_S = 15.0
TIMEOUTS = Timeouts(connect=0.5, first_token=0.6, idle=0.6, total=5.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write(name: str, body: str, enabled: bool) -> None:
    if enabled:
        benchlib.write_section(f"reliability-{name}", body, doc=DOC, header=HEADER)


def md_table(header: list[str], rows: list[list[str]]) -> str:
    return "\n".join(
        ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        + ["| " + " | ".join(r) + " |" for r in rows]
    )


# ---- fault matrix ---------------------------------------------------------------------------


class _ChainRouter:
    """Routes everything to ``chain`` (default: primary, then backup)."""

    def __init__(self, chain: tuple[str, ...] = ("primary", "backup")) -> None:
        self.chain = chain

    async def route(self, text: str, **kw: Any) -> Decision:
        return Decision("general", self.chain[0], 0.9, False, "fixed", {}, self.chain)


@dataclass
class Cell:
    mode: str
    when: str  # "before" / "after" the first token
    spec: FaultSpec


def matrix_cells() -> list[Cell]:
    cells = [Cell("normal", "-", FaultSpec(chunks=CHUNKS))]
    for mode in ("refuse", "500", "429", "400", "hang", "drop", "malformed"):
        cells.append(Cell(mode, "before", FaultSpec(mode, chunks=CHUNKS, after=0)))
    cells.append(Cell("slow (0.3 s < first_token)", "before",
                      FaultSpec("slow", chunks=CHUNKS, delay_s=0.3)))
    cells.append(Cell("slow (2 s > first_token)", "before",
                      FaultSpec("slow", chunks=CHUNKS, delay_s=2.0)))
    for mode in ("drop", "malformed", "hang"):
        cells.append(Cell(mode, "after", FaultSpec(mode, chunks=CHUNKS, after=3)))
    return cells


async def _grpc_chat(addr: str) -> tuple[str, str, str]:
    """(outcome, answering target, text) of one gRPC chat."""
    text: list[str] = []
    target = ""
    async with DispatcherClient(addr, timeout=HANG_GUARD_S) as client:
        try:
            async for event in client.chat(ChatRequest((Message("user", "hello"),))):
                if isinstance(event, DeltaEvent):
                    text.append(event.text)
                elif isinstance(event, DoneEvent):
                    target = event.target
        except SemrouteError as exc:
            code = getattr(exc, "grpc_code", None)
            return (code.name if code is not None else type(exc).__name__), target, "".join(text)
    return "OK", target, "".join(text)


async def _http_chat(base: str) -> tuple[str, str, str]:
    """(outcome, answering target, text) of one streamed HTTP chat."""
    text: list[str] = []
    target = ""
    outcome = "200"
    async with httpx.AsyncClient(timeout=HANG_GUARD_S) as http, http.stream(
        "POST", f"{base}/chat/completions",
        json={"model": "auto", "stream": True, "messages": [{"role": "user", "content": "hi"}]},
    ) as response:
        if response.status_code != 200:
            await response.aread()
            return str(response.status_code), "", ""
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                outcome = "200 + SSE error event"
                continue
            for choice in event.get("choices", []):
                text.append(choice.get("delta", {}).get("content") or "")
            if "semroute" in event:
                target = event["semroute"]["target"]
    return outcome, target, "".join(text)


async def fault_matrix() -> tuple[str, dict[str, int]]:
    primary = FaultServer(FaultSpec(chunks=CHUNKS), model="primary").start()
    backup = FaultServer(FaultSpec(chunks=CHUNKS), model="backup").start()
    configs = {
        "primary": BackendConfig("primary", primary.base_url, "primary", timeouts=TIMEOUTS,
                                 local=True),
        "backup": BackendConfig("backup", backup.base_url, "backup", timeouts=TIMEOUTS,
                                local=True),
    }
    settings = load_settings(None, dispatcher__port=0, dispatcher__retries=1,
                             dispatcher__backoff_s=0.01, dispatcher__breaker_failures=1000,
                             dispatcher__max_retry_after_s=0.5)
    disp = Dispatcher(_ChainRouter(), BackendPool(configs), settings.dispatcher)
    server, port = await create_dispatcher_server(settings, disp)
    await server.start()
    door = await start_http_door(disp, settings, 0, "127.0.0.1")
    rows: list[list[str]] = []
    totals = Counter[str]()

    async def fresh_pool() -> None:
        # New connections and breakers per run: "refuse" must meet a new connection, and one
        # cell's failures must not open the breaker for the next.
        await disp.backends.aclose()
        disp.backends = BackendPool(configs, breaker_failures=1000)
    try:
        for cell in matrix_cells():
            for door_name, call in (("gRPC", lambda: _grpc_chat(f"127.0.0.1:{port}")),
                                    ("HTTP", lambda: _http_chat(door.base_url))):
                primary.set_default(cell.spec)
                primary.clear()
                backup.clear()
                await fresh_pool()
                t0 = time.monotonic()
                try:
                    outcome, target, text = await asyncio.wait_for(call(), HANG_GUARD_S + 5)
                    hung = False
                except TimeoutError:
                    outcome, target, text, hung = "HUNG", "", "", True
                seconds = time.monotonic() - t0
                failover = bool(backup.chat_requests())
                # Duplicated: any chunk of the answer appears more than once in what we got.
                dup = any(text.count(c) > 1 for c in CHUNKS)
                totals["runs"] += 1
                totals["hung"] += hung
                totals["duplicated"] += dup
                totals["failover"] += failover
                rows.append([cell.mode, cell.when, door_name, outcome, target or "-",
                             "yes" if failover else "no", "yes" if dup else "no",
                             "yes" if hung else "no", f"{seconds:.2f}"])
    finally:
        await door.stop(1)
        await server.stop(0)
        await disp.aclose()
        primary.stop()
        backup.stop()
    table = md_table(["fault", "when", "door", "outcome", "answered by", "failover",
                      "duplicated text", "hung", "s"], rows)
    body = f"""## Fault matrix

Each fault-server mode on the first target of a two-target chain (`primary`, then `backup`,
both healthy otherwise), before and after the first token (the commit point), through each
door. Timeouts: connect 0.5 s, first token 0.6 s, idle 0.6 s; one retry on the same target;
Retry-After over 0.5 s moves on. "after" faults send 3 chunks first. Outcome: the gRPC status or
the HTTP status (a stream cut after its first token ends with an SSE error event).

{table}

Totals: {totals['runs']} runs, {totals['failover']} used the failover, **{totals['duplicated']}
with duplicated text, {totals['hung']} hung**. Before the first token every fault either
succeeds on the backup (failover) or, for a 400 (the request itself refused), is the client's
400 with no failover; after it, the stream ends with ABORTED / an SSE error event and nothing is
retried.
"""
    return body, dict(totals)


# ---- router process, index versions ---------------------------------------------------------


def _copy_version(src: Path, root: Path, name: str) -> Path:
    dst = root / "versions" / name
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["version"] = name
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def _corrupt(version: Path) -> None:
    """Garbage FAISS data whose checksum matches (the case that once killed the watcher)."""
    (version / "index.faiss").write_bytes(b"garbage" * 100)
    manifest = json.loads((version / "manifest.json").read_text())
    manifest["checksums"]["index.faiss"] = hashlib.sha256(b"garbage" * 100).hexdigest()
    (version / "manifest.json").write_text(json.dumps(manifest))


def start_router(index_root: Path, port: int, log: Path, watch_s: float = 0.5
                 ) -> subprocess.Popen[bytes]:
    env = {**os.environ, "SEMROUTE_ROUTER_SERVER__WATCH_INTERVAL_S": str(watch_s)}
    semroute = Path(sys.executable).parent / "semroute"
    with log.open("ab") as out:
        return subprocess.Popen(
            [str(semroute), "serve", "router", "--index", str(index_root), "--host", "127.0.0.1",
             "--port", str(port), "--metrics-port", "0"],
            stdout=out, stderr=subprocess.STDOUT, env=env,
        )


async def wait_routable(addr: str, proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    async with RouterClient(addr, timeout=2) as client:
        while time.monotonic() < end:
            if proc.poll() is not None:
                raise SystemExit(f"router exited with {proc.returncode}")
            try:
                await client.route("hello")
                return
            except SemrouteError:
                await asyncio.sleep(0.2)
    raise SystemExit("router never answered")


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---- soak -----------------------------------------------------------------------------------


QUERIES = ["Hi there!", "What is 17 times 23?", "Write a haiku about rain",
           "Summarise this article about interest rates", "Fix this Python traceback",
           "Translate good morning into French", "Explain how vaccines work"]


async def soak(work: Path, seconds: float, rate: float) -> tuple[str, dict[str, Any]]:
    root = work / "soak-index"
    src = (STARTER_INDEX / "current").resolve()
    versions = [_copy_version(src, root, f"soak-v{i}") for i in range(1, 14)]
    corrupt_at = 4
    _corrupt(versions[corrupt_at])
    switch_current(root, versions[0])
    port = free_port()
    proc = start_router(root, port, work / "soak-router.log")
    addr = f"127.0.0.1:{port}"
    seen: Counter[str] = Counter()
    failures: Counter[str] = Counter()
    latencies: list[float] = []
    try:
        await wait_routable(addr, proc)
        stop = asyncio.Event()
        interval = 1.0 / rate
        clients = 16
        start = time.monotonic()

        async def worker(w: int) -> None:
            async with RouterClient(addr, timeout=5) as client:
                i = 0
                next_at = start + w * interval
                while not stop.is_set():
                    delay = next_at - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    next_at += interval * clients
                    t0 = time.perf_counter()
                    try:
                        d = await client.route(f"{QUERIES[(w + i) % len(QUERIES)]} {w}.{i}")
                        seen[d.index_version] += 1
                        latencies.append((time.perf_counter() - t0) * 1000)
                    except SemrouteError as exc:
                        failures[type(exc).__name__] += 1
                    i += 1

        async def mover() -> None:
            k = 1
            while not stop.is_set() and k < len(versions):
                await asyncio.sleep(5.0)
                switch_current(root, versions[k])
                k += 1

        tasks = [asyncio.create_task(worker(w)) for w in range(clients)]
        moving = asyncio.create_task(mover())
        await asyncio.sleep(seconds)
        stop.set()
        moving.cancel()
        await asyncio.gather(*tasks)
        elapsed = time.monotonic() - start
    finally:
        stop_process(proc)
    calls = sum(seen.values()) + sum(failures.values())
    achieved = calls / elapsed
    refused = versions[corrupt_at].name
    moved = [v.name for v in versions[: int((seconds - 0.5) // 5) + 1]]
    result = {
        "calls": calls, "rate": achieved, "failed": sum(failures.values()),
        "failures": dict(failures), "versions_seen": dict(seen),
        "corrupt_served": seen.get(refused, 0),
        "p50_ms": statistics.median(latencies) if latencies else float("nan"),
        "p99_ms": sorted(latencies)[int(len(latencies) * 0.99)] if latencies else float("nan"),
    }
    version_rows = [[v, str(seen.get(v, 0)) + (" (corrupt: refused)" if v == refused else "")]
                    for v in moved]
    reached = "reached" if achieved >= rate * 0.95 else (
        f"**not reached on this 2-core machine (the client and the server share the cores): "
        f"{achieved:.0f}/s**"
    )
    body = f"""## Soak: Route calls while the index moves

`semroute serve router` (own process, defaults, watch every 0.5 s) on a copy of the starter
index; {clients} clients paced to {rate:.0f} calls/s in total for {seconds:.0f} s; every 5 s
`current` moves to the next version (copies with their own version names); version
`{refused}` has garbage FAISS data behind a matching checksum.

- calls: {calls:,} in {elapsed:.1f} s = **{achieved:.0f} calls/s** (target {rate:.0f}/s:
  {reached});
- **failed calls: {result['failed']}** {dict(failures) or ''};
- latency at the client: p50 {result['p50_ms']:.1f} ms, p99 {result['p99_ms']:.1f} ms;
- the corrupt version answered {result['corrupt_served']} calls (refused; the previous one kept
  serving, and the watch went on to the next good version).

Calls per index version (each call reports the version that answered it):

{md_table(["version", "calls"], version_rows)}
"""
    return body, result


# ---- router down ----------------------------------------------------------------------------


async def router_down(work: Path) -> tuple[str, dict[str, Any]]:
    root = work / "down-index"
    switch_current(root, _copy_version((STARTER_INDEX / "current").resolve(), root, "down-v1"))
    port = free_port()
    log = work / "down-router.log"
    proc = start_router(root, port, log, watch_s=0)
    local = FaultServer(FaultSpec(chunks=CHUNKS), model="local-small").start()
    cloud = FaultServer(FaultSpec(chunks=CHUNKS), model="gpt-4o-mini").start()
    configs = {
        "local-small": BackendConfig("local-small", local.base_url, "m", timeouts=TIMEOUTS,
                                     local=True),
        "local-large": BackendConfig("local-large", local.base_url, "m", timeouts=TIMEOUTS,
                                     local=True),
        "gpt-4o-mini": BackendConfig("gpt-4o-mini", cloud.base_url, "m", timeouts=TIMEOUTS),
        "gpt-4o": BackendConfig("gpt-4o", cloud.base_url, "m", timeouts=TIMEOUTS),
    }
    ds = load_settings(None).dispatcher
    client = RouterClient(f"127.0.0.1:{port}", timeout=ds.router_timeout_s)
    guard = GuardedRouter(client, breaker=CircuitBreaker(ds.router_breaker_failures,
                                                        ds.router_breaker_cooldown_s),
                          retry_backoff_s=ds.router_retry_backoff_s)
    disp = Dispatcher(guard, BackendPool(configs), ds, owns_router=True)

    async def chat() -> tuple[DecisionEvent, str, float]:
        t0 = time.perf_counter()
        decision: DecisionEvent | None = None
        text = []
        async for event in disp.chat(ChatRequest((Message("user", "Write a poem about rain"),))):
            if isinstance(event, DecisionEvent):
                decision = event
            elif isinstance(event, DeltaEvent):
                text.append(event.text)
        assert decision is not None
        return decision, "".join(text), time.perf_counter() - t0

    out: dict[str, Any] = {}
    try:
        await wait_routable(f"127.0.0.1:{port}", proc)
        d, _, s = await chat()
        out["up"] = (d.fallback, d.route, s)
        stop_process(proc)
        down = [await chat() for _ in range(20)]
        out["down_answered"] = sum(1 for _, t, _ in down if t == FULL)
        out["down_fallback"] = sum(1 for d, _, _ in down if d.fallback)
        out["down_first_s"] = down[0][2]
        out["down_median_s"] = statistics.median(s for _, _, s in down[1:])
        out["down_chain"] = list(down[0][0].chain)
        out["down_reason"] = down[0][0].reason
        proc = start_router(root, port, log, watch_s=0)
        t_restart = time.monotonic()
        await wait_routable(f"127.0.0.1:{port}", proc)
        t_up = time.monotonic()
        while True:
            d, _, _ = await chat()
            if not d.fallback or time.monotonic() - t_up > 30:
                break
            await asyncio.sleep(0.1)
        out["resumed"] = not d.fallback
        out["resume_after_up_s"] = time.monotonic() - t_up
        out["restart_to_up_s"] = t_up - t_restart
    finally:
        stop_process(proc)
        await disp.aclose()
        local.stop()
        cloud.stop()
    body = f"""## Router down

A dispatcher (defaults: router deadline {ds.router_timeout_s:g} s, one retry after
{ds.router_retry_backoff_s:g} s for a call that could not connect, router breaker open after
{ds.router_breaker_failures} unreachable calls for {ds.router_breaker_cooldown_s:g} s) in front
of `semroute serve router`; the router process is stopped (SIGTERM), 20 chats are sent, then it
is started again.

- with the router up: fallback={out['up'][0]}, route `{out['up'][1]}`;
- router gone: **{out['down_answered']}/20 chats answered**, {out['down_fallback']}/20 flagged
  `fallback=true`, reason "{out['down_reason']}", chain {out['down_chain']} (every local backend
  first, then the others; `dispatcher.fallback_targets` sets it);
- cost of the outage per chat: first chat {out['down_first_s'] * 1000:.0f} ms (connect refused,
  one retry), then median {out['down_median_s'] * 1000:.0f} ms (the breaker skips the router);
- router back: routing resumed by itself: **{out['resumed']}**, {out['resume_after_up_s']:.1f} s
  after the router answered again (the breaker's cooldown, then one probe), no restart.
"""
    return body, out


# ---- bad input ------------------------------------------------------------------------------


async def bad_input(work: Path) -> tuple[str, dict[str, int]]:
    root = work / "bad-index"
    switch_current(root, _copy_version((STARTER_INDEX / "current").resolve(), root, "bad-v1"))
    port = free_port()
    proc = start_router(root, port, work / "bad-router.log", watch_s=0)
    backend = FaultServer(FaultSpec(chunks=CHUNKS), model="m").start()
    configs = {"local-small": BackendConfig("local-small", backend.base_url, "m",
                                            timeouts=TIMEOUTS, local=True, context_tokens=2048)}
    settings = load_settings(None, dispatcher__port=0, limits__max_body_bytes=1024 * 1024)
    disp = Dispatcher(_ChainRouter(("local-small",)), BackendPool(configs), settings.dispatcher)
    server, dport = await create_dispatcher_server(settings, disp)
    await server.start()
    door = await start_http_door(disp, settings, 0, "127.0.0.1")
    rows: list[list[str]] = []
    good = 0

    def record(kind: str, where: str, expected: str, got: str, ok: bool) -> None:
        nonlocal good
        good += ok
        rows.append([kind, where, expected, got, "yes" if ok else "**no**"])

    def body_of(content: str) -> bytes:
        return ('{"model":"auto","messages":[{"role":"user","content":' + content + "}]}").encode()

    http_cases: list[tuple[str, bytes, dict[str, str], int]] = [
        ("lone surrogate in content", body_of('"a\\ud800b"'), {}, 400),
        ("NUL in content", body_of('"a\\u0000b"'), {}, 400),
        ("100k-deep JSON nesting", b"[" * 100_000 + b"]" * 100_000, {}, 400),
        ("5,000-digit integer", b'{"model":"auto","max_tokens":' + b"9" * 5000 + b"}", {}, 400),
        ("max_tokens 10^12", b'{"model":"auto","max_tokens":1000000000000,"messages":'
         b'[{"role":"user","content":"x"}]}', {}, 400),
        ("max_tokens over the backend context", b'{"model":"local-small","max_tokens":4096,'
         b'"messages":[{"role":"user","content":"x"}]}', {}, 400),
        ("temperature 5", b'{"model":"auto","temperature":5,"messages":'
         b'[{"role":"user","content":"x"}]}', {}, 400),
        ("top_p 0", b'{"model":"auto","top_p":0,"messages":[{"role":"user","content":"x"}]}',
         {}, 400),
        ("n 2", b'{"model":"auto","n":2,"messages":[{"role":"user","content":"x"}]}', {}, 400),
        ("max_cost Infinity", b'{"model":"auto","semroute":{"max_cost":Infinity},"messages":'
         b'[{"role":"user","content":"x"}]}', {}, 400),
        ("unknown role", b'{"model":"auto","messages":[{"role":"tool","content":"x"}]}', {}, 400),
        ("no messages", b'{"model":"auto","messages":[]}', {}, 400),
        ("not an object", b"[1,2]", {}, 400),
        ("invalid JSON", b"{nope", {}, 400),
        ("not UTF-8", b"\xff\xfe", {}, 400),
        ("1 MB model name", b'{"model":"' + b"m" * 1_000_000 + b'","messages":[]}', {}, 404),
        ("text/plain body", body_of('"x"'), {"content-type": "text/plain"}, 415),
        ("Content-Length 300 MB", b"", {"content-length": "300000000"}, 413),
        ("tools", b'{"model":"auto","tools":[{"x":1}],"messages":'
         b'[{"role":"user","content":"x"}]}', {}, 400),
    ]
    try:
        await wait_routable(f"127.0.0.1:{port}", proc)
        async with httpx.AsyncClient(base_url=door.base_url, timeout=30) as http:
            for kind, raw, headers, expected in http_cases:
                hdrs = {"content-type": "application/json", **headers}
                if "content-length" in headers:
                    reply = await _raw_post(door.host, door.port, hdrs)
                    status = int(reply.split(b" ", 2)[1]) if reply else 0
                    size = len(reply)
                else:
                    r = await http.post("/chat/completions", content=raw, headers=hdrs)
                    status, size = r.status_code, len(r.content)
                ok = status == expected and size < 4096
                record(kind, "HTTP", str(expected), f"{status} ({size} B)", ok)
        await _grpc_bad_inputs(f"127.0.0.1:{port}", f"127.0.0.1:{dport}", root, record)
    finally:
        stop_process(proc)
        await door.stop(1)
        await server.stop(0)
        await disp.aclose()
        backend.stop()
    table = md_table(["input", "door", "expected", "answer", "correct"], rows)
    body = f"""## Bad input

Each kind of bad input, on the door that takes it. "Correct": the expected status, with an
error naming the field, in a reply under 4 KB (echoed values are cut). Never a 5xx, INTERNAL or
UNKNOWN. The property-based tests (tests/integration/test_property_inputs.py, hypothesis) throw
arbitrary JSON, bytes and strings at the door's parser and the door, and arbitrary protobuf
field values at both servicers, on every `make test`.

{table}

**{good}/{len(rows)} answered correctly.**
"""
    return body, {"kinds": len(rows), "correct": good}


async def _raw_post(host: str, port: int, headers: dict[str, str]) -> bytes:
    reader, writer = await asyncio.open_connection(host, port)
    head = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + "".join(
        f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    writer.write(head.encode())
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(4096), 10)
    finally:
        writer.close()


async def _grpc_bad_inputs(
    router: str, dispatcher: str, root: Path, record: Callable[[str, str, str, str, bool], None]
) -> None:
    from semroute._proto.semroute.v1 import dispatcher_pb2 as dpb
    from semroute._proto.semroute.v1 import dispatcher_pb2_grpc as dpb_grpc
    from semroute._proto.semroute.v1 import router_pb2 as pb
    from semroute._proto.semroute.v1 import router_pb2_grpc as pb_grpc

    def chat(**fields: Any) -> dpb.ChatRequest:
        msgs = fields.pop("messages", [dpb.ChatMessage(role="user", content="hi")])
        return dpb.ChatRequest(messages=msgs, **fields)

    async def status(call: Any) -> tuple[str, int]:
        try:
            if hasattr(call, "__aiter__"):  # a server-streaming call
                async for _ in call:
                    pass
            else:
                await call
        except grpc.aio.AioRpcError as exc:
            return exc.code().name, len(exc.details() or "")
        return "OK", 0

    async with grpc.aio.insecure_channel(router) as rch, \
            grpc.aio.insecure_channel(dispatcher) as dch:
        rstub = pb_grpc.RouterStub(rch)
        dstub = dpb_grpc.DispatcherStub(dch)
        raw_route = rch.unary_unary("/semroute.v1.Router/Route")
        raw_chat = dch.unary_stream("/semroute.v1.Dispatcher/Chat")
        cases: list[tuple[str, str, str, Callable[[], Any]]] = [
            ("malformed protobuf (truncated)", "Router", "INVALID_ARGUMENT",
             lambda: raw_route(b"\x0a\x05ab", timeout=10)),
            ("invalid UTF-8 in a string field", "Router", "INVALID_ARGUMENT",
             lambda: raw_route(b"\x0a\x02\xff\xfe", timeout=10)),
            ("blank query", "Router", "INVALID_ARGUMENT",
             lambda: rstub.Route(pb.RouteRequest(query="  "), timeout=10)),
            ("policy.max_cost inf", "Router", "INVALID_ARGUMENT",
             lambda: rstub.Route(pb.RouteRequest(query="hi", policy=pb.Policy(
                 max_cost=float("inf"))), timeout=10)),
            ("1 MB target name", "Router", "INVALID_ARGUMENT",
             lambda: rstub.Route(pb.RouteRequest(query="hi", policy=pb.Policy(
                 allowed_targets=["t" * 1_000_000])), timeout=10)),
            ("reload path component > 255", "Router", "INVALID_ARGUMENT",
             lambda: rstub.ReloadIndex(pb.ReloadIndexRequest(path="x" * 300), timeout=10)),
            ("reload path outside the root", "Router", "INVALID_ARGUMENT",
             lambda: rstub.ReloadIndex(pb.ReloadIndexRequest(path="/etc"), timeout=10)),
            ("malformed protobuf", "Dispatcher", "INVALID_ARGUMENT",
             lambda: raw_chat(b"\x0a\x05ab", timeout=10)),
            ("NUL in content", "Dispatcher", "INVALID_ARGUMENT",
             lambda: dstub.Chat(chat(messages=[dpb.ChatMessage(role="user", content="a\x00")]),
                                timeout=10)),
            ("max_tokens 2^31-1", "Dispatcher", "INVALID_ARGUMENT",
             lambda: dstub.Chat(chat(params=dpb.GenerationParams(max_tokens=2**31 - 1)),
                                timeout=10)),
            ("temperature NaN", "Dispatcher", "INVALID_ARGUMENT",
             lambda: dstub.Chat(chat(params=dpb.GenerationParams(temperature=float("nan"))),
                                timeout=10)),
            ("overrides.max_cost inf", "Dispatcher", "INVALID_ARGUMENT",
             lambda: dstub.Chat(chat(overrides=dpb.RoutingOverrides(max_cost=float("inf"))),
                                timeout=10)),
            ("1 MB force_target", "Dispatcher", "INVALID_ARGUMENT",
             lambda: dstub.Chat(chat(overrides=dpb.RoutingOverrides(force_target="t" * 1_000_000)),
                                timeout=10)),
            ("100 KB x-request-id (replaced, served)", "Dispatcher", "OK",
             lambda: dstub.Chat(chat(), metadata=(("x-request-id", "r" * 100_000),),
                                timeout=10)),
            ("non-ASCII request_id field (replaced, served)", "Dispatcher", "OK",
             lambda: dstub.Chat(chat(request_id="é-trace"), timeout=10)),
        ]
        for kind, where, expected, make in cases:
            code, size = await status(make())
            record(kind, f"gRPC {where}", expected, f"{code} ({size} chars)",
                   code == expected and size < 4096)


# ---- issue 18 -------------------------------------------------------------------------------


ISSUE18 = [
    ("1", "client x-request-id broke every chat to llama.cpp (400 -> 502)",
     "backends get a UUID derived from our id; bad ids replaced, never fatal",
     "test_dispatcher_hardening.py::test_client_request_id_never_breaks_a_strict_backend, "
     "::test_huge_request_id_metadata_is_replaced_not_fatal"),
    ("2", "prompts over the context opened the breaker for everyone",
     "backend 400/413/422 -> the client's 400 naming the limit, no failover, breaker untouched; "
     "`context_tokens` checks before the call",
     "test_dispatcher_hardening.py::test_context_overflow_is_a_400_not_a_breaker_trip_nor_a_"
     "failover, ::test_known_context_is_checked_before_the_call"),
    ("3", "index watcher died silently on broken-content versions",
     "every reload failure caught, logged, counted, reported ok=false; the watch goes on",
     "test_router_hardening.py::test_watch_survives_broken_content_... (4 kinds)"),
    ("4", "HTTP body read whole before its limit",
     "Content-Length over the limit: 413 before reading; chunked bodies counted, 413 at the limit",
     "test_http_door_hardening.py::test_content_length_..., ::test_chunked_body_..."),
    ("5", "big RouteBatch starved single Route calls (9.8 s)",
     "batches cut into token-bounded slices in a lane one worker short",
     "test_router_hardening.py::test_single_route_is_not_starved_by_two_big_batches; "
     "figures: BENCHMARKS.md `bench:grpc-starvation`"),
    ("6", "SIGTERM drain gaps", "health NOT_SERVING first, both doors stop together, streams cut at "
     "grace end with ABORTED / SSE error event", "test_dispatcher_drain.py"),
    ("7", "missing router token -> 401 to users, router address leaked",
     "503 without internal details; the log names dispatcher.router_token_file",
     "test_dispatcher_hardening.py::test_router_refusing_our_token_is_a_503_..."),
    ("8", "500/UNKNOWN for lone surrogates, deep JSON, huge ints, malformed protobuf, long paths",
     "all 400 / INVALID_ARGUMENT naming the field", "test_http_door_hardening.py, "
     "test_router_hardening.py, test_property_inputs.py; bad-input table above"),
    ("9", "unbounded echo of input", "echoed values cut at 64 chars, messages at 2 KB",
     "test_http_door_hardening.py::test_echoed_values_are_bounded, "
     "test_router_hardening.py::test_huge_target_name_is_echoed_bounded"),
    ("10", "no overall cap before the first token", "dispatcher.first_token_budget_s and the "
     "client's deadline bound the whole chain", "test_dispatcher_hardening.py::test_first_token_"
     "budget_caps_the_whole_chain, ::test_client_deadline_shortens_the_budget"),
    ("11", "Retry-After ignored", "waited when within max_retry_after_s and the budget; else next "
     "target and the backend held off that long", "test_dispatcher_hardening.py::test_retry_"
     "after_*"),
    ("12", "token in ps; reload any path; max_cost inf; no 415; mid-body disconnect an error",
     "--router-token-file / env; reload paths confined to the index root; one max_cost rule; "
     "415; a disconnect logged as such", "test_router_hardening.py, test_http_door_hardening.py"),
]


async def issue18(totals: dict[str, int], measured: dict[str, str]) -> str:
    rows = [[n, what, now, measured.get(n, "-"), test] for n, what, now, test in ISSUE18]
    return f"""## Issue 18 cases

Each defect of the hostile test pass, what happens now, a figure from this run where there is
one, and the test that fails without the fix.

{md_table(["#", "defect", "now", "measured here", "test"], rows)}
"""


async def _context_overflow() -> str:
    """Ten prompts over a backend's context (it answers 400): what clients and the breaker see."""
    small = FaultServer(FaultSpec("400"), model="m").start()
    other = FaultServer(FaultSpec(chunks=CHUNKS), model="m").start()
    configs = {
        "primary": BackendConfig("primary", small.base_url, "m", timeouts=TIMEOUTS, local=True),
        "backup": BackendConfig("backup", other.base_url, "m", timeouts=TIMEOUTS, local=True),
    }
    ds = load_settings(None).dispatcher
    disp = Dispatcher(_ChainRouter(), BackendPool(configs, breaker_failures=3), ds)
    kinds: Counter[str] = Counter()
    try:
        for _ in range(10):
            try:
                async for _ in disp.chat(ChatRequest((Message("user", "long " * 100),))):
                    pass
                kinds["ok"] += 1
            except SemrouteError as exc:
                kinds[type(exc).__name__] += 1
        state = disp.backends.backends["primary"].breaker.state.value
    finally:
        await disp.aclose()
        small.stop()
        other.stop()
    return (f"10 prompts over the context: {dict(kinds)}; failovers {len(other.chat_requests())}; "
            f"breaker (opens at 3 failures) {state}")


async def _drain(work: Path) -> str:
    """serve_dispatcher with grace_s 1 and a 20 s stream in flight: exit time and what the
    client saw."""
    from semroute.serve import serve_dispatcher

    slow = FaultServer(FaultSpec(chunks=tuple(f"w{i} " for i in range(400)), chunk_delay_s=0.05),
                       model="m").start()
    backends = work / "drain-backends.yaml"
    backends.write_text(f"backends:\n  local-small:\n    base_url: {slow.base_url}\n"
                        "    model: m\n    local: true\n")
    settings = load_settings(None, dispatcher__router=f"127.0.0.1:{free_port()}",
                             dispatcher__backends_file=backends, dispatcher__port=0,
                             dispatcher__metrics_port=0, dispatcher__grace_s=1.0)
    ready: asyncio.Future[tuple[int, int, int]] = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()
    task = asyncio.create_task(serve_dispatcher(
        settings, stop=stop, on_ready=lambda *ports: ready.set_result(ports)))
    port, _, _ = await asyncio.wait_for(ready, 30)
    got: list[str] = []
    outcome = "OK"

    async def stream() -> None:
        nonlocal outcome
        async with DispatcherClient(f"127.0.0.1:{port}", timeout=60) as client:
            try:
                async for event in client.chat(ChatRequest((Message("user", "hi"),))):
                    if isinstance(event, DeltaEvent):
                        got.append(event.text)
            except SemrouteError as exc:
                code = getattr(exc, "grpc_code", None)
                outcome = code.name if code is not None else type(exc).__name__

    streaming = asyncio.create_task(stream())
    while not got:
        await asyncio.sleep(0.05)
    t0 = time.monotonic()
    stop.set()
    await asyncio.wait_for(task, 30)
    exit_s = time.monotonic() - t0
    await streaming
    slow.stop()
    return (f"grace_s 1, a 20 s stream in flight: process returned after {exit_s:.2f} s; the "
            f"client got {len(got)} chunks then {outcome}")


async def measure_issue18(work: Path) -> dict[str, str]:
    """A few of the issue-18 cases, measured end to end."""
    out: dict[str, str] = {}
    strict = FaultServer(FaultSpec(chunks=CHUNKS), model="m", strict_request_id=True).start()
    hang = FaultServer(FaultSpec("hang"), model="h").start()
    configs = {
        "strict": BackendConfig("strict", strict.base_url, "m", timeouts=TIMEOUTS, local=True),
        "hang1": BackendConfig("hang1", hang.base_url, "m", timeouts=Timeouts(1, 3, 3, 10)),
        "hang2": BackendConfig("hang2", hang.base_url, "m", timeouts=Timeouts(1, 3, 3, 10)),
    }
    settings = load_settings(None, dispatcher__first_token_budget_s=2.0)
    disp = Dispatcher(_ChainRouter(), BackendPool(configs), settings.dispatcher)
    try:
        req = ChatRequest((Message("user", "hi"),), request_id="my-trace-42")
        req = ChatRequest(req.messages, req.params,
                          req.overrides.__class__(force_target="strict"), "my-trace-42")
        text = ""
        async for event in disp.chat(req):
            if isinstance(event, DeltaEvent):
                text += event.text
        out["1"] = f"x-request-id my-trace-42 to a strict backend: {'200' if text == FULL else 'failed'}"
        t0 = time.monotonic()
        req = ChatRequest((Message("user", "hi"),), overrides=req.overrides.__class__(
            allowed_targets=("hang1", "hang2")))

        class _Hangs:
            async def route(self, text: str, **kw: Any) -> Decision:
                return Decision("g", "hang1", 1.0, False, "x", {}, ("hang1", "hang2"))

        disp.router = _Hangs()
        try:
            async for _ in disp.chat(req):
                pass
        except SemrouteError:
            pass
        out["10"] = (f"2 hanging targets, first_token 3 s each, 1 retry, budget 2 s: gave up "
                     f"after {time.monotonic() - t0:.1f} s (was 4 x 3 s)")
    finally:
        await disp.aclose()
        strict.stop()
        hang.stop()
    out["2"] = await _context_overflow()
    out["6"] = await _drain(work)
    starvation = ROOT / "out" / "bench_grpc" / "starvation.json"
    if starvation.exists():
        s = json.loads(starvation.read_text())
        out["5"] = (f"single Route p99 {s['loaded_p99_ms']:.0f} ms under 2 big-batch clients "
                    f"(alone {s['alone_p99_ms']:.0f} ms)")
    return out


# ---- main -----------------------------------------------------------------------------------


async def amain(args: argparse.Namespace) -> int:
    write_doc = not args.no_write
    only = set(args.only.split(",")) if args.only else None

    def wanted(name: str) -> bool:
        return only is None or name in only

    totals: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="semroute-reliability-") as tmp:
        work = Path(tmp)
        if wanted("faults"):
            print("fault matrix ...", flush=True)
            body, totals = await fault_matrix()
            print(body)
            write("faults", body, write_doc)
        if wanted("router-down"):
            print("router down ...", flush=True)
            body, _ = await router_down(work)
            print(body)
            write("router-down", body, write_doc)
        if wanted("bad-input"):
            print("bad input ...", flush=True)
            body, _ = await bad_input(work)
            print(body)
            write("bad-input", body, write_doc)
        if wanted("soak"):
            print(f"soak ({args.soak_seconds:.0f} s) ...", flush=True)
            body, _ = await soak(work, args.soak_seconds, args.rate)
            print(body)
            write("soak", body, write_doc)
        if wanted("issue18"):
            measured = await measure_issue18(work)
            body = await issue18(totals, measured)
            print(body)
            write("issue18", body, write_doc)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--soak-seconds", type=float, default=60.0)
    parser.add_argument("--rate", type=float, default=300.0, help="target Route calls/s")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--only", default="", help="comma-separated sections: faults, "
                        "router-down, bad-input, soak, issue18 (default: all)")
    args = parser.parse_args()
    return asyncio.run(amain(args))


if __name__ == "__main__":
    sys.exit(main())
