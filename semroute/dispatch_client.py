"""Async client of the ``semroute.v1.Dispatcher`` gRPC service (CLI, tests, benchmarks).

``DispatcherClient.chat(req)`` yields the same ``ChatEvent`` records as ``Dispatcher.chat``;
a failed call raises the ``semroute.errors`` type matching its status (UNAVAILABLE ->
NoTargetAvailable, ABORTED -> StreamInterrupted, INVALID_ARGUMENT -> InvalidRequest, ...), with
the server's message and the ``grpc.aio.AioRpcError`` as ``__cause__``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from types import TracebackType

import grpc

from semroute._proto.semroute.v1 import dispatcher_pb2_grpc as pb_grpc
from semroute.errors import (
    BackendRateLimited,
    BackendRejected,
    BackendTimeout,
    InvalidRequest,
    NoTargetAvailable,
    NotReady,
    PermissionDenied,
    SemrouteError,
    StreamInterrupted,
    Unauthenticated,
)
from semroute.grpc.dispatcher_service import event_from_proto, request_to_proto
from semroute.grpc.server_common import channel_credentials
from semroute.logs import REQUEST_ID_HEADER, get_request_id
from semroute.types import ChatEvent, ChatRequest


def error_from_rpc(addr: str, exc: grpc.aio.AioRpcError) -> SemrouteError:
    """Our error type for a failed Chat call (the inverse of ``grpc_status_name``)."""
    code = exc.code()
    details = exc.details() or ""
    where = f"dispatcher at {addr}"
    err: SemrouteError
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        field, sep, message = details.partition(": ")
        err = InvalidRequest(field, message) if sep else InvalidRequest("request", details)
    elif code == grpc.StatusCode.UNAUTHENTICATED:
        err = Unauthenticated(f"{where}: {details}")
    elif code == grpc.StatusCode.PERMISSION_DENIED:
        err = PermissionDenied(f"{where}: {details}")
    elif code == grpc.StatusCode.UNAVAILABLE:
        if details.startswith(("no target", "router at")):
            err = (
                NoTargetAvailable(details) if details.startswith("no target") else NotReady(details)
            )
        else:
            err = NotReady(f"{where} unavailable: {details}")
    elif code == grpc.StatusCode.ABORTED:
        err = StreamInterrupted("?", details)
    elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
        err = BackendTimeout("?", details or "deadline exceeded")
    elif code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        err = BackendRateLimited("?", details)
    elif code == grpc.StatusCode.FAILED_PRECONDITION:
        err = BackendRejected("?", details)
    else:
        err = SemrouteError(f"{where}: {code.name}: {details}")
    err.grpc_code = code  # type: ignore[attr-defined]
    return err


class DispatcherClient:
    """``async with DispatcherClient(addr) as c: async for ev in c.chat(req): ...``"""

    def __init__(
        self,
        addr: str,
        *,
        token: str | None = None,
        tls_ca: Path | None = None,
        timeout: float | None = None,
    ) -> None:
        self.addr = addr
        self.timeout = timeout
        self._token = token
        if tls_ca is not None:
            self._channel = grpc.aio.secure_channel(addr, channel_credentials(tls_ca))
        else:
            self._channel = grpc.aio.insecure_channel(addr)
        self.stub = pb_grpc.DispatcherStub(self._channel)  # type: ignore[no-untyped-call]

    async def __aenter__(self) -> DispatcherClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def chat(
        self, req: ChatRequest, *, timeout: float | None = None
    ) -> AsyncIterator[ChatEvent]:
        """Stream one chat; closing the iterator early cancels the call."""
        metadata = []
        if self._token:
            metadata.append(("authorization", f"Bearer {self._token}"))
        rid = req.request_id or get_request_id()
        if rid:
            metadata.append((REQUEST_ID_HEADER, rid))
        call = self.stub.Chat(
            request_to_proto(req),
            timeout=self.timeout if timeout is None else timeout,
            metadata=metadata,
        )
        try:
            async for msg in call:
                yield event_from_proto(msg)
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(self.addr, exc) from exc
        finally:
            call.cancel()
