"""Auth, TLS/mTLS and request plumbing of the router server. The server is real (127.0.0.1,
port 0); most tests never load an index: auth and TLS act before the servicer, and an unloaded
router answers UNAVAILABLE, which proves a call got through. The last one routes for real."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from semroute._proto.semroute.v1 import router_pb2 as pb
from semroute._proto.semroute.v1 import router_pb2_grpc as pb_grpc
from semroute.auth import TokenSet
from semroute.grpc.tls import channel_credentials
from tests.integration.router_grpc_support import (
    Certs,
    certs,
    health_status,
    router_settings,
    running_router,
    small_index,
)

__all__ = ["certs", "small_index"]  # fixtures, imported for pytest

TOKENS = TokenSet.of(user=["user-token"], admin=["admin-token"])
NO_INDEX = Path("/nonexistent/semroute-index")


def _md(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


async def _code(call: object) -> grpc.StatusCode:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def test_tokens_gate_every_router_method() -> None:
    """No token or an unknown token -> UNAUTHENTICATED; a valid token reaches the servicer
    (UNAVAILABLE: nothing loaded); ReloadIndex with a user token -> PERMISSION_DENIED."""
    async with (
        running_router(NO_INDEX, load=False, encoder=None, tokens=TOKENS) as r,
        grpc.aio.insecure_channel(r.addr) as ch,
    ):
        stub = pb_grpc.RouterStub(ch)
        req = pb.RouteRequest(query="hello")
        for token in (None, "wrong-token", "user-token-2"):
            try:
                await stub.Route(req, metadata=_md(token), timeout=5)
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAUTHENTICATED
                expected = "missing bearer token" if token is None else "unknown bearer token"
                assert expected in (exc.details() or "")
            else:
                raise AssertionError(f"token {token!r} was accepted")
        assert await _code(stub.Route(req, metadata=_md("user-token"), timeout=5)) == (
            grpc.StatusCode.UNAVAILABLE
        )
        assert await _code(stub.Route(req, metadata=_md("admin-token"), timeout=5)) == (
            grpc.StatusCode.UNAVAILABLE
        )
        try:
            await stub.ReloadIndex(pb.ReloadIndexRequest(), metadata=_md("user-token"),
                                   timeout=5)
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "admin token" in (exc.details() or "")
        else:
            raise AssertionError("a user token reloaded the index")
        assert await _code(stub.GetIndexInfo(
            pb.GetIndexInfoRequest(), metadata=_md(None), timeout=5
        )) == grpc.StatusCode.UNAUTHENTICATED


async def test_admin_reload_failure_is_reported_in_the_reply() -> None:
    """An admin ReloadIndex of a missing index answers ok=false with the reason; the service
    stays NOT_SERVING and counts the failure in its metrics."""
    async with (
        running_router(NO_INDEX, load=False, encoder=None, tokens=TOKENS) as r,
        grpc.aio.insecure_channel(r.addr) as ch,
    ):
        stub = pb_grpc.RouterStub(ch)
        reply = await stub.ReloadIndex(
            pb.ReloadIndexRequest(path=str(NO_INDEX)), metadata=_md("admin-token"), timeout=30
        )
        assert not reply.ok and not reply.changed
        assert str(NO_INDEX) in reply.error
        assert await health_status(ch) == "NOT_SERVING"
    value = r.metrics.registry.get_sample_value(
        "semroute_router_reloads_total", {"result": "error"}
    )
    assert value == 1.0


async def test_health_and_reflection_need_no_token() -> None:
    """Probes work without credentials: health answers NOT_SERVING, reflection lists services."""
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    async with (
        running_router(NO_INDEX, load=False, encoder=None, tokens=TOKENS) as r,
        grpc.aio.insecure_channel(r.addr) as ch,
    ):
        assert await health_status(ch) == "NOT_SERVING"
        assert await health_status(ch, "") == "NOT_SERVING"
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        names: set[str] = set()
        async for reply in stub.ServerReflectionInfo(iter([request]), timeout=5):
            names |= {s.name for s in reply.list_services_response.service}
        assert {"semroute.v1.Router", "grpc.health.v1.Health"} <= names


async def test_request_id_is_echoed_or_generated() -> None:
    """The server returns the caller's x-request-id in trailing metadata, or a fresh one."""
    async with (
        running_router(NO_INDEX, load=False, encoder=None) as r,
        grpc.aio.insecure_channel(r.addr) as ch,
    ):
        stub = pb_grpc.RouterStub(ch)
        call = stub.Route(pb.RouteRequest(query="x"), metadata=(("x-request-id", "abc-123"),))
        assert await _code(call) == grpc.StatusCode.UNAVAILABLE
        trailing = dict(await call.trailing_metadata())
        assert trailing["x-request-id"] == "abc-123"
        call = stub.Route(pb.RouteRequest(query="x"))
        await _code(call)
        generated = dict(await call.trailing_metadata())["x-request-id"]
        assert len(generated) == 32 and generated != "abc-123"
    requests = r.metrics.registry.get_sample_value(
        "semroute_router_requests_total", {"method": "Route", "code": "UNAVAILABLE"}
    )
    assert requests == 2.0


async def test_tls_server_accepts_trusting_clients_only(certs: Certs) -> None:
    """With TLS on, a client trusting the CA connects; a plaintext client cannot."""
    settings = router_settings(tls__cert_file=certs.server_cert, tls__key_file=certs.server_key)
    async with running_router(NO_INDEX, settings=settings, load=False, encoder=None) as r:
        creds = channel_credentials(certs.ca)
        async with grpc.aio.secure_channel(r.addr, creds) as ch:
            assert await health_status(ch) == "NOT_SERVING"
        async with grpc.aio.insecure_channel(r.addr) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await health_status(ch)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        wrong_ca = channel_credentials(certs.other_ca)
        async with grpc.aio.secure_channel(r.addr, wrong_ca) as ch:
            with pytest.raises(grpc.aio.AioRpcError):
                await health_status(ch)


async def test_mutual_tls_requires_a_client_certificate_from_the_ca(certs: Certs) -> None:
    """With a client CA configured, only clients presenting a certificate it signed get in."""
    settings = router_settings(
        tls__cert_file=certs.server_cert, tls__key_file=certs.server_key,
        tls__client_ca_file=certs.ca,
    )
    async with running_router(NO_INDEX, settings=settings, load=False, encoder=None) as r:
        good = channel_credentials(certs.ca, certs.client_cert, certs.client_key)
        async with grpc.aio.secure_channel(r.addr, good) as ch:
            assert await health_status(ch) == "NOT_SERVING"
        for creds in (
            channel_credentials(certs.ca),
            channel_credentials(certs.ca, certs.other_client_cert, certs.other_client_key),
        ):
            async with grpc.aio.secure_channel(r.addr, creds) as ch:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await health_status(ch)
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_incomplete_tls_settings_name_the_field(tmp_path: Path) -> None:
    """A key without a certificate, or an unreadable file, is a ConfigError naming the field."""
    from semroute.config import TlsSettings
    from semroute.errors import ConfigError
    from semroute.grpc.tls import server_credentials

    with pytest.raises(ConfigError, match=r"tls\.cert_file is required"):
        server_credentials(TlsSettings(key_file=tmp_path / "k"))
    with pytest.raises(ConfigError, match=r"tls.cert_file: cannot read .*missing.pem"):
        server_credentials(TlsSettings(cert_file=tmp_path / "missing.pem", key_file=tmp_path))
    with pytest.raises(ConfigError, match=r"tls\.client_ca_file needs"):
        server_credentials(TlsSettings(client_ca_file=tmp_path / "ca.pem"))


async def test_router_client_over_mutual_tls_with_token(certs: Certs, small_index: Path) -> None:
    """RouterClient with a CA, a client certificate and a token routes over mTLS; the same
    client without its certificate cannot connect."""
    from semroute.errors import NotReady
    from semroute.grpc.router_client import RouterClient

    settings = router_settings(
        tls__cert_file=certs.server_cert, tls__key_file=certs.server_key,
        tls__client_ca_file=certs.ca,
    )
    tokens = TokenSet.of(user=["tls-user"])
    async with running_router(small_index, settings=settings, tokens=tokens) as r:
        async with RouterClient(r.addr, token="tls-user", tls_ca=certs.ca,
                                tls_cert=certs.client_cert, tls_key=certs.client_key) as client:
            decision = await client.route("Hi there, how are you doing?")
            assert decision.route == "chitchat"
        async with RouterClient(r.addr, token="tls-user", tls_ca=certs.ca, timeout=5) as client:
            with pytest.raises(NotReady):
                await client.route("Hi there")


async def test_sync_router_client_over_mutual_tls_with_token(certs: Certs,
                                                            small_index: Path) -> None:
    """SyncRouterClient (the blocking client) with a CA, a client certificate and a token
    routes over mTLS; without the token the server's Unauthenticated comes back."""
    import asyncio

    from semroute.errors import Unauthenticated
    from semroute.grpc.router_client import SyncRouterClient

    settings = router_settings(
        tls__cert_file=certs.server_cert, tls__key_file=certs.server_key,
        tls__client_ca_file=certs.ca,
    )
    tokens = TokenSet.of(user=["tls-user"])
    async with running_router(small_index, settings=settings, tokens=tokens) as r:
        def use(token: str | None) -> str:
            with SyncRouterClient(r.addr, token=token, tls_ca=certs.ca, timeout=10,
                                  tls_cert=certs.client_cert, tls_key=certs.client_key) as c:
                return c.route("Hi there, how are you doing?").route

        assert await asyncio.to_thread(use, "tls-user") == "chitchat"
        with pytest.raises(Unauthenticated):
            await asyncio.to_thread(use, None)
