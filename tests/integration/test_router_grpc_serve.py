"""Running the router as operators do: `semroute serve router` (health, metrics endpoint,
JSON logs, SIGTERM) and the graceful drain of in-flight calls."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from semroute._proto.semroute.v1 import router_pb2 as pb
from semroute._proto.semroute.v1 import router_pb2_grpc as pb_grpc
from semroute.grpc.server import serve_until_signalled
from semroute.testing.devstack import die_with_parent
from tests.integration.router_grpc_support import health_status, running_router, small_index

__all__ = ["small_index"]

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_serve_router_command_health_metrics_logs_and_sigterm(
    small_index: Path, tmp_path: Path
) -> None:
    """`semroute serve router` becomes SERVING, routes, exports Prometheus metrics, logs JSON
    lines with a request id and no query text, and exits 0 on SIGTERM."""
    port, metrics_port = _free_port(), _free_port()
    log_file = tmp_path / "router.log"
    semroute = Path(sys.executable).parent / "semroute"
    env = {**os.environ, "SEMROUTE_ROUTER_SERVER__WATCH_INTERVAL_S": "0"}
    with log_file.open("w") as log:
        proc = subprocess.Popen(
            [str(semroute), "serve", "router", "--index", str(small_index), "--port", str(port),
             "--metrics-port", str(metrics_port), "--host", "127.0.0.1"],
            stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=die_with_parent(),
        )
    try:
        addr = f"127.0.0.1:{port}"
        async with grpc.aio.insecure_channel(addr) as ch:
            for _ in range(600):
                assert proc.poll() is None, log_file.read_text()
                try:
                    if await health_status(ch) == "SERVING":
                        break
                except grpc.aio.AioRpcError:
                    pass
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("router never became SERVING:\n" + log_file.read_text())
            stub = pb_grpc.RouterStub(ch)
            secret = "Hi there, this is my secret question"
            reply = await stub.Route(pb.RouteRequest(query=secret), timeout=10,
                                     metadata=(("x-request-id", "cli-test-1"),))
            assert reply.route
        async with httpx.AsyncClient() as http:
            text = (await http.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10)).text
        assert 'semroute_router_requests_total{code="OK",method="Route"} 1.0' in text
        assert f'semroute_router_decisions_total{{route="{reply.route}",target="{reply.target}"}}' \
            in text
        assert f'semroute_router_index_version_info{{version="{reply.index_version}"}} 1.0' in text
        assert "semroute_router_encode_seconds_bucket" in text
        assert "semroute_router_embedding_cache_hit_ratio" in text
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines = [json.loads(line) for line in log_file.read_text().splitlines() if line.startswith("{")]
    events = {e["event"] for e in lines}
    assert {"index loaded", "rpc", "shutting down", "stopped"} <= events
    # One line per call: the access line carries the decision (and no query text).
    (routed,) = [e for e in lines if e["event"] == "rpc" and e["method"] == "Route"]
    assert routed["request_id"] == "cli-test-1" and routed["code"] == "OK"
    assert routed["route"] == reply.route and routed["target"] == reply.target
    assert routed["query_len"] == len(secret) and "query_sha256" in routed
    assert secret not in log_file.read_text()


async def test_serve_router_fails_clearly_without_an_index(tmp_path: Path) -> None:
    """Pointing the server at a directory with no index exits non-zero and says what to do."""
    semroute = Path(sys.executable).parent / "semroute"
    proc = await asyncio.create_subprocess_exec(
        str(semroute), "serve", "router", "--index", str(tmp_path / "none"), "--port", "0",
        "--metrics-port", "0", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        preexec_fn=die_with_parent(),
    )
    _, stderr = await asyncio.wait_for(proc.communicate(), timeout=120)
    assert proc.returncode == 2
    assert "semroute: error:" in stderr.decode() and str(tmp_path / "none") in stderr.decode()


async def test_graceful_stop_drains_in_flight_calls(small_index: Path) -> None:
    """On stop, health turns NOT_SERVING and new calls are refused, but calls already inside
    the server finish with their answers."""
    async with running_router(small_index) as r:
        async with grpc.aio.insecure_channel(r.addr) as ch:
            stub = pb_grpc.RouterStub(ch)
            # Hold every batch slot so the calls stay queued inside the server (white box: the
            # coalescer's semaphore), then stop while they wait.
            slots = r.handle.coalescer._slots
            workers = r.handle.settings.router_server.workers
            for _ in range(workers):
                await slots.acquire()
            calls = [stub.Route(pb.RouteRequest(query=f"Hi there, friend {i}"), timeout=30)
                     for i in range(12)]
            waiting = [asyncio.ensure_future(c) for c in calls]
            for _ in range(300):
                if r.handle.coalescer.queued == len(calls):
                    break
                await asyncio.sleep(0.01)
            assert r.handle.coalescer.queued == len(calls)
            watch = health_pb2_grpc.HealthStub(ch).Watch(
                health_pb2.HealthCheckRequest(service="semroute.v1.Router")
            )
            first = await watch.read()
            assert first.status == health_pb2.HealthCheckResponse.SERVING
            stop = asyncio.Event()
            stopping = asyncio.create_task(serve_until_signalled(
                r.server, grace_s=20, health_servicer=r.handle.health, stop=stop, signals=()
            ))
            stop.set()
            update = await asyncio.wait_for(watch.read(), 10)
            assert update.status == health_pb2.HealthCheckResponse.NOT_SERVING
            watch.cancel()
            for _ in range(workers):
                slots.release()
            replies = await asyncio.gather(*waiting)
            assert [x.route for x in replies] == ["chitchat"] * len(calls)
            await stopping
        async with grpc.aio.insecure_channel(r.addr) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await pb_grpc.RouterStub(ch).Route(pb.RouteRequest(query="late"), timeout=2)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_semroute_route_cli_against_the_server(small_index: Path) -> None:
    """`semroute route --server ADDR --token T --json --explain TEXT` prints the server's
    decision (same route and index version as the in-process router)."""
    from semroute.auth import TokenSet

    tokens = TokenSet.of(user=["cli-token"])
    async with running_router(small_index, tokens=tokens) as r:
        semroute = Path(sys.executable).parent / "semroute"
        proc = await asyncio.create_subprocess_exec(
            str(semroute), "route", "--server", r.addr, "--token", "cli-token", "--json",
            "--explain", "Solve for x: 4x - 2 = 10",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            preexec_fn=die_with_parent(),
        )
        stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout=120)
        assert proc.returncode == 0, stderr.decode()
        version = r.handle.current().info.version
        denied = await asyncio.create_subprocess_exec(
            str(semroute), "route", "--server", r.addr, "--json", "hello",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            preexec_fn=die_with_parent(),
        )
        _, denied_err = await asyncio.wait_for(denied.communicate(), timeout=120)
    decision = json.loads(stdout.decode().splitlines()[0])
    assert decision["route"] == "math" and decision["index_version"] == version
    assert decision["neighbors"]
    assert denied.returncode != 0 and "bearer token" in denied_err.decode()
