"""A throwaway Redis server for tests and benchmarks: one ``redis-server`` on a free loopback
port, its files in a temp dir, no persistence, stopped (and its directory removed) on ``stop()``.

Debian's ``redis-server`` package provides the binary (``make setup`` installs it). The server
dies with its parent (PR_SET_PDEATHSIG), so a killed test run leaves nothing behind.
``pause()`` / ``resume()`` (SIGSTOP / SIGCONT) make it unresponsive without losing its data,
which is how tests see a dispatcher ride out a Redis outage.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from semroute.errors import StackError
from semroute.testing.devstack import (
    LOOPBACK,
    await_server,
    die_with_parent,
    free_port,
    stop_process,
)


@dataclass
class RedisServer:
    url: str
    port: int
    process: subprocess.Popen[bytes]
    directory: Path

    def pause(self) -> None:
        """Freeze the server: connections hang (as with a dead host) until ``resume``."""
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.resume()
        stop_process(self.process)
        shutil.rmtree(self.directory, ignore_errors=True)


def _answers(port: int) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def start_redis(timeout: float = 20.0) -> RedisServer:
    """Start a fresh server; ``url`` is ``redis://127.0.0.1:<port>/0``. Raises StackError
    saying what is missing or what failed."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise StackError("redis-server is not installed: run `make setup` (Debian package "
                         "redis-server)")
    directory = Path(tempfile.mkdtemp(prefix="semroute-redis-"))
    port = free_port()
    log_path = directory / "redis.log"
    log_file = log_path.open("wb")
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", LOOPBACK, "--dir", str(directory),
         "--save", "", "--appendonly", "no", "--protected-mode", "yes",
         "--daemonize", "no"],
        stdout=log_file, stderr=subprocess.STDOUT, preexec_fn=die_with_parent(),
    )
    log_file.close()
    server = RedisServer(f"redis://{LOOPBACK}:{port}/0", port, process, directory)
    try:
        await_server(process, lambda: _answers(port), log_path,
                     f"redis-server on {LOOPBACK}:{port}", timeout, poll=0.02)
    except StackError:
        server.stop()
        raise
    return server


@contextlib.contextmanager
def running_redis() -> Iterator[RedisServer]:
    server = start_redis()
    try:
        yield server
    finally:
        server.stop()
