"""Stopping the local stack as operators and supervisors do: the runner operators use
(scripts/serve_stack.py, here with fault servers in place of llama.cpp) leaves nothing behind
when it is SIGKILLed or SIGTERMed, and our own servers exit cleanly on SIGTERM."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from semroute.testing.devstack import (
    StackPorts,
    child_env,
    die_with_parent,
    start_dispatcher,
    start_router,
    write_backends,
)
from tests.proctree import ProcId, alive, descendants, wait_all_gone

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; Linux only"),
]

REPO = Path(__file__).resolve().parents[2]
RUNNER = REPO / "scripts" / "serve_stack.py"
INDEX = REPO / "index_data" / "build" / "default"
TEMPLATE = REPO / "deploy" / "backends.yaml"
ALL_FREE_PORTS = [
    f"--{name}-port=0"
    for name in ("router", "router-metrics", "dispatcher", "dispatcher-metrics", "http", "small",
                 "large")
]


@contextlib.contextmanager
def running_stack(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], list[ProcId]]]:
    """`serve_stack.py --fake-llm` on free ports, awaited until it says it is up; yields the
    runner and every process below it. Whatever is still alive afterwards is killed."""
    out = tmp_path / "runner.out"
    with out.open("wb") as sink:
        runner = subprocess.Popen(
            [sys.executable, str(RUNNER), "--fake-llm", *ALL_FREE_PORTS,
             "--index", str(INDEX), "--log-dir", str(tmp_path / "logs")],
            stdout=sink, stderr=subprocess.STDOUT, env=child_env(), cwd=REPO,
            preexec_fn=die_with_parent(),
        )
    children: list[ProcId] = []
    try:
        deadline = time.monotonic() + 120
        while "stack is up" not in out.read_text(errors="replace"):
            assert runner.poll() is None, f"runner exited:\n{out.read_text()}"
            assert time.monotonic() < deadline, f"stack not up in 120 s:\n{out.read_text()}"
            time.sleep(0.1)
        children = descendants(runner.pid)
        commands = " ".join(c.cmdline for c in children)
        assert len(children) >= 4, commands
        for part in ("faultserver", "serve router", "serve dispatcher"):
            assert part in commands
        yield runner, children
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.wait(10)
        for child in children:
            if alive(child):
                os.kill(child.pid, signal.SIGKILL)


def test_sigkilled_runner_leaves_no_child_running(tmp_path: Path) -> None:
    """SIGKILL gives the runner no chance to stop anything; still, within 5 s every process it
    started (fault servers, router, dispatcher, each in its own session) is gone."""
    with running_stack(tmp_path) as (runner, children):
        runner.kill()
        runner.wait(10)
        survivors = wait_all_gone(children, timeout=5.0)
        assert survivors == [], [s.cmdline for s in survivors]


def test_sigterm_stops_the_whole_stack_within_ten_seconds(tmp_path: Path) -> None:
    """SIGTERM to the runner (what a supervisor sends first) stops every child and the runner
    itself, exit status 0, within 10 s."""
    with running_stack(tmp_path) as (runner, children):
        deadline = time.monotonic() + 10.0
        runner.send_signal(signal.SIGTERM)
        try:
            code = runner.wait(timeout=deadline - time.monotonic())
        except subprocess.TimeoutExpired:
            pytest.fail("the runner was still running 10 s after SIGTERM")
        survivors = wait_all_gone(children, timeout=max(0.0, deadline - time.monotonic()))
        assert survivors == [], [s.cmdline for s in survivors]
        assert code == 0


def test_our_servers_exit_cleanly_on_sigterm(tmp_path: Path) -> None:
    """`semroute serve router` and `semroute serve dispatcher` each exit with status 0 when
    sent SIGTERM (they drain; nothing is in flight here)."""
    ports = StackPorts()
    backends = write_backends(
        TEMPLATE, tmp_path / "backends.yaml",
        {"local-small": "http://127.0.0.1:9/v1", "local-large": "http://127.0.0.1:9/v1"},
    )
    router = start_router(INDEX, tmp_path, port=ports.router, env=child_env())
    dispatcher = None
    try:
        dispatcher = start_dispatcher(router.address, backends, tmp_path, env=child_env())
        for service in (dispatcher, router):
            assert service.popen is not None
            service.popen.send_signal(signal.SIGTERM)
            try:
                code = service.popen.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pytest.fail(f"{service.name} still running 20 s after SIGTERM")
            assert code == 0, service.log_tail()
    finally:
        for service in (dispatcher, router):
            if service is not None:
                service.stop()


def test_runner_stops_its_stack_when_its_parent_is_sigkilled(tmp_path: Path) -> None:
    """`make serve` SIGKILLed by a supervisor: the runner's parent dies, the runner gets SIGTERM
    from the kernel, stops its stack and exits; nothing below the killed parent survives."""
    out = tmp_path / "runner.out"
    argv = [sys.executable, str(RUNNER), "--fake-llm", *ALL_FREE_PORTS, "--index", str(INDEX),
            "--log-dir", str(tmp_path / "logs")]
    # A shell that waits for the runner, as make does (not exec: the shell stays the parent).
    script = " ".join(f"'{a}'" for a in argv) + f" > '{out}' 2>&1; true"
    parent = subprocess.Popen(["sh", "-c", script], cwd=REPO, env=child_env(),
                              preexec_fn=die_with_parent())
    tree: list[ProcId] = []
    try:
        deadline = time.monotonic() + 120
        while not out.exists() or "stack is up" not in out.read_text(errors="replace"):
            assert parent.poll() is None, out.read_text() if out.exists() else "no output"
            assert time.monotonic() < deadline, "stack not up in 120 s"
            time.sleep(0.1)
        tree = descendants(parent.pid)
        assert any("serve_stack.py" in p.cmdline for p in tree)
        assert len(tree) >= 5, [p.cmdline for p in tree]
        parent.kill()
        parent.wait(10)
        survivors = wait_all_gone(tree, timeout=10.0)
        assert survivors == [], [s.cmdline for s in survivors]
        assert "serve: stopped" in out.read_text()  # stopped in order, not killed
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(10)
        for proc in tree:
            if alive(proc):
                os.kill(proc.pid, signal.SIGKILL)
