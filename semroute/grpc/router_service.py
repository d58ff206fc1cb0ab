"""The ``semroute.v1.Router`` gRPC service: a thin servicer over ``semroute.router.Router``.

``create_router_server`` builds the server without running it and returns a ``RouterHandle``,
which owns the live state:

- the current ``Router`` (encoder + index). Each call takes a reference to it when it starts,
  so a reload swaps the reference atomically and in-flight calls finish on the old index;
- the ``Coalescer``, which gathers concurrent ``Route`` calls into one encoder batch (at most
  ``router_server.batch_max`` queries, waiting at most ``batch_wait_ms`` to fill, and only
  while earlier batches are still running, so a lone call never waits) and runs it on a small
  thread pool, off the event loop (a lone call on an idle server runs on the loop itself,
  ``router_server.inline_when_idle``: the thread hop is the largest fixed cost of a call);
- reloads (``ReloadIndex`` and a poll of ``DIR/current``): the new index is loaded and checked in
  full before the swap; a failure keeps the old index serving and is reported in the reply,
  the log and the ``reloads{result="error"}`` / ``reload_failed`` metrics;
- health: NOT_SERVING until the first index is loaded, SERVING after.

A request with ``return_embedding`` also gets the query's embedding and the encoder's
fingerprint (router.proto ``query_embedding``), from the router that served it: read back from
its encoder's cache, where routing has just put it (no second encoding unless that cache is off).

Typical use (``semroute.serve.serve_router`` does exactly this)::

    server, port, handle = await create_router_server(settings, Path("index_data/build/default"))
    await server.start()
    await handle.load()          # health goes SERVING
    ...
    await server.stop(grace); await handle.close()
"""

from __future__ import annotations

import asyncio
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
from semroute.encoder import CachedEncoder
from semroute.errors import InvalidRequest, SemrouteError
from semroute.grpc import convert
from semroute.grpc.errors import abort
from semroute.grpc.interceptors import annotate_call, standard_interceptors
from semroute.grpc.router_handle import SERVICE_NAME, RouterHandle
from semroute.grpc.server import SERVER_OPTIONS, add_health_and_reflection, bind_port
from semroute.grpc.tls import server_credentials
from semroute.logs import get_logger, get_request_id, text_fields
from semroute.loop.arms import SERVING, check_mode
from semroute.metrics import RouterMetrics
from semroute.types import Decision, Encoder, Query, Vectors

if TYPE_CHECKING:
    from semroute.router import Router

log = get_logger(__name__)

ADMIN_METHODS = frozenset({f"/{SERVICE_NAME}/ReloadIndex", f"/{SERVICE_NAME}/SetCandidate"})
MAX_TARGET_CHARS = 256
MAX_AB_KEY_CHARS = 256


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
            check_ab_key(request.ab_key, "ab_key")
            rid = get_request_id() or ""
            arm, chosen = self._pick(router, query, request.ab_key or rid or query.text)
            decision = await self._handle.coalescer.submit(chosen, query)
        except SemrouteError as exc:
            await abort(context, exc)
        # Counted (and, in shadow mode, handed to the shadow lane) after the reply has left.
        asyncio.get_running_loop().call_soon(self._handle.arms.served, arm, decision, query, rid)
        # On the call's one ``rpc`` line (the access log), not a line of its own.
        annotate_call(route=decision.route, target=decision.target,
                      confidence=round(decision.confidence, 4), fallback=decision.fallback,
                      arm=arm, **text_fields(query.text, log_text=self._log_text))
        reply = convert.decision_to_proto(decision)
        reply.arm = arm
        if request.return_embedding:
            vectors = await query_embeddings(chosen, [query.text])
            convert.embedding_to_proto(reply, vectors[0], chosen.encoder.fingerprint)
        return reply

    def _pick(self, serving: Router, query: Query, key: str) -> tuple[str, Router]:
        """The arm for ``key``; the serving index when the candidate cannot take ``query``
        (a policy naming a target the candidate does not have)."""
        arm, chosen = self._handle.arms.pick(serving, key)
        if chosen is not serving:
            try:
                chosen.validate(query)
            except InvalidRequest:
                return SERVING, serving
        return arm, chosen

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
                    check_ab_key(request.requests[i].ab_key, "ab_key")
                except InvalidRequest as exc:
                    raise _prefixed(exc, f"requests[{i}].") from exc
            rid = get_request_id() or ""
            picks = [
                self._pick(router, q, r.ab_key or f"{rid}:{i}")
                for i, (q, r) in enumerate(zip(queries, request.requests, strict=True))
            ]
            decisions = await self._route_arms(queries, picks)
        except SemrouteError as exc:
            await abort(context, exc)
        replies = []
        for i, (decision, (arm, _)) in enumerate(zip(decisions, picks, strict=True)):
            self._handle.arms.served(arm, decision, queries[i], f"{rid}:{i}")
            reply = convert.decision_to_proto(decision)
            reply.arm = arm
            replies.append(reply)
        wanted = [i for i, r in enumerate(request.requests) if r.return_embedding]
        # Each query's embedding comes from the arm that routed it, one lookup per arm.
        by_arm: dict[int, list[int]] = {}
        for i in wanted:
            by_arm.setdefault(id(picks[i][1]), []).append(i)
        for members in by_arm.values():
            chosen = picks[members[0]][1]
            vectors = await query_embeddings(chosen, [queries[i].text for i in members])
            for i, vector in zip(members, vectors, strict=True):
                convert.embedding_to_proto(replies[i], vector, chosen.encoder.fingerprint)
        annotate_call(queries=len(decisions))
        return pb.RouteBatchResponse(responses=replies)

    async def _route_arms(
        self, queries: list[Query], picks: list[tuple[str, Router]]
    ) -> list[Decision]:
        """Decisions in query order, each group of queries routed by the router it drew."""
        groups: dict[int, list[int]] = {}
        for i, (_, chosen) in enumerate(picks):
            groups.setdefault(id(chosen), []).append(i)
        out: list[Decision | None] = [None] * len(queries)
        for members in groups.values():
            routed = await self._handle.route_many(picks[members[0]][1],
                                                   [queries[i] for i in members])
            for i, decision in zip(members, routed, strict=True):
                out[i] = decision
        return [d for d in out if d is not None]

    async def GetIndexInfo(
        self, request: pb.GetIndexInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetIndexInfoResponse:
        try:
            info = self._handle.current().info
        except SemrouteError as exc:
            await abort(context, exc)
        reply = pb.GetIndexInfoResponse(index=convert.info_to_proto(info))
        state = self._handle.arms.state
        reply.candidate_mode = state.mode
        reply.candidate_share = state.share
        if state.candidate is not None:
            reply.candidate.CopyFrom(convert.info_to_proto(state.candidate.info))
        return reply

    async def SetCandidate(
        self, request: pb.SetCandidateRequest, context: grpc.aio.ServicerContext
    ) -> pb.SetCandidateResponse:
        try:
            mode = check_mode(request.mode, "mode")
            path = reload_path(request.path, self._handle.index_path) if request.path else None
            before = self._handle.arms.agreement.snapshot()
            state = await self._handle.set_candidate(mode, path, request.share)
        except SemrouteError as exc:
            await abort(context, exc)
        if self._handle.peers is not None:
            self._handle.peers.set_candidate(mode, path, request.share)
        reply = pb.SetCandidateResponse(
            mode=state.mode, share=state.share,
            agreement=[pb.RouteAgreement(route=r, compared=c.compared, agreed=c.agreed)
                       for r, c in sorted(before.items())],
        )
        if state.candidate is not None:
            reply.candidate.CopyFrom(convert.info_to_proto(state.candidate.info))
        annotate_call(mode=state.mode, share=state.share,
                      candidate=state.candidate.info.version if state.candidate else "")
        return reply

    async def ReloadIndex(
        self, request: pb.ReloadIndexRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReloadIndexResponse:
        try:
            path = reload_path(request.path, self._handle.index_path) if request.path else None
        except SemrouteError as exc:
            await abort(context, exc)
        result = await self._handle.reload(path)
        if result.ok and self._handle.peers is not None:
            self._handle.peers.reload(path)
        reply = pb.ReloadIndexResponse(
            ok=result.ok, changed=result.changed, error=result.error,
            previous_version=result.previous_version,
        )
        if result.info is not None:
            reply.index.CopyFrom(convert.info_to_proto(result.info))
        return reply


async def query_embeddings(router: Router, texts: list[str]) -> Vectors:
    """``router``'s own embeddings of ``texts`` (each of the text alone, no history blended
    in). Just routed, they sit in the encoder's cache: read there, on the event loop (a lookup).
    Otherwise they are encoded again, on a worker thread, never on the loop: an encoder without
    that cache, or a two-stage router, whose static stage may have decided without the full
    encoder (the full encoder's embedding is the one returned, as its fingerprint says)."""
    encoder = router.encoder
    cached = isinstance(encoder, CachedEncoder) and encoder.size >= len(texts)
    if cached and not getattr(router, "two_stage", False):
        return encoder.encode(texts)
    vectors: Vectors = await asyncio.to_thread(encoder.encode, texts)
    return vectors


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


def check_ab_key(key: str, field: str) -> None:
    """An A/B key of a sane length (InvalidRequest naming ``field`` otherwise)."""
    if len(key) > MAX_AB_KEY_CHARS:
        raise InvalidRequest(field, f"{len(key)} characters; A/B keys are at most "
                             f"{MAX_AB_KEY_CHARS}")


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
    reuse_port: bool = False,
) -> tuple[grpc.aio.Server, int, RouterHandle]:
    """Build (not start) a router server bound to ``host:port`` (settings by default; port 0
    picks a free one). Returns the server, the bound port and the handle; call
    ``await handle.load()`` after ``await server.start()``.

    ``encoder`` shares an already loaded encoder (tests, benchmarks); otherwise
    ``handle.load()`` loads ``encoder_path``, else the encoder recorded in the index manifest,
    else ``settings.encoder.path`` (see ``Router.load``). ``tokens`` defaults to
    ``settings.auth``; TLS comes from ``settings.tls``. Raises ConfigError for bad auth/TLS
    settings and SemrouteError if the address cannot be bound. ``reuse_port``: bind with
    SO_REUSEPORT, beside the other processes of a multi-process router
    (``semroute.grpc.router_workers``); off, a port in use is an error.
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
            ("grpc.so_reuseport", 1 if reuse_port else 0),
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
    handle.arms.start()
    log.info("router server created", address=f"{host}:{bound}", tls=credentials is not None,
             mtls=settings.tls.client_ca_file is not None, auth=tokens.enabled)
    return server, bound, handle
