"""Running a gRPC server: binding its port, health + reflection, graceful shutdown.

``serve_until_signalled`` waits for SIGTERM/SIGINT (or an event), marks health NOT_SERVING so
load balancers stop sending, stops accepting and drains in-flight calls for ``grace_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from semroute.errors import SemrouteError
from semroute.logs import get_logger

log = get_logger(__name__)

# Accept metadata up to 256 KiB (grpc's default is 8 KiB): an over-long x-request-id then
# reaches the interceptor, which replaces it, instead of failing the whole call.
SERVER_OPTIONS: tuple[tuple[str, int], ...] = (("grpc.max_metadata_size", 256 * 1024),)


def bind_port(
    server: grpc.aio.Server,
    address: str,
    credentials: grpc.ServerCredentials | None,
    setting: str,
) -> int:
    """Listen on ``address`` (TLS when ``credentials``); returns the bound port.

    A port that cannot be bound raises SemrouteError naming the address and the setting
    (``setting``, e.g. ``router_server.port``) to change.
    """
    try:
        bound = (
            server.add_secure_port(address, credentials)
            if credentials is not None
            else server.add_insecure_port(address)
        )
    except RuntimeError as exc:
        raise SemrouteError(
            f"cannot listen on {address}: {str(exc).split(';')[0]} (port in use? choose another "
            f"with --port / {setting})"
        ) from exc
    if bound == 0:
        raise SemrouteError(
            f"cannot listen on {address}: address in use or not available (set {setting})"
        )
    return int(bound)


async def add_health_and_reflection(
    server: grpc.aio.Server, service_names: Sequence[str]
) -> health.aio.HealthServicer:
    """Register ``grpc.health.v1.Health`` (all services NOT_SERVING until told otherwise) and
    server reflection for ``service_names`` (full names, e.g. ``semroute.v1.Router``)."""
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    for name in ("", *service_names):
        await servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection(
        [*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME],
        server,
    )
    return servicer


async def set_serving(
    servicer: health.aio.HealthServicer, service_names: Sequence[str], serving: bool
) -> None:
    """Mark the server (``""``) and each service SERVING or NOT_SERVING."""
    status = (
        health_pb2.HealthCheckResponse.SERVING
        if serving
        else health_pb2.HealthCheckResponse.NOT_SERVING
    )
    for name in ("", *service_names):
        await servicer.set(name, status)


async def wait_for_signal(
    stop: asyncio.Event | None = None,
    signals: Sequence[signal.Signals] = (signal.SIGTERM, signal.SIGINT),
) -> None:
    """Return on SIGTERM/SIGINT (handlers installed for the wait only) or when ``stop`` is set."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    for sig in signals:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
    try:
        await stop.wait()
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


async def serve_until_signalled(
    server: grpc.aio.Server,
    *,
    grace_s: float,
    health_servicer: health.aio.HealthServicer | None = None,
    stop: asyncio.Event | None = None,
    signals: Sequence[signal.Signals] = (signal.SIGTERM, signal.SIGINT),
) -> None:
    """Wait for a signal (or ``stop`` being set), then shut down gracefully.

    Health goes NOT_SERVING first so load balancers stop sending, then the server stops
    accepting new calls and gives in-flight ones up to ``grace_s`` seconds to finish.
    """
    await wait_for_signal(stop, signals)
    log.info("shutting down", grace_s=grace_s)
    if health_servicer is not None:
        await health_servicer.enter_graceful_shutdown()
    await server.stop(grace_s)
    log.info("stopped")
