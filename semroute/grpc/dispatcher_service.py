"""The ``semroute.v1.Dispatcher`` gRPC service: a thin translation around ``Dispatcher.chat``.

Proto request -> ``ChatRequest``; each ``ChatEvent`` -> one streamed message; a ``SemrouteError``
-> the status from ``semroute.errors.grpc_status_name`` with the error's message. The servicer
writes with ``context.write`` from a coroutine (not an async generator) while the chat runs in a
task of its own: when the client cancels or its deadline passes, the CancelledError lands in the
servicer, which cancels that task, and the chat, and with it the upstream HTTP request, is closed
before the handler returns.

The call's ``x-semroute-ab-key`` metadata (at most 256 characters, else INVALID_ARGUMENT naming
it) is the client's A/B key (``Dispatcher.chat``'s ``ab_key``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health

from semroute._proto.semroute.v1 import dispatcher_pb2 as pb
from semroute._proto.semroute.v1 import dispatcher_pb2_grpc as pb_grpc
from semroute.auth import TokenSet, parse_bearer
from semroute.config import Settings
from semroute.dispatch.dispatcher import AB_KEY_HEADER, Dispatcher
from semroute.errors import InvalidRequest, SemrouteError
from semroute.grpc.convert import event_to_proto, request_from_proto
from semroute.grpc.errors import abort
from semroute.grpc.interceptors import standard_interceptors
from semroute.grpc.router_service import check_ab_key
from semroute.grpc.server import (
    SERVER_OPTIONS,
    add_health_and_reflection,
    bind_port,
    set_serving,
)
from semroute.grpc.tls import server_credentials
from semroute.logs import get_logger
from semroute.types import (
    ChatRequest,
)

log = get_logger("semroute.grpc.dispatcher")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Dispatcher"].full_name


_END = object()


class DispatcherServicer(pb_grpc.DispatcherServicer):
    def __init__(self, dispatcher: Dispatcher, tokens: TokenSet | None = None) -> None:
        self._dispatcher = dispatcher
        self._tokens = tokens if tokens is not None else TokenSet()

    def _tenant(self, context: grpc.aio.ServicerContext) -> str:
        """The tenant of the call's bearer token (the auth interceptor already checked it);
        "" when auth is off."""
        if not self._tokens.enabled:
            return ""
        for key, value in context.invocation_metadata() or ():
            if key == "authorization" and isinstance(value, str):
                token = parse_bearer(value)
                return (self._tokens.tenant(token) or "") if token else ""
        return ""

    async def Feedback(
        self, request: pb.FeedbackRequest, context: grpc.aio.ServicerContext
    ) -> pb.FeedbackResponse:
        try:
            if not request.HasField("score"):
                raise InvalidRequest("score", "required: a number in [0, 1]")
            await self._dispatcher.feedback(
                request.request_id, request.score,
                request.target if request.HasField("target") else None,
                request.comment if request.HasField("comment") else None,
            )
        except SemrouteError as exc:
            await abort(context, exc)
        return pb.FeedbackResponse(ok=True)

    async def Chat(self, request: pb.ChatRequest, context: grpc.aio.ServicerContext) -> None:
        req = dataclasses.replace(request_from_proto(request), tenant=self._tenant(context))
        ab_key = _metadata_value(context, AB_KEY_HEADER)
        try:
            check_ab_key(ab_key, AB_KEY_HEADER)
        except SemrouteError as exc:
            await abort(context, exc)
        # The chat runs in its own task and hands events over a queue, so the backend request
        # starts while the decision is still being written to the client (it saves the
        # decision's write time from the time to first token).
        queue: asyncio.Queue[object] = asyncio.Queue()
        # The client's deadline bounds the time to first token across the whole chain.
        producer = asyncio.create_task(
            self._produce(req, queue, context.time_remaining(), ab_key)
        )
        try:
            while (event := await queue.get()) is not _END:
                await context.write(event_to_proto(event))  # type: ignore[arg-type]
            await producer  # re-raises the chat's error, if any
        except SemrouteError as exc:
            await abort(context, exc)
        except (grpc.aio.AbortError, asyncio.CancelledError):
            raise
        except Exception:
            log.exception("chat_failed", request_id=req.request_id)
            await context.abort(
                grpc.StatusCode.INTERNAL,
                f"internal error in the dispatcher (request id {req.request_id}); see its log",
            )
        finally:
            if not producer.done():
                # Client gone or deadline passed: cancelling the chat closes the upstream HTTP
                # request before this handler returns.
                producer.cancel()
                await asyncio.gather(producer, return_exceptions=True)

    async def _produce(
        self, req: ChatRequest, queue: asyncio.Queue[object], deadline_s: float | None,
        ab_key: str,
    ) -> None:
        try:
            async with contextlib.aclosing(
                self._dispatcher.chat(req, deadline_s=deadline_s, ab_key=ab_key)
            ) as events:
                async for event in events:
                    queue.put_nowait(event)
        finally:
            queue.put_nowait(_END)


def _metadata_value(context: grpc.aio.ServicerContext, key: str) -> str:
    """The call's metadata value for ``key`` ("" when absent or binary)."""
    for name, value in context.invocation_metadata() or ():
        if name == key and isinstance(value, str):
            return value
    return ""


@dataclass
class DispatcherServer:
    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer


async def build_dispatcher_server(
    settings: Settings,
    dispatcher: Dispatcher,
    *,
    host: str | None = None,
    port: int | None = None,
    tokens: TokenSet | None = None,
    extra_interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
) -> DispatcherServer:
    """Build (not start) the server; health is SERVING for the dispatcher already (it is ready
    as soon as it exists). Auth from ``settings.auth``, TLS from ``settings.tls``."""
    ds = settings.dispatcher
    host = host if host is not None else ds.host
    port = port if port is not None else ds.port
    tokens = tokens if tokens is not None else TokenSet.from_settings(settings.auth)
    credentials = server_credentials(settings.tls)
    server = grpc.aio.server(
        interceptors=[
            *standard_interceptors(tokens, on_done=dispatcher.metrics.rpc.observe),
            *extra_interceptors,
        ],
        options=[("grpc.so_reuseport", 0), *SERVER_OPTIONS],
    )
    health_servicer = await add_health_and_reflection(server, [SERVICE_NAME])
    pb_grpc.add_DispatcherServicer_to_server(  # type: ignore[no-untyped-call]
        DispatcherServicer(dispatcher, tokens), server
    )
    bound = bind_port(server, f"{host}:{port}", credentials, "dispatcher.port")
    await set_serving(health_servicer, [SERVICE_NAME], True)
    log.info("dispatcher server created", address=f"{host}:{bound}", tls=credentials is not None)
    return DispatcherServer(server, bound, health_servicer)


async def create_dispatcher_server(
    settings: Settings, dispatcher: Dispatcher, **kwargs: object
) -> tuple[grpc.aio.Server, int]:
    """Build (not start) a dispatcher server on ``settings.dispatcher.host:port`` (``port=0``
    keyword: any free port). Returns the server and the bound port; ``await server.start()``,
    and ``await server.stop(grace)`` then ``await dispatcher.aclose()`` at the end."""
    built = await build_dispatcher_server(settings, dispatcher, **kwargs)  # type: ignore[arg-type]
    return built.server, built.port
