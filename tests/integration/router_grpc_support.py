"""Shared helpers and fixtures for the router gRPC tests (imported by test_router_grpc*.py).

Not a conftest: the fixtures are imported explicitly by the modules that use them. Expensive
things (the loaded encoder, the small built indexes) are cached per process, so importing the
fixtures into several modules does not build anything twice.
"""

from __future__ import annotations

import contextlib
import csv
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from semroute.auth import TokenSet
from semroute.config import Settings, load_settings
from semroute.grpc.router_handle import RouterHandle
from semroute.grpc.router_service import create_router_server
from semroute.metrics import RouterMetrics
from tests.conftest import ENCODER_DIR

ROOT = Path(__file__).resolve().parents[2]
ROUTES_FILE = ROOT / "index_data" / "routes.yaml"

# A handful of exemplars per route of index_data/routes.yaml: enough for clear decisions.
ROWS_V1: list[tuple[str, str]] = [
    ("Write a Python function that reverses a linked list", "code"),
    ("Why does my JavaScript promise never resolve?", "code"),
    ("Fix this segmentation fault in my C program", "code"),
    ("How do I write a SQL query joining two tables?", "code"),
    ("What is the integral of x squared?", "math"),
    ("Solve the equation 3x + 5 = 20", "math"),
    ("What is the derivative of sin(x) times cos(x)?", "math"),
    ("Compute the probability of rolling two sixes", "math"),
    ("Write a short poem about autumn leaves", "creative"),
    ("Tell me a bedtime story about a brave dragon", "creative"),
    ("Write song lyrics about the ocean at night", "creative"),
    ("Summarize this article in three bullet points", "summarize"),
    ("Give me a one-paragraph summary of this report", "summarize"),
    ("TL;DR of the following meeting notes", "summarize"),
    ("Hi there, how are you doing today?", "chitchat"),
    ("Good morning! Nice to talk to you", "chitchat"),
    ("What's up, anything fun happening?", "chitchat"),
    ("My social security number is 123-45-6789, update my record", "sensitive"),
    ("Here is my patient's medical history, please review it", "sensitive"),
    ("This is my bank account password, store it safely", "sensitive"),
]
# The second version adds rows: same routes, a different index version.
ROWS_V2: list[tuple[str, str]] = [
    *ROWS_V1,
    ("Refactor this Java class to use interfaces", "code"),
    ("Find the area of a circle with radius 4", "math"),
]


def require_encoder() -> Path:
    if not (ENCODER_DIR / "manifest.json").exists():
        pytest.fail(f"{ENCODER_DIR} is missing: run `make setup` (exports the encoder)")
    return ENCODER_DIR


def write_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    return path


_CACHE: dict[str, Any] = {}


def shared_encoder() -> Any:
    """The real ONNX encoder, loaded once per process (with the embedding cache)."""
    if "encoder" not in _CACHE:
        from semroute.encoder import CachedEncoder, OnnxEncoder

        _CACHE["encoder"] = CachedEncoder(OnnxEncoder.load(require_encoder(), threads=2), 1024)
    return _CACHE["encoder"]


def build_small_index(root: Path, rows: list[tuple[str, str]]) -> Path:
    """Build (or add a version to) the index at ``root`` from ``rows``; returns the version dir."""
    from semroute.index import build_index

    root.mkdir(parents=True, exist_ok=True)
    csv_path = write_csv(root.parent / f"{root.name}-{len(rows)}.csv", rows)
    return build_index([csv_path], root, shared_encoder(), routes_file=ROUTES_FILE, progress=False)


@pytest.fixture(scope="session")
def small_index(tmp_path_factory: pytest.TempPathFactory, encoder_dir: Path) -> Path:
    """Index root built from ROWS_V1 (shared by the whole session; do not modify).
    ``encoder_dir`` (tests/conftest.py) exports the encoder first if it is missing."""
    if "small_index" not in _CACHE:
        root = tmp_path_factory.mktemp("router-index") / "idx"
        build_small_index(root, ROWS_V1)
        _CACHE["small_index"] = root
    path: Path = _CACHE["small_index"]
    return path


def router_settings(**overrides: Any) -> Settings:
    """Settings for in-process servers: no watch unless asked, metrics off."""
    values = {"router_server__watch_interval_s": 0, "router_server__metrics_port": 0}
    values.update(overrides)
    return load_settings(None, **values)


@dataclass
class RunningRouter:
    port: int
    handle: RouterHandle
    metrics: RouterMetrics
    server: grpc.aio.Server

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"


@contextlib.asynccontextmanager
async def running_router(
    index_path: Path,
    *,
    settings: Settings | None = None,
    load: bool = True,
    tokens: TokenSet | None = None,
    encoder: Any = "shared",
) -> AsyncIterator[RunningRouter]:
    """An in-process router server on 127.0.0.1:0 (loaded unless ``load=False``), stopped on
    exit. ``encoder="shared"`` reuses the process-wide encoder; None lets the server load one."""
    settings = settings or router_settings()
    metrics = RouterMetrics()
    enc = shared_encoder() if isinstance(encoder, str) and encoder == "shared" else encoder
    server, port, handle = await create_router_server(
        settings, index_path, host="127.0.0.1", port=0, encoder=enc, metrics=metrics,
        tokens=tokens,
    )
    await server.start()
    try:
        if load:
            await handle.load()
        yield RunningRouter(port, handle, metrics, server)
    finally:
        await server.stop(0)
        await handle.close()


async def health_status(channel: grpc.aio.Channel, service: str = "semroute.v1.Router") -> str:
    stub = health_pb2_grpc.HealthStub(channel)
    reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


@dataclass(frozen=True)
class Certs:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path
    other_client_cert: Path
    other_client_key: Path


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def _make_ca(d: Path, name: str) -> tuple[Path, Path]:
    key, cert = d / f"{name}.key", d / f"{name}.pem"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1",
             "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return key, cert


def _make_leaf(d: Path, name: str, ca_key: Path, ca_cert: Path, ext: str) -> tuple[Path, Path]:
    key, csr, cert = d / f"{name}.key", d / f"{name}.csr", d / f"{name}.pem"
    ext_file = d / f"{name}.ext"
    ext_file.write_text(ext)
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={name}")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key),
             "-CAcreateserial", "-out", str(cert), "-days", "1", "-extfile", str(ext_file))
    return key, cert


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Certs]:
    """A throwaway CA with a server cert (localhost, 127.0.0.1) and a client cert, plus a
    second, untrusted CA with its own client cert (openssl CLI)."""
    d = tmp_path_factory.mktemp("certs")
    ca_key, ca = _make_ca(d, "test-ca")
    server_key, server_cert = _make_leaf(
        d, "server", ca_key, ca,
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    )
    client_key, client_cert = _make_leaf(d, "client", ca_key, ca, "extendedKeyUsage=clientAuth\n")
    other_key, other_ca = _make_ca(d, "other-ca")
    o_key, o_cert = _make_leaf(d, "intruder", other_key, other_ca, "extendedKeyUsage=clientAuth\n")
    yield Certs(ca, server_cert, server_key, client_cert, client_key, other_ca, o_cert, o_key)
