"""The ``semroute.v1.Router`` gRPC service: a thin servicer over ``semroute.router.Router``.

``create_router_server`` builds the server without running it and returns a ``RouterHandle``,
which owns the live state:

- the current ``Router`` (encoder + index). Each call takes a reference to it when it starts,
  so a reload swaps the reference atomically and in-flight calls finish on the old index;
- the ``Coalescer``, which gathers concurrent ``Route`` calls into one encoder batch (at most
  ``router_server.batch_max`` queries, waiting at most ``batch_wait_ms`` to fill, and only
  while earlier batches are still running, so a lone call never waits) and runs it on a small
  thread pool, off the event loop;
- reloads (``ReloadIndex`` and a poll of ``DIR/current``): the new index is loaded and checked in
  full before the swap; a failure keeps the old index serving and is reported in the reply,
  the log and the ``reloads{result="error"}`` / ``reload_failed`` metrics;
- health: NOT_SERVING until the first index is loaded, SERVING after.

Typical use (``semroute.serve.serve_router`` does exactly this)::

    server, port, handle = await create_router_server(settings, Path("index_data/build/default"))
    await server.start()
    await handle.load()          # health goes SERVING
    ...
    await server.stop(grace); await handle.close()
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from semroute._proto.semroute.v1 import router_pb2 as pb
from semroute._proto.semroute.v1 import router_pb2_grpc as pb_grpc
from semroute.auth import TokenSet
from semroute.config import Settings
from semroute.dispatch.validate import check_max_cost, echo
from semroute.errors import InvalidRequest, SemrouteError
from semroute.grpc import convert
from semroute.grpc.errors import abort
from semroute.grpc.interceptors import annotate_call, standard_interceptors
from semroute.grpc.router_handle import SERVICE_NAME, RouterHandle
from semroute.grpc.server import SERVER_OPTIONS, add_health_and_reflection, bind_port
from semroute.grpc.tls import server_credentials
from semroute.logs import get_logger, text_fields
from semroute.metrics import RouterMetrics
from semroute.types import Encoder, Query

if TYPE_CHECKING:
    pass

log = get_logger(__name__)

ADMIN_METHODS = frozenset({f"/{SERVICE_NAME}/ReloadIndex"})
MAX_TARGET_CHARS = 256


# ---- servicer -----------------------------------------------------------------------------------


def _prefixed(exc: InvalidRequest, prefix: str) -> InvalidRequest:
    message = str(exc)
    head = f"{exc.field}: "
    return type(exc)(f"{prefix}{exc.field}", message.removeprefix(head))


class RouterServicer(pb_grpc.RouterServicer):
    """Translates RPCs into core calls; every SemrouteError becomes its gRPC status."""

    def __init__(self, handle: RouterHandle) -> None:
        self._handle = handle
        self._log_text = handle.settings.log.log_query_text

    async def Route(
        self, request: pb.RouteRequest, context: grpc.aio.ServicerContext
    ) -> pb.RouteResponse:
        try:
            router = self._handle.current()
            query = convert.query_from_proto(request)
            check_query(query)
            router.validate(query)
            decision = await self._handle.coalescer.submit(router, query)
        except SemrouteError as exc:
            await abort(context, exc)
        # On the call's one ``rpc`` line (the access log), not a line of its own.
        annotate_call(route=decision.route, target=decision.target,
                      confidence=round(decision.confidence, 4), fallback=decision.fallback,
                      **text_fields(query.text, log_text=self._log_text))
        return convert.decision_to_proto(decision)

    async def RouteBatch(
        self, request: pb.RouteBatchRequest, context: grpc.aio.ServicerContext
    ) -> pb.RouteBatchResponse:
        limit = self._handle.settings.limits.max_batch
        try:
            router = self._handle.current()
            if len(request.requests) > limit:
                raise InvalidRequest(
                    "requests",
                    f"{len(request.requests)} queries in one RouteBatch call; the limit is "
                    f"{limit} (limits.max_batch): split the batch",
                )
            queries = [convert.query_from_proto(r) for r in request.requests]
            for i, query in enumerate(queries):
                try:
                    check_query(query)
                    router.validate(query)
                except InvalidRequest as exc:
                    raise _prefixed(exc, f"requests[{i}].") from exc
            decisions = await self._handle.route_many(router, queries) if queries else []
        except SemrouteError as exc:
            await abort(context, exc)
        annotate_call(queries=len(decisions))
        return pb.RouteBatchResponse(responses=[convert.decision_to_proto(d) for d in decisions])

    async def GetIndexInfo(
        self, request: pb.GetIndexInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetIndexInfoResponse:
        try:
            info = self._handle.current().info
        except SemrouteError as exc:
            await abort(context, exc)
        return pb.GetIndexInfoResponse(index=convert.info_to_proto(info))

    async def ReloadIndex(
        self, request: pb.ReloadIndexRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReloadIndexResponse:
        try:
            path = reload_path(request.path, self._handle.index_path) if request.path else None
        except SemrouteError as exc:
            await abort(context, exc)
        result = await self._handle.reload(path)
        reply = pb.ReloadIndexResponse(
            ok=result.ok, changed=result.changed, error=result.error,
            previous_version=result.previous_version,
        )
        if result.info is not None:
            reply.index.CopyFrom(convert.info_to_proto(result.info))
        return reply


def check_query(query: Query) -> None:
    """What the core's ``Router.validate`` leaves to the transport: target names of a sane
    length (echoed bounded) and ``max_cost`` under the dispatcher's rule (finite, >= 0)."""
    for i, name in enumerate(query.policy.allowed_targets):
        if len(name) > MAX_TARGET_CHARS:
            raise InvalidRequest(
                f"policy.allowed_targets[{i}]",
                f"unknown target {echo(name)} ({len(name)} characters; target names are at most "
                f"{MAX_TARGET_CHARS})",
            )
    if query.policy.max_cost is not None:
        check_max_cost(query.policy.max_cost, "policy.max_cost")


def reload_path(raw: str, root: Path) -> Path:
    """The index path a ReloadIndex call may load: inside the served index ``root`` (a relative
    path is taken from the root). Anything else is INVALID_ARGUMENT, with a message that says
    nothing about what exists outside the root."""
    if "\x00" in raw or len(raw) > 4096:
        raise InvalidRequest("path", "not a usable path (NUL character or over 4096 characters)")
    parts = Path(raw).parts
    long = next((p for p in parts if len(p.encode("utf-8", "surrogatepass")) > 255), None)
    if long is not None:
        raise InvalidRequest(
            "path", f"a path component is over 255 bytes ({echo(long)}); no index lives there"
        )
    candidate = Path(raw) if Path(raw).is_absolute() else root / raw
    try:
        resolved = candidate.resolve()
        base = root.resolve()
    except (OSError, RuntimeError) as exc:
        raise InvalidRequest("path", f"not a usable path ({type(exc).__name__})") from None
    if resolved != base and base not in resolved.parents:
        raise InvalidRequest(
            "path",
            "must be inside the index root this server serves (relative paths are taken from "
            "it); other paths are refused",
        )
    return resolved


# ---- server factory -----------------------------------------------------------------------------


async def create_router_server(
    settings: Settings,
    index_path: Path,
    *,
    host: str | None = None,
    port: int | None = None,
    encoder: Encoder | None = None,
    encoder_path: Path | None = None,
    metrics: RouterMetrics | None = None,
    tokens: TokenSet | None = None,
    extra_interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
) -> tuple[grpc.aio.Server, int, RouterHandle]:
    """Build (not start) a router server bound to ``host:port`` (settings by default; port 0
    picks a free one). Returns the server, the bound port and the handle; call
    ``await handle.load()`` after ``await server.start()``.

    ``encoder`` shares an already loaded encoder (tests, benchmarks); otherwise
    ``handle.load()`` loads ``encoder_path``, else the encoder recorded in the index manifest,
    else ``settings.encoder.path`` (see ``Router.load``). ``tokens`` defaults to
    ``settings.auth``; TLS comes from ``settings.tls``. Raises ConfigError for bad auth/TLS
    settings and SemrouteError if the address cannot be bound.
    """
    srv = settings.router_server
    host = host if host is not None else srv.host
    port = port if port is not None else srv.port
    metrics = metrics or RouterMetrics()
    tokens = tokens if tokens is not None else TokenSet.from_settings(settings.auth)
    credentials = server_credentials(settings.tls)
    server = grpc.aio.server(
        interceptors=[
            *standard_interceptors(tokens, admin_methods=ADMIN_METHODS,
                                   on_done=metrics.rpc.observe),
            *extra_interceptors,
        ],
        options=[
            ("grpc.max_receive_message_length", 16 * 1024 * 1024),
            ("grpc.so_reuseport", 0),
            *SERVER_OPTIONS,
        ],
    )
    health_servicer = await add_health_and_reflection(server, [SERVICE_NAME])
    executor = concurrent.futures.ThreadPoolExecutor(
        max_workers=srv.workers, thread_name_prefix="semroute-router"
    )
    handle = RouterHandle(
        settings, index_path, encoder=encoder, encoder_path=encoder_path, metrics=metrics,
        health_servicer=health_servicer, executor=executor,
    )
    pb_grpc.add_RouterServicer_to_server(  # type: ignore[no-untyped-call]
        RouterServicer(handle), server
    )
    try:
        bound = bind_port(server, f"{host}:{port}", credentials, "router_server.port")
    except SemrouteError:
        executor.shutdown(wait=False)
        raise
    handle.coalescer.start()
    log.info("router server created", address=f"{host}:{bound}", tls=credentials is not None,
             mtls=settings.tls.client_ca_file is not None, auth=tokens.enabled)
    return server, bound, handle
