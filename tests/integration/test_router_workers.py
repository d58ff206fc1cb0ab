"""A multi-process router (`--processes N`): real worker processes on one loopback port, the
real encoder and index. Start, routing over several channels, one watch reloading every worker,
a ReloadIndex that reaches one worker reaching all, merged metrics, a worker restarted after a
crash, SIGTERM draining all, workers dying with their supervisor."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import grpc
import httpx
import pytest

from semroute.errors import SemrouteError
from semroute.grpc.router_client import RouterClient
from semroute.serve import serve_router
from semroute.testing.devstack import die_with_parent
from tests.conftest import ENCODER_DIR
from tests.integration.router_grpc_support import (
    ROWS_V1,
    ROWS_V2,
    build_small_index,
    health_status,
    router_settings,
    small_index,
)

__all__ = ["small_index"]

pytestmark = pytest.mark.integration

WAIT_S = 120.0  # generous: the machine is shared; no test asserts how long anything takes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _children(pid: int) -> set[int]:
    """Live child processes of ``pid`` that are router workers (other fixtures of the session,
    such as a database server, are children of the test process too)."""
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        found.update(int(c) for c in (task / "children").read_text().split())
    return {c for c in found if _is_worker(c)}


def _is_worker(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return False
    return b"run_router_worker" in cmdline


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


async def _until(check: Callable[[], object], what: str) -> None:
    """Poll ``check`` (sync or async) until it is truthy; fail naming ``what`` after WAIT_S."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while loop.time() < deadline:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _metrics(port: int) -> str:
    return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text


def _versions(text: str) -> dict[str, str]:
    """worker -> the index version its ``index_version_info`` gauge names."""
    out = {}
    for line in text.splitlines():
        if line.startswith("semroute_router_index_version_info{") and line.endswith(" 1.0"):
            labels = dict(p.split("=", 1) for p in line[line.index("{") + 1:line.index("}")]
                          .split(","))
            out[labels["worker"].strip('"')] = labels["version"].strip('"')
    return out


async def test_workers_share_a_port_reload_together_merge_metrics_and_stop(
    tmp_path: Path,
) -> None:
    """Two workers on one port, each mapping the index file: SERVING once both serve v1; calls
    over eight channels are all answered and counted once in the merged metrics; moving
    `current` to v2 reloads both (one watch); a ReloadIndex back to v1 through one channel
    reaches the other worker too; a worker killed with SIGKILL is started again and serves what
    the others serve (v1, not `current`); a pooled client (4 channels) is answered; stopping
    drains both and leaves no process."""
    root = tmp_path / "idx"
    v1 = build_small_index(root, ROWS_V1)
    metrics_port = _free_port()
    settings = router_settings(
        router_server__processes=2, router_server__port=0, router_server__host="127.0.0.1",
        router_server__watch_interval_s=0.2, router_server__metrics_port=metrics_port,
        router_server__grace_s=5,
    )
    stop = asyncio.Event()
    ready: asyncio.Future[tuple[int, int | None]] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve_router(
        settings, root, encoder_path=ENCODER_DIR, stop=stop,
        on_ready=lambda port, mport: ready.set_result((port, mport)),
    ))
    workers: set[int] = set()
    try:
        port, merged_port = await asyncio.wait_for(ready, WAIT_S)
        assert merged_port == metrics_port
        workers = _children(os.getpid())
        assert len(workers) == 2
        for pid in workers:  # the index vectors are mapped from the file, not copied
            assert f"{v1}/index.faiss" in Path(f"/proc/{pid}/maps").read_text()
        addr = f"127.0.0.1:{port}"
        async with grpc.aio.insecure_channel(addr) as channel:
            assert await health_status(channel) == "SERVING"
        clients = [RouterClient(addr, timeout=30) for _ in range(8)]
        try:
            decisions = await asyncio.gather(*(c.route("What is the integral of x?")
                                               for c in clients))
            assert {d.route for d in decisions} == {"math"}
            assert {d.index_version for d in decisions} == {v1.name}
            text = await asyncio.to_thread(_metrics, metrics_port)
            assert 'semroute_router_requests_total{code="OK",method="Route"} 8.0' in text
            assert 'semroute_router_ready{worker="0"} 1.0' in text
            assert 'semroute_router_ready{worker="1"} 1.0' in text
            assert _versions(text) == {"0": v1.name, "1": v1.name}

            v2 = build_small_index(root, ROWS_V2)  # moves `current`: the watch sees it
            await _until(
                lambda: asyncio.to_thread(lambda: _versions(_metrics(metrics_port))
                                          == {"0": v2.name, "1": v2.name}),
                "both workers on v2",
            )
            decisions = await asyncio.gather(*(c.route("Solve 3x + 5 = 20") for c in clients))
            assert {d.index_version for d in decisions} == {v2.name}

            assert (await clients[0].reload(str(v1))).version == v1.name
            await _until(
                lambda: asyncio.to_thread(lambda: _versions(_metrics(metrics_port))
                                          == {"0": v1.name, "1": v1.name}),
                "the other worker back on v1 after one ReloadIndex call",
            )
            async with grpc.aio.insecure_channel(addr) as channel:
                await _until(lambda: _serving(channel), "SERVING after the reloads")

            victim = sorted(workers)[0]
            os.kill(victim, signal.SIGKILL)
            await _until(lambda: victim not in _children(os.getpid())
                         and len(_children(os.getpid())) == 2, "a replacement worker")
            await _until(
                lambda: asyncio.to_thread(lambda: _versions(_metrics(metrics_port))
                                          == {"0": v1.name, "1": v1.name}),
                "the replacement serving v1",
            )
            workers = _children(os.getpid())
            decisions = await asyncio.gather(*(c.route("hello there!") for c in clients))
            assert len(decisions) == 8
            async with RouterClient(addr, channels=4, timeout=30) as pooled:
                decisions = await asyncio.gather(*(pooled.route("Solve 3x + 5 = 20")
                                                   for _ in range(12)))
            assert {d.route for d in decisions} == {"math"}
        finally:
            await asyncio.gather(*(c.close() for c in clients))
    finally:
        stop.set()
        await asyncio.wait_for(task, WAIT_S)
    assert not any(_alive(pid) for pid in workers)


async def _serving(channel: grpc.aio.Channel) -> bool:
    return await health_status(channel) == "SERVING"


async def test_a_worker_that_cannot_load_the_index_fails_the_start(tmp_path: Path) -> None:
    """An index root with no index: the start fails with the worker's own error, and no worker
    process is left behind."""
    settings = router_settings(router_server__processes=2, router_server__port=0,
                               router_server__host="127.0.0.1")
    before = _children(os.getpid())
    with pytest.raises(SemrouteError, match=r"router worker \d failed to start: IndexNotFound"):
        await asyncio.wait_for(
            serve_router(settings, tmp_path / "nothing", encoder_path=ENCODER_DIR), WAIT_S
        )
    assert _children(os.getpid()) <= before


async def test_cli_processes_drains_on_sigterm_and_workers_die_with_their_supervisor(
    small_index: Path, tmp_path: Path,
) -> None:
    """`semroute serve router --processes 2`: SERVING, then SIGTERM exits 0 with both workers
    gone; a second one killed with SIGKILL (no chance to stop anything) takes its workers with
    it (PR_SET_PDEATHSIG)."""
    semroute = Path(sys.executable).parent / "semroute"
    env = {**os.environ, "SEMROUTE_ROUTER_SERVER__WATCH_INTERVAL_S": "0"}
    for ending in (signal.SIGTERM, signal.SIGKILL):
        port = _free_port()
        log_file = tmp_path / f"router-{ending.name}.log"
        with log_file.open("w") as log:
            proc = subprocess.Popen(
                [str(semroute), "serve", "router", "--index", str(small_index), "--port",
                 str(port), "--metrics-port", "0", "--host", "127.0.0.1", "--processes", "2",
                 "--encoder", str(ENCODER_DIR)],
                stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=die_with_parent(),
            )
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                async def up(ch: grpc.aio.Channel = channel, proc: subprocess.Popen[bytes] = proc,
                             log_file: Path = log_file) -> bool:
                    assert proc.poll() is None, log_file.read_text()
                    try:
                        return await _serving(ch)
                    except grpc.aio.AioRpcError:
                        return False

                await _until(up, "the CLI router SERVING")
            workers = _children(proc.pid)
            assert len(workers) == 2
            proc.send_signal(ending)
            status = await asyncio.to_thread(proc.wait, WAIT_S)
            assert status == (0 if ending == signal.SIGTERM else -signal.SIGKILL)
            await _until(lambda ws=workers: not any(_alive(p) for p in ws),  # type: ignore[misc]
                         f"workers gone after {ending.name}")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
