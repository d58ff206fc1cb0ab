"""Binding a gRPC server to a port that is taken fails with the address and the setting."""

from __future__ import annotations

import socket

import grpc
import pytest

from semroute.errors import SemrouteError
from semroute.grpc.server import bind_port


async def test_taken_port_names_address_and_setting() -> None:
    """A port held by another socket raises SemrouteError naming it and `router_server.port`."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        with pytest.raises(SemrouteError, match=rf"127\.0\.0\.1:{port}.*router_server\.port"):
            bind_port(server, f"127.0.0.1:{port}", None, "router_server.port")
        await server.stop(None)


async def test_free_port_is_returned() -> None:
    """Port 0 binds an ephemeral port and returns its number."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    assert bind_port(server, "127.0.0.1:0", None, "dispatcher.port") > 0
    await server.stop(None)
