"""Clients of the router service.

``RouterClient`` is async (grpc.aio) and is what services such as the dispatcher use.
``SyncRouterClient`` is a thin blocking wrapper for scripts and the CLI: it runs the async client
on a private event loop, so both share one implementation. Do not use it inside a running event
loop; use ``RouterClient`` there.

Failures come back as ``semroute.errors`` types so callers handle local and remote routing the
same way: INVALID_ARGUMENT -> InvalidRequest or UnknownTarget (with the field the server named),
UNAUTHENTICATED -> Unauthenticated, PERMISSION_DENIED -> PermissionDenied, UNAVAILABLE ->
NoTargetAvailable (the policy leaves no target) or NotReady (no index, server down), anything
else -> SemrouteError. The server names the error class in the ``semroute-error`` trailing
metadata, which is how the subclasses are told apart. The original ``grpc.aio.AioRpcError`` is
the ``__cause__`` and its status code is kept as ``.grpc_code`` on the raised error.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc

from semroute._proto.semroute.v1 import router_pb2 as pb
from semroute._proto.semroute.v1 import router_pb2_grpc as pb_grpc
from semroute.errors import (
    InvalidRequest,
    NoTargetAvailable,
    NotReady,
    PermissionDenied,
    SemrouteError,
    Unauthenticated,
    UnknownTarget,
)
from semroute.grpc import convert
from semroute.grpc.server_common import channel_credentials
from semroute.logs import REQUEST_ID_HEADER, get_request_id
from semroute.types import Decision, IndexInfo, Policy, Query

ERROR_TYPE_KEY = "semroute-error"  # same key as semroute.grpc.router_service.ERROR_TYPE_KEY

_NO_POLICY = Policy()

class ReloadFailed(SemrouteError):
    """The server could not load the requested index; the previous one keeps serving."""


def _error_type(exc: grpc.aio.AioRpcError) -> str | None:
    for key, value in exc.trailing_metadata() or ():
        if key == ERROR_TYPE_KEY:
            return str(value)
    return None


def _error_from_rpc(addr: str, exc: grpc.aio.AioRpcError) -> SemrouteError:
    code = exc.code()
    details = exc.details() or ""
    err: SemrouteError
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        field, sep, message = details.partition(": ")
        kind = UnknownTarget if _error_type(exc) == "UnknownTarget" else InvalidRequest
        err = kind(field, message) if sep else kind("request", details)
    elif code == grpc.StatusCode.UNAUTHENTICATED:
        err = Unauthenticated(f"router at {addr}: {details}")
    elif code == grpc.StatusCode.PERMISSION_DENIED:
        err = PermissionDenied(f"router at {addr}: {details}")
    elif code == grpc.StatusCode.UNAVAILABLE and _error_type(exc) == "NoTargetAvailable":
        err = NoTargetAvailable(f"router at {addr}: {details}")
    elif code == grpc.StatusCode.UNAVAILABLE:
        err = NotReady(f"router at {addr} unavailable: {details}")
    else:
        err = SemrouteError(f"router at {addr}: {code.name}: {details}")
    err.grpc_code = code  # type: ignore[attr-defined]
    return err


class RouterClient:
    """Async client of ``semroute.v1.Router``. Use as ``async with RouterClient(addr) as c``.

    ``token``: bearer token sent on every call. ``tls_ca``: CA file to verify the server (TLS on
    when given); ``tls_cert``/``tls_key``: client certificate for mutual TLS. ``timeout``: per-call
    deadline in seconds. The current request id (``semroute.logs``), if any, is forwarded as
    ``x-request-id``.
    """

    def __init__(
        self,
        addr: str,
        *,
        token: str | None = None,
        tls_ca: Path | None = None,
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
        timeout: float = 5.0,
    ) -> None:
        self.addr = addr
        self.timeout = timeout
        self._token = token
        if tls_ca is not None or tls_cert is not None:
            creds = channel_credentials(tls_ca, tls_cert, tls_key)
            self._channel = grpc.aio.secure_channel(addr, creds)
        else:
            self._channel = grpc.aio.insecure_channel(addr)
        self.stub = pb_grpc.RouterStub(self._channel)  # type: ignore[no-untyped-call]

    async def __aenter__(self) -> RouterClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    def _metadata(self) -> list[tuple[str, str]]:
        md = []
        if self._token:
            md.append(("authorization", f"Bearer {self._token}"))
        rid = get_request_id()
        if rid:
            md.append((REQUEST_ID_HEADER, rid))
        return md

    async def _call(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return await method(
                request, timeout=self.timeout if timeout is None else timeout,
                metadata=self._metadata(),
            )
        except grpc.aio.AioRpcError as exc:
            raise _error_from_rpc(self.addr, exc) from exc

    async def route(
        self,
        text: str,
        *,
        history: Sequence[str] = (),
        policy: Policy = _NO_POLICY,
        explain: bool = False,
        timeout: float | None = None,
    ) -> Decision:
        """Route one query."""
        query = Query(text=text, history=tuple(history), policy=policy, explain=explain)
        reply = await self._call(self.stub.Route, convert.query_to_proto(query), timeout)
        return convert.decision_from_proto(reply)

    async def route_batch(
        self, queries: Sequence[Query], *, timeout: float | None = None
    ) -> list[Decision]:
        """Route several queries in one call; decisions in query order."""
        request = pb.RouteBatchRequest(requests=[convert.query_to_proto(q) for q in queries])
        reply = await self._call(self.stub.RouteBatch, request, timeout)
        return [convert.decision_from_proto(r) for r in reply.responses]

    async def index_info(self, *, timeout: float | None = None) -> IndexInfo:
        """The index now serving."""
        reply = await self._call(self.stub.GetIndexInfo, pb.GetIndexInfoRequest(), timeout)
        return convert.info_from_proto(reply.index)

    async def reload(self, path: str | None = None, *, timeout: float | None = 60.0) -> IndexInfo:
        """Ask the server to reload (its root's ``current``, or ``path``). Needs an admin token.

        Returns the index serving afterwards; raises ReloadFailed with the server's reason when
        the new index was refused (the old one keeps serving).
        """
        reply = await self._call(
            self.stub.ReloadIndex, pb.ReloadIndexRequest(path=path or ""), timeout
        )
        if not reply.ok:
            raise ReloadFailed(f"router at {self.addr} kept index {reply.previous_version!r}: "
                               f"{reply.error}")
        return convert.info_from_proto(reply.index)


class SyncRouterClient:
    """Blocking wrapper over ``RouterClient`` (same arguments, same errors)."""

    def __init__(
        self,
        addr: str,
        *,
        token: str | None = None,
        tls_ca: Path | None = None,
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
        timeout: float = 5.0,
    ) -> None:
        self._runner = asyncio.Runner()
        # The aio channel must be created on the loop that will use it.
        self._client: RouterClient = self._runner.run(
            self._open(addr, token, tls_ca, tls_cert, tls_key, timeout)
        )

    @staticmethod
    async def _open(
        addr: str, token: str | None, tls_ca: Path | None, tls_cert: Path | None,
        tls_key: Path | None, timeout: float,
    ) -> RouterClient:
        return RouterClient(addr, token=token, tls_ca=tls_ca, tls_cert=tls_cert,
                            tls_key=tls_key, timeout=timeout)

    def __enter__(self) -> SyncRouterClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        try:
            self._runner.run(self._client.close())
        finally:
            self._runner.close()

    def route(
        self,
        text: str,
        *,
        history: Sequence[str] = (),
        policy: Policy = _NO_POLICY,
        explain: bool = False,
        timeout: float | None = None,
    ) -> Decision:
        return self._runner.run(
            self._client.route(text, history=history, policy=policy, explain=explain,
                               timeout=timeout)
        )

    def route_batch(self, queries: list[Query], *, timeout: float | None = None) -> list[Decision]:
        return self._runner.run(self._client.route_batch(queries, timeout=timeout))

    def index_info(self, *, timeout: float | None = None) -> IndexInfo:
        return self._runner.run(self._client.index_info(timeout=timeout))

    def reload(self, path: str | None = None, *, timeout: float | None = 60.0) -> IndexInfo:
        return self._runner.run(self._client.reload(path, timeout=timeout))
