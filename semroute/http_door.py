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
response, next to OpenAI's ``usage`` (plus ``cost_usd``).

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
import json
import math
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from semroute.config import Settings
from semroute.errors import (
    HTTP_STATUS,
    BackendError,
    ConfigError,
    InvalidRequest,
    NoTargetAvailable,
    SemrouteError,
    StreamInterrupted,
    Unauthenticated,
    UnknownTarget,
    http_status,
)
from semroute.grpc.server_common import TokenSet
from semroute.logs import bind_request_id, clean_request_id, get_logger, reset_request_id
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

log = get_logger(__name__)
_T = TypeVar("_T")

AUTO_MODEL = "auto"
MAX_BODY_BYTES = 4 * 1024 * 1024
MAX_STOP_SEQUENCES = 4
# OpenAI's "developer" role is its newer name for "system".
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
# OpenAI's error `type` per HTTP status; 5xx fall back to "server_error".
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "permission_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


class ChatService(Protocol):
    """What the door needs from the dispatcher (``semroute.dispatcher.Dispatcher`` fits)."""

    def chat(self, req: ChatRequest) -> AsyncIterator[ChatEvent]: ...

    def target_names(self) -> list[str]: ...


class ModelNotFound(UnknownTarget):
    """``model`` is neither ``auto`` nor a configured target (HTTP 404, as OpenAI does)."""


# ---- errors -------------------------------------------------------------------------------------


def _backend_classes() -> dict[str, type[BackendError]]:
    found: dict[str, type[BackendError]] = {}
    todo: list[type[BackendError]] = [BackendError]
    while todo:
        cls = todo.pop()
        found[cls.__name__] = cls
        todo.extend(cls.__subclasses__())
    return found


def _cause_class(exc: BaseException) -> type[BaseException]:
    """The class that decides status and code. A NoTargetAvailable that carries ``attempts``
    (the dispatcher's DispatchFailed) is judged by its last attempt that reached a backend, so
    "every target timed out" is a 504 and "every target said 429" a 429, not a generic 503."""
    attempts = getattr(exc, "attempts", None)
    if isinstance(exc, NoTargetAvailable) and attempts:
        classes = _backend_classes()
        called = [a for a in attempts if getattr(a, "kind", "") not in ("Skipped", "CircuitOpen")]
        if called:
            return classes.get(str(called[-1].kind), type(exc))
    return type(exc)


def _status_of(cls: type[BaseException]) -> int:
    for base in cls.__mro__:
        if base in HTTP_STATUS:
            return HTTP_STATUS[base]
    return 500


def error_status(exc: BaseException) -> int:
    """HTTP status for an error: 404 for an unknown model; for a failed dispatch the status of
    the last backend failure; else ``semroute.errors.http_status``."""
    if isinstance(exc, ModelNotFound):
        return 404
    cause = _cause_class(exc)
    return _status_of(cause) if cause is not type(exc) else http_status(exc)


def error_body(exc: BaseException, status: int | None = None) -> dict[str, Any]:
    """OpenAI's error object ``{"error": {"message", "type", "param", "code"}}`` for ``exc``."""
    status = error_status(exc) if status is None else status
    param = exc.field if isinstance(exc, InvalidRequest) else None
    if isinstance(exc, ModelNotFound):
        code: str | None = "model_not_found"
    elif isinstance(exc, Unauthenticated):
        code = "invalid_api_key"
    elif isinstance(exc, SemrouteError):
        code = _snake(_cause_class(exc).__name__)
    else:
        code = "internal_error"
    message = str(exc) if isinstance(exc, SemrouteError) else "internal error (see server logs)"
    return {
        "error": {
            "message": message,
            "type": _ERROR_TYPES.get(status, "server_error"),
            "param": param,
            "code": code,
        }
    }


def _snake(name: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in name).lstrip("_")


def _error_response(exc: BaseException, request_id: str) -> JSONResponse:
    status = error_status(exc)
    headers = {"x-request-id": request_id}
    decision = getattr(exc, "semroute_decision", None)
    if isinstance(decision, DecisionEvent):
        # Failed after routing (every target failed before its first token): say where it went.
        headers.update(decision_headers(decision, request_id))
    if status == 401:
        headers["www-authenticate"] = "Bearer"
    return JSONResponse(error_body(exc, status), status_code=status, headers=headers)


# ---- request parsing ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ParsedChat:
    """A validated ``/v1/chat/completions`` body."""

    request: ChatRequest
    model: str
    stream: bool
    include_usage: bool


def parse_chat_body(body: Any, targets: Sequence[str], request_id: str = "") -> ParsedChat:
    """Validate an OpenAI chat body. Raises InvalidRequest naming the JSON field (``param``) or
    ModelNotFound for an unknown ``model``. Unknown extra fields are ignored, as OpenAI-compatible
    servers do; fields whose meaning we cannot honour (``n`` > 1, ``tools``) are refused."""
    if not isinstance(body, dict):
        raise InvalidRequest("body", "must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("model", f"required: {AUTO_MODEL!r} or one of {list(targets)}")
    if model != AUTO_MODEL and model not in targets:
        raise ModelNotFound(
            "model",
            f"the model {model!r} does not exist here; use {AUTO_MODEL!r} to let semroute "
            f"route, or one of {list(targets)}",
        )
    messages = _messages(body.get("messages"))
    stream = _optional(body, "stream", bool) or False
    stream_options = body.get("stream_options")
    include_usage = False
    if stream_options is not None:
        if not isinstance(stream_options, dict):
            raise InvalidRequest("stream_options", "must be an object")
        include_usage = _optional(stream_options, "include_usage", bool, "stream_options.") or False
    n = _optional(body, "n", int)
    if n is not None and n != 1:
        raise InvalidRequest("n", f"only n=1 is supported, got {n}")
    for unsupported in ("tools", "functions"):
        if body.get(unsupported):
            raise InvalidRequest(unsupported, "tool calling is not supported by semroute")
    max_tokens = _optional(body, "max_completion_tokens", int)
    if max_tokens is None:
        max_tokens = _optional(body, "max_tokens", int)
    if max_tokens is not None and max_tokens < 1:
        raise InvalidRequest("max_tokens", f"must be >= 1, got {max_tokens}")
    temperature = _number(body, "temperature", 0.0, 2.0)
    top_p = _number(body, "top_p", 0.0, 1.0)
    seed = _optional(body, "seed", int)
    params = GenerationParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        stop=_stop(body.get("stop")),
        seed=seed,
    )
    overrides = _overrides(body.get("semroute"), None if model == AUTO_MODEL else model, targets)
    request = ChatRequest(messages, params, overrides, request_id)
    return ParsedChat(request, model, stream, include_usage)


def _optional(obj: dict[str, Any], key: str, kind: type, prefix: str = "") -> Any:
    value = obj.get(key)
    if value is None:
        return None
    # bool is an int in Python; JSON true is not a number.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise InvalidRequest(f"{prefix}{key}", f"must be {kind.__name__}, got {value!r}")
    return value


def _number(obj: dict[str, Any], key: str, low: float, high: float) -> float | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise InvalidRequest(key, f"must be a number, got {value!r}")
    if not low <= value <= high:
        raise InvalidRequest(key, f"must be between {low:g} and {high:g}, got {value!r}")
    return float(value)


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise InvalidRequest("stop", "must be a non-empty string or a list of them")
    if len(stops) > MAX_STOP_SEQUENCES:
        raise InvalidRequest("stop", f"at most {MAX_STOP_SEQUENCES} sequences, got {len(stops)}")
    return tuple(stops)


def _messages(value: Any) -> tuple[Message, ...]:
    if not isinstance(value, list) or not value:
        raise InvalidRequest("messages", "required: a non-empty list of {role, content}")
    out: list[Message] = []
    for i, item in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(item, dict):
            raise InvalidRequest(where, "must be an object with role and content")
        role = _ROLES.get(item.get("role"))  # type: ignore[arg-type]
        if role is None:
            raise InvalidRequest(
                f"{where}.role",
                f"must be one of {sorted(_ROLES)}, got {item.get('role')!r} "
                "(tool messages are not supported)",
            )
        out.append(Message(role, _content(item.get("content"), f"{where}.content", role)))
    return tuple(out)


def _content(value: Any, where: str, role: str) -> str:
    if isinstance(value, str):
        return value
    if value is None and role == "assistant":
        return ""
    if isinstance(value, list):
        parts: list[str] = []
        for j, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text":
                raise InvalidRequest(f"{where}[{j}]", "only parts of type 'text' are supported")
            text = part.get("text")
            if not isinstance(text, str):
                raise InvalidRequest(f"{where}[{j}].text", "must be a string")
            parts.append(text)
        return "\n".join(parts)
    raise InvalidRequest(where, "must be a string or a list of text parts")


def _overrides(value: Any, force_target: str | None, targets: Sequence[str]) -> RoutingOverrides:
    """The optional ``semroute`` extension object (``extra_body={"semroute": {...}}`` in the SDK):
    ``allowed_targets``, ``require_local``, ``max_cost`` (USD per 1M tokens, blended)."""
    if value is None:
        return RoutingOverrides(force_target=force_target)
    if not isinstance(value, dict):
        raise InvalidRequest("semroute", "must be an object")
    unknown = sorted(set(value) - {"allowed_targets", "require_local", "max_cost"})
    if unknown:
        raise InvalidRequest(
            f"semroute.{unknown[0]}", "unknown field (allowed_targets, require_local, max_cost)"
        )
    allowed = value.get("allowed_targets") or []
    if not isinstance(allowed, list) or not all(isinstance(t, str) for t in allowed):
        raise InvalidRequest("semroute.allowed_targets", "must be a list of target names")
    for name in allowed:
        if name not in targets:
            raise UnknownTarget(
                "semroute.allowed_targets", f"unknown target {name!r}; known: {list(targets)}"
            )
    require_local = _optional(value, "require_local", bool, "semroute.") or False
    max_cost = value.get("max_cost")
    if max_cost is not None and (
        not isinstance(max_cost, int | float) or isinstance(max_cost, bool) or max_cost < 0
    ):
        raise InvalidRequest("semroute.max_cost", f"must be a number >= 0, got {max_cost!r}")
    return RoutingOverrides(
        force_target=force_target,
        allowed_targets=tuple(allowed),
        require_local=require_local,
        max_cost=None if max_cost is None else float(max_cost),
    )


# ---- auth ---------------------------------------------------------------------------------------


def check_bearer(header: str | None, tokens: TokenSet) -> None:
    """Raise Unauthenticated unless auth is off or ``header`` is ``Bearer <known token>``.
    The token set is the gRPC door's (``semroute.grpc.server_common.TokenSet``): sha256 digests
    compared in constant time against every configured token, user or admin."""
    if not tokens.enabled:
        return
    scheme, _, presented = (header or "").strip().partition(" ")
    if scheme.lower() != "bearer" or not presented.strip():
        raise Unauthenticated("missing bearer token: send the header Authorization: Bearer <token>")
    if tokens.role(presented.strip()) is None:
        raise Unauthenticated("invalid bearer token")


# ---- response shapes ----------------------------------------------------------------------------


def decision_headers(decision: DecisionEvent, request_id: str) -> dict[str, str]:
    """The routing decision as response headers (ASCII only; names are ours)."""
    return {
        "x-request-id": request_id,
        "x-semroute-route": _ascii(decision.route),
        "x-semroute-target": _ascii(decision.target),
        "x-semroute-confidence": f"{decision.confidence:.4f}",
        "x-semroute-fallback": "true" if decision.fallback else "false",
    }


def _ascii(value: str) -> str:
    return value.encode("ascii", "replace").decode()


def semroute_field(decision: DecisionEvent, done: DoneEvent) -> dict[str, Any]:
    """The extra ``semroute`` object: the decision and what actually happened. ``target`` is the
    target that answered (after any failover); ``decided_target`` the router's first choice."""
    return {
        "route": decision.route,
        "target": done.target,
        "decided_target": decision.target,
        "confidence": round(decision.confidence, 6),
        "fallback": decision.fallback,
        "reason": decision.reason,
        "chain": list(decision.chain),
        "attempts": done.attempts,
        "cost_usd": done.cost_usd,
        "ttft_s": round(done.ttft_s, 6),
    }


def usage_field(done: DoneEvent) -> dict[str, Any]:
    """OpenAI's ``usage`` plus ``cost_usd``."""
    return {
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.completion_tokens,
        "total_tokens": done.prompt_tokens + done.completion_tokens,
        "cost_usd": done.cost_usd,
    }


def sse(data: dict[str, Any] | str) -> bytes:
    """One SSE event (``data: ...`` and the blank line)."""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


# ---- the app ------------------------------------------------------------------------------------


class HttpDoor:
    """The Starlette app around a dispatcher (build it apart from running it)."""

    def __init__(self, dispatcher: ChatService, settings: Settings) -> None:
        self._dispatcher = dispatcher
        self._tokens = TokenSet.from_settings(settings.auth)
        self.app = Starlette(
            routes=[
                Route("/v1/chat/completions", self._chat, methods=["POST"]),
                Route("/v1/models", self._models, methods=["GET"]),
                Route("/v1/models/{model:path}", self._model, methods=["GET"]),
                Route("/healthz", self._health, methods=["GET"]),
            ],
            exception_handlers={HTTPException: self._http_error},  # type: ignore[dict-item]
        )

    @property
    def auth_enabled(self) -> bool:
        return self._tokens.enabled

    async def _health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def _http_error(self, request: Request, exc: HTTPException) -> Response:
        """Starlette's own 404/405 in OpenAI's error shape."""
        body = {
            "error": {
                "message": f"{request.method} {request.url.path}: {exc.detail}",
                "type": _ERROR_TYPES.get(exc.status_code, "server_error"),
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
        raise ModelNotFound("model", f"the model {name!r} does not exist here")

    async def _chat(self, request: Request) -> Response:
        return await self._guarded(request, self._chat_completions)

    async def _guarded(
        self, request: Request, handler: Callable[[Request, str], Awaitable[Response]]
    ) -> Response:
        """Request id, auth, and the error mapping shared by every authenticated route."""
        request_id = clean_request_id(request.headers.get("x-request-id"))
        token = bind_request_id(request_id)
        try:
            check_bearer(request.headers.get("authorization"), self._tokens)
            return await handler(request, request_id)
        except _ClientGone:
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
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            raise InvalidRequest("body", f"larger than {MAX_BODY_BYTES} bytes")
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InvalidRequest("body", f"not valid JSON: {exc}") from exc
        parsed = parse_chat_body(body, self._dispatcher.target_names(), request_id)
        events = aiter(self._dispatcher.chat(parsed.request))
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

        try:
            yield sse(chunk({"role": "assistant", "content": ""}))
            async for event in _chain(pending, events):
                if isinstance(event, DeltaEvent):
                    yield sse(chunk({"content": event.text}))
                elif isinstance(event, DoneEvent):
                    extra = {
                        "usage": usage_field(event),
                        "semroute": semroute_field(decision, event),
                    }
                    if parsed.include_usage:
                        # OpenAI's layout: usage rides on an extra chunk with empty choices.
                        yield sse(chunk({}, event.finish_reason))
                        yield sse({**base, "choices": [], **extra})
                    else:
                        yield sse({**chunk({}, event.finish_reason), **extra})
                    yield sse("[DONE]")
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

    async def stop(self, grace_s: float = 5.0) -> None:
        """Stop accepting, let in-flight requests finish for up to ``grace_s``, then close."""
        self._server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self._task), grace_s + 5.0)
        except TimeoutError:
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
