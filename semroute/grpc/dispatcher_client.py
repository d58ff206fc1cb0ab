"""Async client of the ``semroute.v1.Dispatcher`` gRPC service (CLI, tests, benchmarks).

``DispatcherClient.chat(req)`` yields the same ``ChatEvent`` records as ``Dispatcher.chat``;
a failed call raises the ``semroute.errors`` class the server raised (``semroute.grpc.errors``),
with the server's message and the ``grpc.aio.AioRpcError`` as ``__cause__``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from types import TracebackType

import grpc

from semroute._proto.semroute.v1 import dispatcher_pb2 as pb
from semroute._proto.semroute.v1 import dispatcher_pb2_grpc as pb_grpc
from semroute.grpc.convert import event_from_proto, request_to_proto
from semroute.grpc.errors import error_from_rpc
from semroute.grpc.tls import call_metadata, open_channel
from semroute.logs import get_request_id
from semroute.types import ChatEvent, ChatRequest


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
        self._channel = open_channel(addr, tls_ca)
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

    async def feedback(
        self, request_id: str, score: float, *, target: str | None = None,
        comment: str | None = None, timeout: float | None = None,
    ) -> None:
        """Score an answer by its request id (raises NotFound / InvalidRequest as the server
        does)."""
        request = pb.FeedbackRequest(request_id=request_id, score=score)
        if target is not None:
            request.target = target
        if comment is not None:
            request.comment = comment
        try:
            await self.stub.Feedback(
                request, timeout=self.timeout if timeout is None else timeout,
                metadata=call_metadata(self._token, get_request_id()),
            )
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(f"dispatcher at {self.addr}", exc) from exc

    async def chat(
        self, req: ChatRequest, *, timeout: float | None = None
    ) -> AsyncIterator[ChatEvent]:
        """Stream one chat; closing the iterator early cancels the call."""
        call = self.stub.Chat(
            request_to_proto(req),
            timeout=self.timeout if timeout is None else timeout,
            metadata=call_metadata(self._token, req.request_id or get_request_id()),
        )
        try:
            async for msg in call:
                yield event_from_proto(msg)
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(f"dispatcher at {self.addr}", exc) from exc
        finally:
            call.cancel()
