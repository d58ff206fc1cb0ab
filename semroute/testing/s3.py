"""A throwaway S3-compatible server for tests: moto's ``moto_server`` (PyPI ``moto[server]``, a
dev dependency) on a free loopback port, in memory, dying with its parent (PR_SET_PDEATHSIG).

``env`` holds what boto3 needs to talk to it (endpoint, dummy credentials, region), for this
process (``os.environ.update``) or a child's environment.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import httpx

from semroute.errors import StackError
from semroute.testing.devstack import (
    LOOPBACK,
    await_server,
    die_with_parent,
    free_port,
    stop_process,
)


@dataclass
class S3Server:
    url: str
    process: subprocess.Popen[bytes]
    directory: Path

    @property
    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.url,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def stop(self) -> None:
        stop_process(self.process)
        shutil.rmtree(self.directory, ignore_errors=True)


def start_s3(timeout: float = 30.0) -> S3Server:
    """Start ``moto_server``; StackError saying what is missing or what failed."""
    binary = Path(sys.executable).parent / "moto_server"
    if not binary.exists():
        raise StackError("moto_server is not installed: run `make setup` (PyPI moto[server])")
    directory = Path(tempfile.mkdtemp(prefix="semroute-s3-"))
    port = free_port()
    log_path = directory / "moto.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [str(binary), "-H", LOOPBACK, "-p", str(port)], stdout=log_file,
            stderr=subprocess.STDOUT, preexec_fn=die_with_parent(),
        )
    server = S3Server(f"http://{LOOPBACK}:{port}", process, directory)
    def answers() -> bool:
        try:
            return httpx.get(server.url, timeout=1.0, trust_env=False).status_code < 500
        except httpx.HTTPError:
            return False

    try:
        await_server(process, answers, log_path, f"moto_server on {server.url}", timeout,
                     poll=0.1)
    except StackError:
        server.stop()
        raise
    return server
