"""The one interceptor every semroute gRPC server runs (router and dispatcher alike).

``CallInterceptor`` (what ``standard_interceptors`` returns) wraps every call in one scope
that, in order:

- binds a request id for the whole call (``semroute.logs.get_request_id()``): the client's
  ``x-request-id`` metadata if usable, else a fresh one. The id goes back to the client in the
  trailing metadata under the same key;
- checks bearer tokens from ``authorization: Bearer <token>`` metadata, compared in constant
  time; methods listed as admin need an admin token. Health and reflection stay open so probes
  and tooling work without secrets;
- writes one ``rpc`` log line per call (method, status code, ms, peer, plus whatever the
  servicer added with ``annotate_call``, e.g. the decision) and calls
  ``on_done(method, code, seconds)`` for metrics (``RpcMetrics.observe``). Both run just
  after the handler returns (scheduled on the event loop), so the reply is not held up by
  rendering a log line.

The scope wraps the handler's behaviour (an async context manager around it) rather than only
inspecting the call, so the request id and timings cover exactly the servicer's work, for
unary and streaming methods alike, and the final status code is known. It is one interceptor,
not three, and the wrapped handler is built once per method, because on a router whose whole
decision costs about a millisecond the per-call Python overhead shows.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any

import grpc

from semroute.auth import TokenSet, parse_bearer
from semroute.errors import InvalidRequest, PermissionDenied, Unauthenticated
from semroute.grpc.errors import abort
from semroute.logs import (
    REQUEST_ID_HEADER,
    bind_request_id,
    clean_request_id,
    get_logger,
    reset_request_id,
)

log = get_logger(__name__)

Metadata = Iterable[tuple[str, str | bytes]]
# A scope wraps one call: scope(context, method) is an async context manager.
Scope = Callable[[grpc.aio.ServicerContext, str], contextlib.AbstractAsyncContextManager[Any]]
Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]]

OPEN_METHOD_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)


def metadata_value(metadata: Metadata | None, key: str) -> str | None:
    """The first value of ``key`` (lower-case) in call metadata, decoded; None if absent."""
    for k, v in metadata or ():
        if k == key:
            return v.decode("utf-8", "replace") if isinstance(v, bytes) else v
    return None


def short_method(full_method: str) -> str:
    """``/semroute.v1.Router/Route`` -> ``Route``."""
    return full_method.rsplit("/", 1)[-1]


class _Malformed:
    """What a request that is not a valid message of its type deserializes to: the servicer
    never sees it, the call ends with INVALID_ARGUMENT (grpc's own path would be an UNKNOWN
    status and a traceback in the log)."""

    def __init__(self, error: str) -> None:
        self.error = error


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # DecodeError, invalid UTF-8 in a string field, ...
            return _Malformed(f"{type(exc).__name__}: {str(exc)[:200]}")

    return parse


async def _refuse_malformed(request: Any, context: grpc.aio.ServicerContext) -> None:
    if isinstance(request, _Malformed):
        await abort(context, InvalidRequest(
            "request",
            f"not a valid protobuf message of this method's request type ({request.error}); "
            "string fields must be valid UTF-8",
        ))


def wrap_handler(
    handler: grpc.RpcMethodHandler, method: str, scope: Scope
) -> grpc.RpcMethodHandler:
    """A copy of ``handler`` whose behaviour runs inside ``scope(context, method)``.

    Works for all four call shapes; a streaming behaviour may be an async generator or a
    coroutine that writes with ``context.write``. A unary request that cannot be parsed ends
    the call with INVALID_ARGUMENT naming ``request``.
    """
    if handler.unary_unary is not None or handler.stream_unary is not None:
        unary_behavior = handler.unary_unary or handler.stream_unary
        checked = handler.unary_unary is not None

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with scope(context, method):
                if checked:
                    await _refuse_malformed(request, context)
                return await unary_behavior(request, context)

        make = (
            grpc.unary_unary_rpc_method_handler
            if handler.unary_unary is not None
            else grpc.stream_unary_rpc_method_handler
        )
        return make(
            unary,
            request_deserializer=(
                _tolerant(handler.request_deserializer) if checked
                else handler.request_deserializer
            ),
            response_serializer=handler.response_serializer,
        )

    stream_behavior = handler.unary_stream or handler.stream_stream
    checked_stream = handler.unary_stream is not None

    async def streaming(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async with scope(context, method):
            if checked_stream:
                await _refuse_malformed(request, context)
            result = stream_behavior(request, context)
            if inspect.isasyncgen(result):
                async for item in result:
                    yield item
            else:
                await result

    make_stream = (
        grpc.unary_stream_rpc_method_handler
        if handler.unary_stream is not None
        else grpc.stream_stream_rpc_method_handler
    )
    return make_stream(
        streaming,
        request_deserializer=(
            _tolerant(handler.request_deserializer) if checked_stream
            else handler.request_deserializer
        ),
        response_serializer=handler.response_serializer,
    )


def status_name(exc: BaseException | None, context: grpc.aio.ServicerContext) -> str:
    """The status a call ended with, from the exception that ended it (None: returned)."""
    if exc is None or isinstance(exc, grpc.aio.AbortError):
        code = context.code()
        if code is None:
            return "OK"
        if isinstance(code, grpc.StatusCode):
            return str(code.name)
        try:  # some grpc versions keep the raw integer
            return next(str(c.name) for c in grpc.StatusCode if c.value[0] == int(code))
        except (StopIteration, TypeError, ValueError):
            return "UNKNOWN"
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        remaining = context.time_remaining()
        return "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"
    return "UNKNOWN"


def bearer_token(metadata: Metadata | None) -> str | None:
    """The token of an ``authorization: Bearer <token>`` entry, or None."""
    return parse_bearer(metadata_value(metadata, "authorization"))


_call_fields: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "semroute_call_fields", default=None
)


def annotate_call(**fields: Any) -> None:
    """Add fields to the current call's ``rpc`` log line (ignored outside a call)."""
    current = _call_fields.get()
    if current is not None:
        current.update(fields)


class CallInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Request id, bearer-token auth, access log and metrics for every call (see the module
    docstring). Auth is off when ``tokens`` is empty; a missing or unknown token gets
    UNAUTHENTICATED, a user token on a method in ``admin_methods`` (full names, e.g.
    ``/semroute.v1.Router/ReloadIndex``) PERMISSION_DENIED. ``skip_log_prefixes``: methods not
    logged (health probes would drown the log); they still reach ``on_done``.
    """

    def __init__(
        self,
        tokens: TokenSet,
        *,
        admin_methods: Iterable[str] = (),
        on_done: Callable[[str, str, float], None] | None = None,
        open_prefixes: Sequence[str] = OPEN_METHOD_PREFIXES,
        skip_log_prefixes: Sequence[str] = ("/grpc.health.v1.Health/",),
        logger: Any = None,
    ) -> None:
        self._tokens = tokens
        self._admin_methods = frozenset(admin_methods)
        self._open = tuple(open_prefixes)
        self._on_done = on_done
        self._skip_log = tuple(skip_log_prefixes)
        self._log = logger or log
        # method -> (the handler it wrapped, the wrapper): built once per method.
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = wrap_handler(handler, method, self.scope)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def scope(self, context: grpc.aio.ServicerContext, method: str) -> _CallScope:
        return _CallScope(self, context, method)

    def _finish(self, method: str, code: str, seconds: float, fields: dict[str, Any],
                peer: str, failure: BaseException | None) -> None:
        """Metrics and the ``rpc`` line of a finished call. Runs from the event loop just after
        the handler returned (``call_soon``, in the call's context, so the request id is still
        bound): the reply leaves before the line is rendered."""
        name = short_method(method)
        if self._on_done is not None:
            self._on_done(name, code, seconds)
        if not method.startswith(self._skip_log):
            line = {"method": name, "code": code, "ms": round(seconds * 1000, 3), **fields}
            if code == "UNKNOWN" and failure is not None:
                self._log.error("rpc", **line, peer=peer, exc_info=failure)
            else:
                self._log.info("rpc", **line, peer=peer)

    async def _authorize(
        self, context: grpc.aio.ServicerContext, method: str, metadata: Metadata | None
    ) -> None:
        token = bearer_token(metadata)
        role = self._tokens.role(token) if token is not None else None
        if role is None:
            await abort(context, Unauthenticated(
                "missing bearer token: send metadata 'authorization: Bearer <token>'"
                if token is None
                else "unknown bearer token"
            ))
        if method in self._admin_methods and role != "admin":
            await abort(context, PermissionDenied(
                f"{short_method(method)} needs an admin token (auth.admin_tokens)"
            ))


class _CallScope:
    """One call's scope (``CallInterceptor.scope``): a plain class rather than a generator
    context manager, as it runs on every call."""

    __slots__ = ("_context", "_fields_token", "_interceptor", "_method", "_rid_token", "_start")

    def __init__(self, interceptor: CallInterceptor, context: grpc.aio.ServicerContext,
                 method: str) -> None:
        self._interceptor = interceptor
        self._context = context
        self._method = method

    async def __aenter__(self) -> None:
        self._start = time.perf_counter()
        context, method, owner = self._context, self._method, self._interceptor
        metadata = context.invocation_metadata()
        rid = clean_request_id(metadata_value(metadata, REQUEST_ID_HEADER))
        context.set_trailing_metadata(((REQUEST_ID_HEADER, rid),))
        self._rid_token = bind_request_id(rid)
        self._fields_token = _call_fields.set({})
        if owner._tokens.enabled and not method.startswith(owner._open):
            try:
                await owner._authorize(context, method, metadata)
            except BaseException as exc:
                await self.__aexit__(type(exc), exc, None)
                raise

    async def __aexit__(self, exc_type: Any, failure: BaseException | None, tb: Any) -> None:
        seconds = time.perf_counter() - self._start
        context = self._context
        code = status_name(failure, context)
        fields = _call_fields.get() or {}
        asyncio.get_running_loop().call_soon(
            self._interceptor._finish, self._method, code, seconds, fields, context.peer(),
            failure,
        )
        _call_fields.reset(self._fields_token)
        reset_request_id(self._rid_token)


def standard_interceptors(
    tokens: TokenSet,
    *,
    admin_methods: Iterable[str] = (),
    on_done: Callable[[str, str, float], None] | None = None,
) -> list[grpc.aio.ServerInterceptor]:
    """The interceptors every semroute server runs (one ``CallInterceptor``)."""
    return [CallInterceptor(tokens, admin_methods=admin_methods, on_done=on_done)]

