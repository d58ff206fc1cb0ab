"""The cluster's generated configuration checked by the real tools (``nginx -t``, ``promtool
check config``; Debian packages nginx and prometheus, installed by ``make setup``), and the
container HEALTHCHECK script against a real gRPC health service on loopback."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from semroute.testing.cluster import find_binary
from semroute.testing.cluster_config import (
    nginx_conf,
    prometheus_config,
    write_yaml,
)
from semroute.testing.devstack import free_port

REPO = Path(__file__).resolve().parents[2]
HEALTHCHECK = REPO / "deploy" / "docker" / "healthcheck.py"


def _nginx_test(tmp_path: Path, conf: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "tmp").mkdir(exist_ok=True)
    (tmp_path / "nginx.conf").write_text(conf)
    return subprocess.run(
        [find_binary("nginx"), "-t", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"),
         "-e", str(tmp_path / "error.log")],
        capture_output=True, text=True, timeout=30,
    )


def test_generated_nginx_conf_passes_nginx_t(tmp_path: Path) -> None:
    """nginx accepts the load balancer's configuration (grpc_pass upstreams, retry
    directives, JSON access log, stub_status)."""
    conf = nginx_conf(tmp_path, listen={"router": free_port(), "dispatcher": free_port(),
                                        "http": free_port(), "status": free_port()},
                      routers=[50051, 50061, 50071], dispatchers=[50052], doors=[8000])
    result = _nginx_test(tmp_path, conf)
    assert result.returncode == 0, result.stderr
    assert "syntax is ok" in result.stderr


def test_nginx_t_rejects_a_broken_conf(tmp_path: Path) -> None:
    """The check above can fail: a misspelt directive is refused with its line."""
    conf = nginx_conf(tmp_path, listen={"router": free_port(), "dispatcher": free_port(),
                                        "http": free_port(), "status": free_port()},
                      routers=[50051], dispatchers=[50052], doors=[8000])
    result = _nginx_test(tmp_path, conf.replace("grpc_next_upstream ", "grpc_next_upstrem ", 1))
    assert result.returncode != 0
    assert "grpc_next_upstrem" in result.stderr


def test_generated_prometheus_config_passes_promtool(tmp_path: Path) -> None:
    """promtool accepts the scrape configuration (one job per kind of process)."""
    path = write_yaml(tmp_path / "prometheus.yml", prometheus_config(
        {"router": {"router-0": 9464, "router-1": 9474}, "dispatcher": {"dispatcher-0": 9465}},
        scrape_interval_s=1.0), "test")
    promtool = find_binary("prometheus").replace("prometheus", "promtool")
    result = subprocess.run([promtool, "check", "config", str(path)], capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture
def health_server() -> Iterator[tuple[str, health.HealthServicer]]:
    servicer = health.HealthServicer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        server.stop(0)


def _probe(address: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(HEALTHCHECK)], capture_output=True, text=True,
                          timeout=30, env={"SEMROUTE_HEALTH_ADDRESS": address, "PATH": ""})


def test_healthcheck_follows_the_grpc_health_status(
    health_server: tuple[str, health.HealthServicer]
) -> None:
    """The image's HEALTHCHECK exits 0 while the service says SERVING and 1 (naming the status)
    once it says NOT_SERVING, as a router does before its index is loaded and while draining."""
    address, servicer = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    assert _probe(address).returncode == 0
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    result = _probe(address)
    assert result.returncode == 1
    assert "NOT_SERVING" in result.stderr


def test_healthcheck_fails_when_nothing_listens() -> None:
    """No service on the port: exit 1, UNAVAILABLE."""
    result = _probe(f"127.0.0.1:{free_port()}")
    assert result.returncode == 1
    assert "UNAVAILABLE" in result.stderr
