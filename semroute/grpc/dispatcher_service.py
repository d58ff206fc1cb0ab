"""The ``semroute.v1.Dispatcher`` gRPC service: a thin translation around ``Dispatcher.chat``.

Proto request -> ``ChatRequest``; each ``ChatEvent`` -> one streamed message; a ``SemrouteError``
-> the status from ``semroute.errors.grpc_status_name`` with the error's message. The servicer
writes with ``context.write`` from a coroutine (not an async generator) while the chat runs in a
task of its own: when the client cancels or its deadline passes, the CancelledError lands in the
servicer, which cancels that task, and the chat, and with it the upstream HTTP request, is closed
before the handler returns.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health

from semroute._proto.semroute.v1 import dispatcher_pb2 as pb
from semroute._proto.semroute.v1 import dispatcher_pb2_grpc as pb_grpc
from semroute.config import Settings
from semroute.dispatcher import Dispatcher
from semroute.errors import SemrouteError, grpc_status_name
from semroute.grpc.server_common import (
    TokenSet,
    add_health_and_reflection,
    bind_port,
    server_credentials,
    set_serving,
    standard_interceptors,
)
from semroute.logs import get_logger, get_request_id
from semroute.types import (
    ChatEvent,
    ChatRequest,
    DecisionEvent,
    DeltaEvent,
    DoneEvent,
    GenerationParams,
    Message,
    RoutingOverrides,
)

log = get_logger("semroute.grpc.dispatcher")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Dispatcher"].full_name


def request_from_proto(msg: pb.ChatRequest) -> ChatRequest:
    p, o = msg.params, msg.overrides
    params = GenerationParams(
        max_tokens=p.max_tokens if p.HasField("max_tokens") else None,
        temperature=p.temperature if p.HasField("temperature") else None,
        top_p=p.top_p if p.HasField("top_p") else None,
        stop=tuple(p.stop),
        seed=p.seed if p.HasField("seed") else None,
    )
    overrides = RoutingOverrides(
        force_target=o.force_target or None,
        allowed_targets=tuple(o.allowed_targets),
        require_local=o.require_local,
        max_cost=o.max_cost if o.HasField("max_cost") else None,
    )
    return ChatRequest(
        messages=tuple(Message(m.role, m.content) for m in msg.messages),
        params=params,
        overrides=overrides,
        request_id=msg.request_id or get_request_id() or "",
    )


def request_to_proto(req: ChatRequest) -> pb.ChatRequest:
    p, o = req.params, req.overrides
    params = pb.GenerationParams(stop=list(p.stop))
    if p.max_tokens is not None:
        params.max_tokens = p.max_tokens
    if p.temperature is not None:
        params.temperature = p.temperature
    if p.top_p is not None:
        params.top_p = p.top_p
    if p.seed is not None:
        params.seed = p.seed
    overrides = pb.RoutingOverrides(
        force_target=o.force_target or "",
        allowed_targets=list(o.allowed_targets),
        require_local=o.require_local,
    )
    if o.max_cost is not None:
        overrides.max_cost = o.max_cost
    return pb.ChatRequest(
        messages=[pb.ChatMessage(role=m.role, content=m.content) for m in req.messages],
        params=params,
        overrides=overrides,
        request_id=req.request_id,
    )


def event_to_proto(event: ChatEvent) -> pb.ChatEvent:
    if isinstance(event, DeltaEvent):
        return pb.ChatEvent(delta=pb.ChatDelta(text=event.text))
    if isinstance(event, DecisionEvent):
        return pb.ChatEvent(
            decision=pb.ChatDecision(
                route=event.route,
                target=event.target,
                confidence=event.confidence,
                reason=event.reason,
                fallback=event.fallback,
                chain=list(event.chain),
            )
        )
    return pb.ChatEvent(
        done=pb.ChatDone(
            finish_reason=event.finish_reason,
            prompt_tokens=event.prompt_tokens,
            completion_tokens=event.completion_tokens,
            cost_usd=event.cost_usd,
            target=event.target,
            attempts=event.attempts,
            ttft_s=event.ttft_s,
        )
    )


def event_from_proto(msg: pb.ChatEvent) -> ChatEvent:
    which = msg.WhichOneof("event")
    if which == "delta":
        return DeltaEvent(msg.delta.text)
    if which == "decision":
        d = msg.decision
        return DecisionEvent(d.route, d.target, d.confidence, d.reason, d.fallback, tuple(d.chain))
    if which == "done":
        e = msg.done
        return DoneEvent(
            e.finish_reason,
            e.prompt_tokens,
            e.completion_tokens,
            e.cost_usd,
            e.target,
            e.attempts,
            e.ttft_s,
        )
    raise SemrouteError(f"ChatEvent without an event (oneof unset): {msg!r}")


_END = object()


class DispatcherServicer(pb_grpc.DispatcherServicer):
    def __init__(self, dispatcher: Dispatcher) -> None:
        self._dispatcher = dispatcher

    async def Chat(self, request: pb.ChatRequest, context: grpc.aio.ServicerContext) -> None:
        req = request_from_proto(request)
        # The chat runs in its own task and hands events over a queue, so the backend request
        # starts while the decision is still being written to the client (it saves the
        # decision's write time from the time to first token).
        queue: asyncio.Queue[object] = asyncio.Queue()
        producer = asyncio.create_task(self._produce(req, queue))
        try:
            while (event := await queue.get()) is not _END:
                await context.write(event_to_proto(event))  # type: ignore[arg-type]
            await producer  # re-raises the chat's error, if any
        except SemrouteError as exc:
            code = getattr(grpc.StatusCode, grpc_status_name(exc))
            await context.abort(code, str(exc))
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

    async def _produce(self, req: ChatRequest, queue: asyncio.Queue[object]) -> None:
        try:
            async with contextlib.aclosing(self._dispatcher.chat(req)) as events:
                async for event in events:
                    queue.put_nowait(event)
        finally:
            queue.put_nowait(_END)


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
        options=[("grpc.so_reuseport", 0)],
    )
    health_servicer = await add_health_and_reflection(server, [SERVICE_NAME])
    pb_grpc.add_DispatcherServicer_to_server(  # type: ignore[no-untyped-call]
        DispatcherServicer(dispatcher), server
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
