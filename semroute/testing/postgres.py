"""A throwaway PostgreSQL server for tests and scripts: initdb in a temp dir, one server on a free
loopback port, stopped (and its directory removed) on ``stop()``.

Debian's ``postgresql`` package provides the binaries (``make setup`` installs it); they are
looked up on PATH and under /usr/lib/postgresql/*/bin. PostgreSQL refuses to run as root, so
when we are root the server runs as the ``postgres`` system user the package creates. The server
dies with its parent (PR_SET_PDEATHSIG), so a killed test run leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from semroute.errors import StackError
from semroute.testing.devstack import await_server, die_with_parent, free_port, stop_process


def find_binary(name: str) -> Path | None:
    """``name`` (initdb, postgres) from PATH or the newest /usr/lib/postgresql/*/bin."""
    found = shutil.which(name)
    if found:
        return Path(found)
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    for folder in versions:
        if (folder / name).exists():
            return folder / name
    return None


@dataclass
class PostgresServer:
    url: str
    port: int
    process: subprocess.Popen[bytes]
    directory: Path

    def stop(self) -> None:
        stop_process(self.process, signal.SIGINT)  # SIGINT: postgres's "fast" shutdown
        shutil.rmtree(self.directory, ignore_errors=True)


def start_postgres(timeout: float = 30.0) -> PostgresServer:
    """Start a fresh server; ``url`` connects as the superuser to database ``postgres``.
    Raises StackError saying what is missing or what failed."""
    initdb, postgres = find_binary("initdb"), find_binary("postgres")
    if initdb is None or postgres is None:
        raise StackError(
            "PostgreSQL is not installed: run `make setup` (Debian package postgresql)"
        )
    uid = gid = None
    user = pwd.getpwuid(os.getuid()).pw_name
    if os.getuid() == 0:
        try:
            entry = pwd.getpwnam("postgres")
        except KeyError:
            raise StackError("running as root needs the `postgres` system user") from None
        uid, gid, user = entry.pw_uid, entry.pw_gid, "postgres"
    directory = Path(tempfile.mkdtemp(prefix="semroute-pg-"))
    data = directory / "data"
    if uid is not None:
        os.chown(directory, uid, gid or -1)
    init = subprocess.run(
        [str(initdb), "-D", str(data), "-A", "trust", "-U", user, "--no-sync", "-E", "UTF8"],
        capture_output=True, timeout=120, check=False, user=uid, group=gid,
    )
    if init.returncode != 0:
        shutil.rmtree(directory, ignore_errors=True)
        raise StackError(f"initdb failed: {init.stderr.decode(errors='replace')[-500:]}")
    port = free_port()
    log_file = (directory / "postgres.log").open("wb")
    process = subprocess.Popen(
        [str(postgres), "-D", str(data), "-p", str(port), "-h", "127.0.0.1",
         "-k", str(directory), "-c", "fsync=off", "-c", "full_page_writes=off"],
        stdout=log_file, stderr=subprocess.STDOUT, preexec_fn=die_with_parent(),
        user=uid, group=gid,
    )
    log_file.close()
    server = PostgresServer(f"postgresql://{user}@127.0.0.1:{port}/postgres", port, process,
                            directory)
    log = directory / "postgres.log"
    try:
        await_server(process,
                     lambda: "ready to accept connections" in log.read_text(errors="replace"),
                     log, f"postgres on 127.0.0.1:{port}", timeout)
    except StackError:
        server.stop()
        raise
    return server


@contextlib.contextmanager
def running_postgres() -> Iterator[PostgresServer]:
    server = start_postgres()
    try:
        yield server
    finally:
        server.stop()
