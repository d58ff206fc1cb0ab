"""Pieces every semroute gRPC server uses (router and dispatcher alike).

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
  ``on_done(method, code, seconds)`` for metrics (``RpcMetrics.observe``).

The scope wraps the handler's behaviour (an async context manager around it) rather than only
inspecting the call, so the request id and timings cover exactly the servicer's work, for
unary and streaming methods alike, and the final status code is known. It is one interceptor,
not three, and the wrapped handler is built once per method, because on a router whose whole
decision costs about a millisecond the per-call Python overhead shows.

Also here: ``server_credentials`` (TLS; mutual TLS when a client CA is given),
``channel_credentials`` for clients, ``add_health_and_reflection`` and ``serve_until_signalled``
(graceful shutdown on SIGTERM/SIGINT: NOT_SERVING, stop accepting, drain in-flight calls).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hashlib
import hmac
import inspect
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from semroute.config import AuthSettings, TlsSettings
from semroute.errors import ConfigError, SemrouteError
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
Scope = Callable[[grpc.aio.ServicerContext, str], contextlib.AbstractAsyncContextManager[None]]
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


def wrap_handler(
    handler: grpc.RpcMethodHandler, method: str, scope: Scope
) -> grpc.RpcMethodHandler:
    """A copy of ``handler`` whose behaviour runs inside ``scope(context, method)``.

    Works for all four call shapes; a streaming behaviour may be an async generator or a
    coroutine that writes with ``context.write``.
    """
    if handler.unary_unary is not None or handler.stream_unary is not None:
        unary_behavior = handler.unary_unary or handler.stream_unary

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with scope(context, method):
                return await unary_behavior(request, context)

        make = (
            grpc.unary_unary_rpc_method_handler
            if handler.unary_unary is not None
            else grpc.stream_unary_rpc_method_handler
        )
        return make(
            unary,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    stream_behavior = handler.unary_stream or handler.stream_stream

    async def streaming(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async with scope(context, method):
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
        request_deserializer=handler.request_deserializer,
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


def _digest(token: str) -> bytes:
    # Hashing first gives equal-length inputs to compare_digest, so timing leaks neither the
    # token's content nor its length.
    return hashlib.sha256(token.encode("utf-8")).digest()


@dataclass(frozen=True)
class TokenSet:
    """Bearer tokens (sha256 digests only) for users and admins. Admins may call everything."""

    user: tuple[bytes, ...] = ()
    admin: tuple[bytes, ...] = ()

    @classmethod
    def of(cls, user: Iterable[str] = (), admin: Iterable[str] = ()) -> TokenSet:
        return cls(tuple(_digest(t) for t in user if t), tuple(_digest(t) for t in admin if t))

    @classmethod
    def from_settings(cls, auth: AuthSettings) -> TokenSet:
        """Tokens from ``auth.tokens`` / ``auth.admin_tokens`` plus their files (one per line,
        ``#`` comments and blank lines ignored). Raises ConfigError naming an unreadable file."""
        user = [*auth.tokens, *_read_tokens(auth.tokens_file, "auth.tokens_file")]
        admin = [
            *auth.admin_tokens,
            *_read_tokens(auth.admin_tokens_file, "auth.admin_tokens_file"),
        ]
        return cls.of(user, admin)

    @property
    def enabled(self) -> bool:
        """Auth is on as soon as any token is configured."""
        return bool(self.user or self.admin)

    def role(self, token: str) -> str | None:
        """``"admin"``, ``"user"`` or None (unknown). Compares against every token."""
        candidate = _digest(token)
        is_admin = False
        is_user = False
        for known in self.admin:
            is_admin |= hmac.compare_digest(candidate, known)
        for known in self.user:
            is_user |= hmac.compare_digest(candidate, known)
        if is_admin:
            return "admin"
        return "user" if is_user else None


def _read_tokens(path: Path | None, field: str) -> list[str]:
    if path is None:
        return []
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise ConfigError(f"{field}: cannot read {path}: {exc.strerror}") from exc
    tokens = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not tokens:
        raise ConfigError(f"{field}: {path} holds no token (one per line)")
    return tokens


def bearer_token(metadata: Metadata | None) -> str | None:
    """The token of an ``authorization: Bearer <token>`` entry, or None."""
    value = metadata_value(metadata, "authorization")
    if value is None:
        return None
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


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

    @contextlib.asynccontextmanager
    async def scope(self, context: grpc.aio.ServicerContext, method: str) -> AsyncIterator[None]:
        start = time.perf_counter()
        metadata = context.invocation_metadata()
        rid = clean_request_id(metadata_value(metadata, REQUEST_ID_HEADER))
        context.set_trailing_metadata(((REQUEST_ID_HEADER, rid),))
        rid_token = bind_request_id(rid)
        fields: dict[str, Any] = {}
        fields_token = _call_fields.set(fields)
        failure: BaseException | None = None
        try:
            if self._tokens.enabled and not method.startswith(self._open):
                await self._authorize(context, method, metadata)
            yield
        except BaseException as exc:
            failure = exc
            raise
        finally:
            seconds = time.perf_counter() - start
            code = status_name(failure, context)
            name = short_method(method)
            if self._on_done is not None:
                self._on_done(name, code, seconds)
            if not method.startswith(self._skip_log):
                line = {"method": name, "code": code, "ms": round(seconds * 1000, 3), **fields}
                if code == "UNKNOWN" and failure is not None:
                    self._log.error("rpc", **line, peer=context.peer(), exc_info=failure)
                else:
                    self._log.info("rpc", **line, peer=context.peer())
            _call_fields.reset(fields_token)
            reset_request_id(rid_token)

    async def _authorize(
        self, context: grpc.aio.ServicerContext, method: str, metadata: Metadata | None
    ) -> None:
        token = bearer_token(metadata)
        role = self._tokens.role(token) if token is not None else None
        if role is None:
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "missing bearer token: send metadata 'authorization: Bearer <token>'"
                if token is None
                else "unknown bearer token",
            )
        if method in self._admin_methods and role != "admin":
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{short_method(method)} needs an admin token (auth.admin_tokens)",
            )


def standard_interceptors(
    tokens: TokenSet,
    *,
    admin_methods: Iterable[str] = (),
    on_done: Callable[[str, str, float], None] | None = None,
) -> list[grpc.aio.ServerInterceptor]:
    """The interceptors every semroute server runs (one ``CallInterceptor``)."""
    return [CallInterceptor(tokens, admin_methods=admin_methods, on_done=on_done)]


def _read_file(path: Path | None, field: str) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{field}: cannot read {path}: {exc.strerror}") from exc


def server_credentials(tls: TlsSettings) -> grpc.ServerCredentials | None:
    """TLS credentials from ``tls`` (None when no certificate is configured: plaintext).

    With ``client_ca_file`` set, clients must present a certificate signed by that CA (mTLS).
    Raises ConfigError naming the field when a file is missing or the settings are incomplete.
    """
    if tls.cert_file is None and tls.key_file is None:
        if tls.client_ca_file is not None:
            raise ConfigError("tls.client_ca_file needs tls.cert_file and tls.key_file as well")
        return None
    if tls.cert_file is None or tls.key_file is None:
        missing = "tls.cert_file" if tls.cert_file is None else "tls.key_file"
        raise ConfigError(f"{missing} is required when the other of cert_file/key_file is set")
    cert = _read_file(tls.cert_file, "tls.cert_file")
    key = _read_file(tls.key_file, "tls.key_file")
    ca = _read_file(tls.client_ca_file, "tls.client_ca_file")
    assert cert is not None and key is not None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=ca is not None
    )


def channel_credentials(
    ca_file: Path | None = None,
    cert_file: Path | None = None,
    key_file: Path | None = None,
) -> grpc.ChannelCredentials:
    """Client TLS credentials: trust ``ca_file`` (system roots if None); present a client
    certificate when ``cert_file`` and ``key_file`` are given (mTLS)."""
    if (cert_file is None) != (key_file is None):
        raise ConfigError("client TLS needs both a certificate and a key file, or neither")
    return grpc.ssl_channel_credentials(
        root_certificates=_read_file(ca_file, "tls_ca"),
        private_key=_read_file(key_file, "tls_key"),
        certificate_chain=_read_file(cert_file, "tls_cert"),
    )


def bind_port(
    server: grpc.aio.Server,
    address: str,
    credentials: grpc.ServerCredentials | None,
    setting: str,
) -> int:
    """Listen on ``address`` (TLS when ``credentials``); returns the bound port.

    A port that cannot be bound raises SemrouteError naming the address and the setting
    (``setting``, e.g. ``router_server.port``) to change.
    """
    try:
        bound = (
            server.add_secure_port(address, credentials)
            if credentials is not None
            else server.add_insecure_port(address)
        )
    except RuntimeError as exc:
        raise SemrouteError(
            f"cannot listen on {address}: {str(exc).split(';')[0]} (port in use? choose another "
            f"with --port / {setting})"
        ) from exc
    if bound == 0:
        raise SemrouteError(
            f"cannot listen on {address}: address in use or not available (set {setting})"
        )
    return int(bound)


async def add_health_and_reflection(
    server: grpc.aio.Server, service_names: Sequence[str]
) -> health.aio.HealthServicer:
    """Register ``grpc.health.v1.Health`` (all services NOT_SERVING until told otherwise) and
    server reflection for ``service_names`` (full names, e.g. ``semroute.v1.Router``)."""
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    for name in ("", *service_names):
        await servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection(
        [*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME],
        server,
    )
    return servicer


async def set_serving(
    servicer: health.aio.HealthServicer, service_names: Sequence[str], serving: bool
) -> None:
    """Mark the server (``""``) and each service SERVING or NOT_SERVING."""
    status = (
        health_pb2.HealthCheckResponse.SERVING
        if serving
        else health_pb2.HealthCheckResponse.NOT_SERVING
    )
    for name in ("", *service_names):
        await servicer.set(name, status)


async def serve_until_signalled(
    server: grpc.aio.Server,
    *,
    grace_s: float,
    health_servicer: health.aio.HealthServicer | None = None,
    stop: asyncio.Event | None = None,
    signals: Sequence[signal.Signals] = (signal.SIGTERM, signal.SIGINT),
) -> None:
    """Wait for a signal (or ``stop`` being set), then shut down gracefully.

    Health goes NOT_SERVING first so load balancers stop sending, then the server stops
    accepting new calls and gives in-flight ones up to ``grace_s`` seconds to finish.
    """
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    for sig in signals:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
    try:
        await stop.wait()
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
    log.info("shutting down", grace_s=grace_s)
    if health_servicer is not None:
        await health_servicer.enter_graceful_shutdown()
    await server.stop(grace_s)
    log.info("stopped")
