"""Several router processes on one port: the supervisor (``WorkerSet``) and a worker's end of
its control link (``WorkerLink``).

``semroute serve router --processes N`` runs N worker processes, each a complete router server
(its own event loop, encoder session and worker threads) listening on the same port with
SO_REUSEPORT, so the kernel spreads new connections over them. A gRPC channel is one
connection, so one client channel always reaches the same worker: clients open several channels
(``RouterClient(channels=...)``) or use a balancer. The supervisor holds the fleet together:

- start: it reserves the port (port 0 picks one port for all), spawns the workers (they die
  with it: PR_SET_PDEATHSIG), sends each its settings over a private socket pair and waits until
  every one has loaded the index (memory-mapped: the vectors are in the page cache once);
- health: each worker answers health checks itself, but says SERVING only while the supervisor
  tells it that every worker is up and serving the same index version;
- reloads: one watch of DIR/current (the supervisor's) triggers every worker; a ReloadIndex or
  SetCandidate call, which reaches one worker, is applied there and then sent to the others;
- metrics: one endpoint merges the workers' registries (``semroute.grpc.metrics_merge``);
- shutdown: SIGTERM/SIGINT to the supervisor drains every worker (each goes NOT_SERVING and
  finishes its calls within ``grace_s``). A worker that exits on its own is started again.

Control messages are JSON lines. Worker -> supervisor: ``ready`` (version, metrics port),
``version`` (after a reload), ``failed`` (error, at start), ``broadcast`` (a command for the
others). Supervisor -> worker: ``start`` (first: settings, port), ``serving``, ``reload``,
``candidate``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from semroute.config import Settings
from semroute.errors import SemrouteError
from semroute.grpc.router_handle import SERVICE_NAME, RouterHandle
from semroute.grpc.server import set_serving
from semroute.logs import get_logger

log = get_logger(__name__)

PR_SET_PDEATHSIG = 1
RESTART_DELAY_S = 1.0


def reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound (not listening) to ``host:port`` with SO_REUSEPORT: it keeps the port for
    the workers, which bind it the same way. The port must be free of other listeners, even
    SO_REUSEPORT ones (a second router on it would silently share its connections). Port 0
    picks a free port (``getsockname()``). Raises SemrouteError naming the setting."""
    bare = host.strip("[]") or None
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(
            bare, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(addr)
            chosen = int(probe.getsockname()[1])
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((addr[0], chosen, *addr[2:]))
    except OSError as exc:
        raise SemrouteError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc} (port in use? choose another "
            "with --port / router_server.port)"
        ) from exc
    return sock


def _die_with_parent() -> Callable[[], None] | None:
    """``preexec_fn``: SIGKILL this child when the supervisor dies (Linux), so no worker
    outlives it holding the port."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent:  # the supervisor died between fork and prctl
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


def _line(message: dict[str, Any]) -> bytes:
    return (json.dumps(message) + "\n").encode()


# ---- the worker's end -----------------------------------------------------------------------------


class WorkerLink:
    """A worker's control link to its supervisor (``await WorkerLink.connect(fd)``)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 start: dict[str, Any]) -> None:
        self._reader = reader
        self._writer = writer
        self.worker = int(start["worker"])
        self.port = int(start["port"])
        self.settings = Settings.model_validate(start["settings"])
        self.index_path = Path(start["index"])
        self.encoder_path = Path(start["encoder"]) if start.get("encoder") else None
        self.metrics = bool(start["metrics"])

    @classmethod
    async def connect(cls, fd: int) -> WorkerLink:
        reader, writer = await asyncio.open_unix_connection(sock=socket.socket(fileno=fd))
        start = json.loads(await reader.readline())
        return cls(reader, writer, start)

    def send(self, op: str, **fields: Any) -> None:
        if not self._writer.is_closing():
            self._writer.write(_line({"op": op, **fields}))

    def version_changed(self, version: str) -> None:
        """``RouterHandle.on_version``: the index this worker serves changed."""
        self.send("version", version=version)

    def reload(self, path: Path | None) -> None:
        """``RouterHandle.peers``: the other workers load ``path`` too."""
        self.send("broadcast", command={"op": "reload", "path": str(path) if path else None})

    def set_candidate(self, mode: str, path: Path | None, share: float) -> None:
        """``RouterHandle.peers``: the other workers set the same candidate."""
        self.send("broadcast", command={"op": "candidate", "mode": mode, "share": share,
                                        "path": str(path) if path else None})

    async def failed(self, error: str) -> None:
        self.send("failed", error=error)
        with contextlib.suppress(ConnectionError):
            await self._writer.drain()

    async def serve(self, handle: RouterHandle, stop: asyncio.Event) -> None:
        """Apply the supervisor's commands until the link closes (then set ``stop``)."""
        try:
            while line := await self._reader.readline():
                await self._apply(handle, json.loads(line))
        finally:
            stop.set()  # the supervisor has gone: drain and exit

    async def _apply(self, handle: RouterHandle, message: dict[str, Any]) -> None:
        op = message["op"]
        if op == "serving":
            await set_serving(handle.health, [SERVICE_NAME], bool(message["value"]))
        elif op == "reload":
            await handle.reload(Path(message["path"]) if message["path"] else None)
        elif op == "candidate":
            path = Path(message["path"]) if message["path"] else None
            try:
                await handle.set_candidate(message["mode"], path, float(message["share"]))
            except SemrouteError as exc:
                log.error("candidate from another worker refused", error=str(exc))

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(ConnectionError):
            await self._writer.wait_closed()


# ---- the supervisor -------------------------------------------------------------------------------


@dataclass
class _Worker:
    number: int
    proc: subprocess.Popen[bytes]
    writer: asyncio.StreamWriter
    ready: bool = False
    version: str = ""
    metrics_port: int = 0
    error: str = ""
    exited: asyncio.Event = field(default_factory=asyncio.Event)


class WorkerSet:
    """Starts, watches and stops the worker processes (see the module docstring).

    ``command(fd)`` is the argv that runs one worker whose control socket is file descriptor
    ``fd`` (``semroute.serve`` passes its own entry point)."""

    def __init__(self, settings: Settings, index_path: Path, *, processes: int,
                 encoder_path: Path | None, command: Callable[[int], list[str]]) -> None:
        self.settings = settings
        self.index_path = index_path
        self.processes = processes
        self._encoder_path = encoder_path
        self._command = command
        self._workers: dict[int, _Worker] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._changed = asyncio.Event()
        self._serving: bool | None = None
        self._stopping = False
        self._reservation: socket.socket | None = None
        # What the fleet was last told beyond its start (an explicit reload path, a candidate):
        # a worker started again later is told the same, so it serves what the others serve.
        self._replay: dict[str, dict[str, Any]] = {}
        self._started = False
        self.port = 0

    @property
    def pids(self) -> list[int]:
        """The workers' process ids, by worker number."""
        return [w.proc.pid for _, w in sorted(self._workers.items())]

    def metrics_ports(self) -> dict[str, int]:
        """Worker number (as text) -> its private metrics port, for workers that are up."""
        return {str(n): w.metrics_port for n, w in self._workers.items() if w.metrics_port}

    def _worker_settings(self) -> dict[str, Any]:
        data = self.settings.model_dump(mode="json", exclude_unset=True)
        srv = data.setdefault("router_server", {})
        # One watch (here) for all; each worker's metrics on a private port (merged here).
        srv.update(port=self.port, watch_interval_s=0, metrics_port=0)
        encoder = data.setdefault("encoder", {})
        if "threads" not in encoder:  # the cores shared out, unless set explicitly
            encoder["threads"] = max(1, (os.cpu_count() or 1) // self.processes)
        return data

    async def start(self) -> int:
        """Reserve the port, start every worker and wait until each has loaded the index.
        Returns the port. Raises SemrouteError (after stopping the others) when one fails."""
        srv = self.settings.router_server
        self._reservation = reserve_port(srv.host, srv.port)
        self.port = int(self._reservation.getsockname()[1])
        for number in range(self.processes):
            await self._spawn(number)
        while not all(w.ready for w in self._workers.values()):
            failed = [w for w in self._workers.values() if w.exited.is_set()]
            if failed:
                await self.stop(0)
                reason = failed[0].error or f"exit status {failed[0].proc.poll()}"
                raise SemrouteError(f"router worker {failed[0].number} failed to start: {reason}")
            self._changed.clear()
            await self._changed.wait()
        self._started = True
        log.info("router workers ready", processes=self.processes, port=self.port,
                 pids=self.pids)
        return self.port

    async def _spawn(self, number: int) -> None:
        mine, theirs = socket.socketpair()
        try:
            proc = subprocess.Popen(
                self._command(theirs.fileno()), pass_fds=(theirs.fileno(),),
                preexec_fn=_die_with_parent(),  # only prctl: see _die_with_parent
            )
        finally:
            theirs.close()
        reader, writer = await asyncio.open_unix_connection(sock=mine)
        worker = _Worker(number, proc, writer)
        self._workers[number] = worker
        writer.write(_line({
            "op": "start", "worker": number, "port": self.port,
            "settings": self._worker_settings(), "index": str(self.index_path),
            "encoder": str(self._encoder_path) if self._encoder_path else None,
            "metrics": bool(self.settings.router_server.metrics_port),
        }))
        task = asyncio.get_running_loop().create_task(self._listen(worker, reader))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _listen(self, worker: _Worker, reader: asyncio.StreamReader) -> None:
        try:
            while line := await reader.readline():
                message = json.loads(line)
                op = message["op"]
                if op == "ready":
                    worker.ready, worker.version = True, message["version"]
                    worker.metrics_port = int(message.get("metrics_port") or 0)
                    self._serving = None  # tell the newcomer too
                    if self._started:  # a restarted worker: catch up with the others
                        for command in self._replay.values():
                            worker.writer.write(_line(command))
                elif op == "version":
                    worker.version = message["version"]
                elif op == "failed":
                    worker.error = message["error"]
                elif op == "broadcast":
                    self._remember(message["command"])
                    self._send(message["command"], skip=worker.number)
                self._update_health()
        finally:
            await asyncio.get_running_loop().run_in_executor(None, worker.proc.wait)
            worker.exited.set()
            worker.ready, worker.metrics_port = False, 0
            self._update_health()
            if self._started and not self._stopping and self._workers.get(worker.number) is worker:
                log.error("router worker exited; starting it again", worker=worker.number,
                          status=worker.proc.returncode)
                await asyncio.sleep(RESTART_DELAY_S)
                if not self._stopping:
                    await self._spawn(worker.number)

    def _update_health(self) -> None:
        workers = list(self._workers.values())
        serving = (not self._stopping and all(w.ready for w in workers)
                   and len({w.version for w in workers}) == 1)
        if serving != self._serving:
            self._serving = serving
            self._send({"op": "serving", "value": serving})
            if self._started or serving:
                log.info("router workers serving" if serving else "router workers not serving",
                         versions=sorted({w.version for w in workers if w.ready}),
                         ready=sum(w.ready for w in workers), processes=len(workers))
        self._changed.set()

    def _remember(self, command: dict[str, Any]) -> None:
        if command["op"] == "reload":
            if command.get("path"):
                self._replay["reload"] = command
            else:  # back to following the root's `current`, which a new worker does anyway
                self._replay.pop("reload", None)
        elif command["op"] == "candidate":
            self._replay["candidate"] = command

    def _send(self, message: dict[str, Any], skip: int | None = None) -> None:
        for number, worker in self._workers.items():
            if number != skip and not worker.writer.is_closing():
                worker.writer.write(_line(message))

    async def watch(self) -> None:
        """Poll DIR/current every ``router_server.watch_interval_s`` (0: never) and have every
        worker reload when it moves."""
        interval = self.settings.router_server.watch_interval_s
        link = self.index_path / "current"
        seen = link.resolve() if link.exists() else None
        while interval > 0:
            await asyncio.sleep(interval)
            target = link.resolve() if link.exists() else None
            if target is not None and target != seen:
                seen = target
                log.info("index current changed; reloading every worker", current=str(target))
                self._remember({"op": "reload", "path": None})
                self._send({"op": "reload", "path": None})

    async def stop(self, grace_s: float) -> None:
        """SIGTERM every worker (each drains within ``grace_s``), wait, SIGKILL what is left."""
        self._stopping = True
        for worker in self._workers.values():
            if worker.proc.poll() is None:
                worker.proc.send_signal(signal.SIGTERM)
        waits = [w.exited.wait() for w in self._workers.values()]
        try:
            await asyncio.wait_for(asyncio.gather(*waits), grace_s + 5.0)
        except TimeoutError:
            for worker in self._workers.values():
                if worker.proc.poll() is None:
                    log.error("router worker did not stop; killing it", worker=worker.number)
                    worker.proc.kill()
            await asyncio.gather(*(w.exited.wait() for w in self._workers.values()))
        for worker in self._workers.values():
            worker.writer.close()
        if self._reservation is not None:
            self._reservation.close()
            self._reservation = None
