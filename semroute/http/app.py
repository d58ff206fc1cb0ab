"""The OpenAI-compatible HTTP front door of the dispatcher.

An application that already speaks the OpenAI chat API switches to semroute by changing its base
URL. Routes::

    POST /v1/chat/completions   streaming (SSE ``chat.completion.chunk`` events, then ``[DONE]``)
                                or not (one ``chat.completion`` object)
    GET  /v1/models             ``auto`` plus every configured target
    GET  /v1/models/{id}
    GET  /healthz               liveness, no auth

``model: "auto"`` lets the router decide; a target name forces that target; any other name is a
404. The decision travels in response headers (``x-semroute-route``, ``-target``,
``-confidence``, ``-fallback``) and in an extra ``semroute`` object in the final chunk / the
response, next to OpenAI's ``usage`` (plus ``cost_usd``). A request header
``x-semroute-ab-key`` (at most 256 characters) names the key of an A/B split in the router
(default: the tenant).

The door holds no routing logic: PII rules, fallback, breaker and the commit point all live in the
``Dispatcher``. What the door adds is the HTTP side of the commit point: a stream's status line and
headers are sent only once the first token (or the end) has arrived, so every failure before the
commit point is a proper HTTP error (502/503/504/429...); a failure after it ends the stream with
an OpenAI ``{"error": ...}`` event and no ``[DONE]``, and nothing already sent is repeated.

The HTTP server is uvicorn running inside the caller's event loop (the one the gRPC server uses):
``start_http_door(dispatcher, settings, port)`` returns a handle with ``.port`` and ``stop()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from semroute.auth import TokenSet, parse_bearer
from semroute.config import Settings
from semroute.dispatch.dispatcher import AB_KEY_HEADER, Dispatcher
from semroute.dispatch.stats import snapshot
from semroute.dispatch.validate import ChatLimits, echo
from semroute.errors import (
    ConfigError,
    InvalidRequest,
    ModelNotFound,
    NotFound,
    PayloadTooLarge,
    PermissionDenied,
    SemrouteError,
    ShuttingDown,
    StreamInterrupted,
    TenantLimited,
    UnsupportedMediaType,
)
from semroute.grpc.router_service import check_ab_key
from semroute.http.dashboard import page
from semroute.http.openai import (
    AUTO_MODEL,
    ERROR_TYPES,
    ParsedChat,
    check_bearer,
    decision_headers,
    error_body,
    error_status,
    parse_chat_body,
    parse_feedback_body,
    parse_json_body,
    semroute_field,
    sse,
    usage_field,
)
from semroute.logs import bind_request_id, clean_request_id, get_logger, reset_request_id
from semroute.types import (
    ChatEvent,
    ChatRequest,
    DecisionEvent,
    DeltaEvent,
    DoneEvent,
)

log = get_logger(__name__)
_T = TypeVar("_T")

# The page runs only its own inline script and talks only to this door.
DASHBOARD_HEADERS = {
    "content-security-policy": "default-src 'none'; script-src 'unsafe-inline'; "
    "style-src 'unsafe-inline'; connect-src 'self'; form-action 'none'",
    "cache-control": "no-store",
    "x-content-type-options": "nosniff",
}

# Media types a chat body may declare (parameters such as charset are ignored); none at all is
# taken as JSON too, as OpenAI's API does.
JSON_TYPES = ("application/json",)


class ChatService(Protocol):
    """What the door needs from the dispatcher (``semroute.dispatch.dispatcher.Dispatcher`` fits)."""

    def chat(self, req: ChatRequest, *, ab_key: str = "") -> AsyncIterator[ChatEvent]: ...

    def target_names(self) -> list[str]: ...

    async def feedback(
        self, request_id: str, score: float, target: str | None = None,
        comment: str | None = None,
    ) -> None: ...


def _error_response(exc: BaseException, request_id: str) -> JSONResponse:
    status = error_status(exc)
    headers = {"x-request-id": request_id}
    decision = getattr(exc, "semroute_decision", None)
    if isinstance(decision, DecisionEvent):
        # Failed after routing (every target failed before its first token): say where it went.
        headers.update(decision_headers(decision, request_id))
    if status == 401:
        headers["www-authenticate"] = "Bearer"
    retry_after = getattr(exc, "retry_after_s", None)
    if isinstance(exc, TenantLimited) and retry_after is not None:
        headers["retry-after"] = str(max(1, math.ceil(retry_after)))
    return JSONResponse(error_body(exc, status), status_code=status, headers=headers)


# ---- the app ------------------------------------------------------------------------------------


class HttpDoor:
    """The Starlette app around a dispatcher (build it apart from running it)."""

    def __init__(self, dispatcher: ChatService, settings: Settings) -> None:
        self._dispatcher = dispatcher
        self._tokens = TokenSet.from_settings(settings.auth)
        self._limits = ChatLimits.from_settings(settings.limits)
        self._max_body = settings.limits.max_body_bytes
        self._max_depth = settings.limits.max_json_depth
        self.draining = False
        self.app = Starlette(
            routes=[
                Route("/v1/chat/completions", self._chat, methods=["POST"]),
                Route("/v1/feedback", self._feedback, methods=["POST"]),
                Route("/v1/models", self._models, methods=["GET"]),
                Route("/v1/models/{model:path}", self._model, methods=["GET"]),
                Route("/healthz", self._health, methods=["GET"]),
                Route("/dashboard", self._dashboard_page, methods=["GET"]),
                Route("/dashboard/data", self._dashboard_data, methods=["GET"]),
            ],
            exception_handlers={HTTPException: self._http_error},  # type: ignore[dict-item]
        )

    @property
    def auth_enabled(self) -> bool:
        return self._tokens.enabled

    async def _health(self, request: Request) -> Response:
        if self.draining:
            return JSONResponse({"status": "shutting_down"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def _dashboard_page(self, request: Request) -> Response:
        """The page holds no data (it asks /dashboard/data with the operator's token)."""
        return HTMLResponse(page(), headers=DASHBOARD_HEADERS)

    async def _dashboard_data(self, request: Request) -> Response:
        return await self._guarded(request, self._dashboard_snapshot)

    async def _dashboard_snapshot(self, request: Request, request_id: str) -> Response:
        """Every tenant's spend: admin tokens only (when auth is on)."""
        token = parse_bearer(request.headers.get("authorization")) or ""
        if self._tokens.enabled and self._tokens.role(token) != "admin":
            raise PermissionDenied("the dashboard's data needs an admin token (auth.admin_tokens)")
        d = self._dispatcher
        if not isinstance(d, Dispatcher):
            raise NotFound("this door's dispatcher keeps no dashboard data")
        data = await snapshot(d.metrics, d.ledger, d.backends)
        return JSONResponse(data, headers={"cache-control": "no-store"})

    async def _http_error(self, request: Request, exc: HTTPException) -> Response:
        """Starlette's own 404/405 in OpenAI's error shape."""
        body = {
            "error": {
                "message": f"{request.method} {request.url.path}: {exc.detail}",
                "type": ERROR_TYPES.get(exc.status_code, "server_error"),
                "param": None,
                "code": None,
            }
        }
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    def _model_list(self) -> list[dict[str, Any]]:
        names = [AUTO_MODEL, *self._dispatcher.target_names()]
        return [{"id": n, "object": "model", "created": 0, "owned_by": "semroute"} for n in names]

    async def _models(self, request: Request) -> Response:
        return await self._guarded(request, self._list_models)

    async def _list_models(self, request: Request, request_id: str) -> Response:
        return JSONResponse({"object": "list", "data": self._model_list()})

    async def _model(self, request: Request) -> Response:
        return await self._guarded(request, self._one_model)

    async def _one_model(self, request: Request, request_id: str) -> Response:
        name = request.path_params["model"]
        for entry in self._model_list():
            if entry["id"] == name:
                return JSONResponse(entry)
        raise ModelNotFound("model", f"the model {echo(name)} does not exist here")

    async def _chat(self, request: Request) -> Response:
        return await self._guarded(request, self._chat_completions)

    async def _feedback(self, request: Request) -> Response:
        return await self._guarded(request, self._record_feedback)

    async def _record_feedback(self, request: Request, request_id: str) -> Response:
        """``{"request_id", "score" in [0, 1], "target"?, "comment"?}`` -> 200 ``{"ok": true}``;
        an unknown id is 404, a bad field 400 naming it."""
        body = parse_json_body(await self._read_body(request), self._max_depth)
        rid, score, target, comment = parse_feedback_body(body)
        await self._dispatcher.feedback(rid, score, target, comment)
        return JSONResponse({"ok": True, "request_id": rid}, headers={"x-request-id": request_id})

    async def _guarded(
        self, request: Request, handler: Callable[[Request, str], Awaitable[Response]]
    ) -> Response:
        """Request id, auth, and the error mapping shared by every authenticated route."""
        request_id = clean_request_id(request.headers.get("x-request-id"))
        token = bind_request_id(request_id)
        try:
            request.state.tenant = check_bearer(
                request.headers.get("authorization"), self._tokens
            )
            return await handler(request, request_id)
        except (_ClientGone, ClientDisconnect):
            log.info("http_client_gone", path=request.url.path)
            return Response(status_code=499)  # nobody reads it; nginx's "client closed request"
        except SemrouteError as exc:
            log.info("http_error", path=request.url.path, status=error_status(exc), error=str(exc))
            return _error_response(exc, request_id)
        except Exception as exc:
            log.exception("http_internal_error", path=request.url.path)
            return _error_response(exc, request_id)
        finally:
            reset_request_id(token)

    async def _chat_completions(self, request: Request, request_id: str) -> Response:
        if self.draining:
            raise ShuttingDown("the server is shutting down; retry on another replica")
        ab_key = request.headers.get(AB_KEY_HEADER, "")
        check_ab_key(ab_key, AB_KEY_HEADER)
        raw = await self._read_body(request)
        body = parse_json_body(raw, self._max_depth)
        parsed = parse_chat_body(
            body, self._dispatcher.target_names(), request_id, self._limits
        )
        chat = dataclasses.replace(parsed.request, tenant=request.state.tenant)
        events = aiter(self._dispatcher.chat(chat, ab_key=ab_key))
        handed_over = False
        try:
            decision, pending = await _unless_client_leaves(request, _until_commit(events))
            if parsed.stream:
                handed_over = True  # the response body closes the events from now on
                return StreamingResponse(
                    self._sse_body(events, decision, pending, parsed, request_id),
                    media_type="text/event-stream",
                    headers={**decision_headers(decision, request_id), "cache-control": "no-cache"},
                )
            return await _unless_client_leaves(
                request, _complete(events, decision, pending, request_id)
            )
        finally:
            if not handed_over:
                await _aclose(events)

    async def _read_body(self, request: Request) -> bytes:
        """The body, refused before it is read when its declared type is not JSON (415) or its
        declared length is over ``limits.max_body_bytes`` (413), and counted while it streams in
        (a chunked body stops at the limit: 413, the rest is never buffered)."""
        declared_type = request.headers.get("content-type")
        if declared_type is not None:
            media = declared_type.split(";", 1)[0].strip().lower()
            if media not in JSON_TYPES and not media.endswith("+json"):
                raise UnsupportedMediaType(
                    "content-type",
                    f"the body must be JSON (Content-Type: application/json), got "
                    f"{echo(declared_type)}",
                )
        limit = self._max_body
        length = request.headers.get("content-length")
        if length is not None:
            if not length.strip().isdigit():
                raise InvalidRequest("content-length", f"not a number: {echo(length)}")
            if int(length) > limit:
                raise PayloadTooLarge(
                    "body", f"{int(length)} bytes is over the limit of {limit} bytes "
                    "(limits.max_body_bytes)",
                )
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(
                    "body", f"over the limit of {limit} bytes (limits.max_body_bytes)"
                )
            chunks.append(chunk)
        return b"".join(chunks)

    async def _sse_body(
        self,
        events: AsyncIterator[ChatEvent],
        decision: DecisionEvent,
        pending: list[ChatEvent],
        parsed: ParsedChat,
        request_id: str,
    ) -> AsyncIterator[bytes]:
        # Runs after the endpoint returned: bind the request id again for these log lines.
        token = bind_request_id(request_id)
        base = {
            "id": f"chatcmpl-{request_id}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": decision.target,
        }

        def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            return {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

        def encode(event: ChatEvent) -> bytes:
            if isinstance(event, DeltaEvent):
                return sse(chunk({"content": event.text}))
            if not isinstance(event, DoneEvent):
                return b""
            extra = {"usage": usage_field(event), "semroute": semroute_field(decision, event)}
            if parsed.include_usage:
                # OpenAI's layout: usage rides on an extra chunk with empty choices.
                parts = [sse(chunk({}, event.finish_reason)), sse({**base, "choices": [], **extra})]
            else:
                parts = [sse({**chunk({}, event.finish_reason), **extra})]
            return b"".join([*parts, sse("[DONE]")])

        try:
            # The role chunk and what arrived by the commit point leave in one write: the first
            # text reaches the client a send earlier (a cache hit's whole answer, often).
            yield b"".join([sse(chunk({"role": "assistant", "content": ""})),
                            *(encode(e) for e in pending)])
            if any(isinstance(e, DoneEvent) for e in pending):
                return
            async for event in events:
                data = encode(event)
                if data:
                    yield data
                if isinstance(event, DoneEvent):
                    return
            raise StreamInterrupted(decision.target, "dispatcher stream ended without a done event")
        except SemrouteError as exc:
            # After the commit point: end with an error event; no [DONE], nothing repeated.
            log.warning("http_stream_failed", error=str(exc), status=error_status(exc))
            yield sse(error_body(exc))
        except Exception as exc:
            log.exception("http_stream_internal_error")
            yield sse(error_body(exc, 500))
        finally:
            await _aclose(events)
            # If the client left, the loop's async-generator finalizer closes us in another
            # context, where the token cannot be reset (and need not be).
            with contextlib.suppress(ValueError):
                reset_request_id(token)


class _ClientGone(Exception):
    """The client closed the connection while we were waiting for the backend."""


async def _wait_for_disconnect(request: Request) -> None:
    # Once the body is read, the ASGI receive() only returns when the client disconnects.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_client_leaves(request: Request, work: Awaitable[_T]) -> _T:
    """Run ``work`` but cancel it as soon as the client disconnects (raising _ClientGone), so a
    caller who gave up does not keep a backend busy; cancellation closes the upstream request."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        raise _ClientGone
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


async def _until_commit(events: AsyncIterator[ChatEvent]) -> tuple[DecisionEvent, list[ChatEvent]]:
    """Read the decision and everything up to the first delta (the commit point) or the done
    event. Every error raised meanwhile is a pre-commit error the client gets as an HTTP status."""
    first = await anext(events, None)
    if not isinstance(first, DecisionEvent):
        raise SemrouteError(f"dispatcher protocol: expected a decision event first, got {first!r}")
    pending: list[ChatEvent] = []
    try:
        async for event in events:
            pending.append(event)
            if isinstance(event, DeltaEvent | DoneEvent):
                break
    except SemrouteError as exc:
        exc.semroute_decision = first  # type: ignore[attr-defined]
        raise
    return first, pending


async def _chain(
    pending: list[ChatEvent], events: AsyncIterator[ChatEvent]
) -> AsyncIterator[ChatEvent]:
    for event in pending:
        yield event
    async for event in events:
        yield event


async def _complete(
    events: AsyncIterator[ChatEvent],
    decision: DecisionEvent,
    pending: list[ChatEvent],
    request_id: str,
) -> Response:
    text: list[str] = []
    async for event in _chain(pending, events):
        if isinstance(event, DeltaEvent):
            text.append(event.text)
        elif isinstance(event, DoneEvent):
            body = {
                "id": f"chatcmpl-{request_id}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": event.target,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "".join(text)},
                        "finish_reason": event.finish_reason,
                        "logprobs": None,
                    }
                ],
                "usage": usage_field(event),
                "semroute": semroute_field(decision, event),
            }
            return JSONResponse(body, headers=decision_headers(decision, request_id))
    raise StreamInterrupted(decision.target, "dispatcher stream ended without a done event")


async def _aclose(events: AsyncIterator[ChatEvent]) -> None:
    close = getattr(events, "aclose", None)
    if close is not None:
        await close()


# ---- running it ---------------------------------------------------------------------------------


class _EmbeddedServer(uvicorn.Server):
    """uvicorn inside someone else's event loop: the host process owns the signals."""

    def install_signal_handlers(self) -> None:  # uvicorn < 0.29
        pass

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:  # uvicorn >= 0.29
        yield


@dataclass
class HttpDoorHandle:
    """A running door: ``port`` it listens on, ``stop()`` to drain and close it."""

    host: str
    port: int
    door: HttpDoor
    _server: uvicorn.Server
    _task: asyncio.Task[None]

    @property
    def base_url(self) -> str:
        """What an OpenAI client takes as ``base_url``."""
        return f"http://{self.host}:{self.port}/v1"

    def begin_drain(self) -> None:
        """``/healthz`` answers 503 and new chats are refused (ShuttingDown) from now on."""
        self.door.draining = True

    async def stop(self, grace_s: float = 5.0) -> None:
        """Stop accepting, let in-flight requests finish for up to ``grace_s``, then close
        (whatever is still open is cancelled then)."""
        self.begin_drain()
        self._server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self._task), grace_s)
        except TimeoutError:
            self._server.force_exit = True
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


async def start_http_door(
    dispatcher: ChatService,
    settings: Settings,
    port: int,
    host: str | None = None,
    *,
    grace_s: float = 5.0,
) -> HttpDoorHandle:
    """Serve the door on ``host`` (default ``settings.dispatcher.host``) and ``port`` (0 = a free
    one) in the running event loop. Returns once the socket accepts connections. Raises
    ConfigError when the address cannot be bound."""
    host = host or settings.dispatcher.host
    door = HttpDoor(dispatcher, settings)
    # Bind here rather than in uvicorn: a bind failure inside uvicorn is sys.exit(1).
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Accepted connections inherit this. Without it Nagle + delayed ACK hold back the body
        # of every response by a delayed-ACK timeout (uvicorn writes headers and body apart);
        # scripts/bench_http_door.py shows the door's overhead with it.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"HTTP door cannot listen on {host}:{port} (dispatcher.http_port): {exc.strerror}"
        ) from exc
    config = uvicorn.Config(
        door.app,
        lifespan="off",
        log_config=None,
        access_log=False,
        server_header=False,
        timeout_graceful_shutdown=math.ceil(grace_s),
    )
    server = _EmbeddedServer(config)
    task = asyncio.create_task(server.serve(sockets=[sock]), name="semroute-http-door")
    while not server.started:
        if task.done():
            sock.close()
            task.result()  # re-raise what stopped it
            raise ConfigError(f"HTTP door on {host}:{port} stopped while starting")
        await asyncio.sleep(0.01)
    bound = sock.getsockname()[1]
    log.info("http_door_started", host=host, port=bound, auth=door.auth_enabled)
    return HttpDoorHandle(host, bound, door, server, task)
