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

Typical use (the CLI's ``serve_router`` does exactly this)::

    server, port, handle = await create_router_server(settings, Path("index_data/build/default"))
    await server.start()
    await handle.load()          # health goes SERVING
    ...
    await server.stop(grace); await handle.close()
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import grpc
from grpc_health.v1 import health

from semroute._proto.semroute.v1 import router_pb2 as pb
from semroute._proto.semroute.v1 import router_pb2_grpc as pb_grpc
from semroute.config import Settings
from semroute.errors import InvalidRequest, NotReady, SemrouteError, grpc_status_name
from semroute.grpc import convert
from semroute.grpc.server_common import (
    TokenSet,
    add_health_and_reflection,
    annotate_call,
    bind_port,
    server_credentials,
    set_serving,
    standard_interceptors,
)
from semroute.logs import REQUEST_ID_HEADER, get_logger, get_request_id, text_fields
from semroute.metrics import RouterMetrics
from semroute.types import Decision, Encoder, IndexInfo, Query

if TYPE_CHECKING:
    from semroute.router import Router

log = get_logger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Router"].full_name
ADMIN_METHODS = frozenset({f"/{SERVICE_NAME}/ReloadIndex"})


# ---- coalescing ---------------------------------------------------------------------------------


@dataclass
class _Pending:
    router: Router
    query: Query
    future: asyncio.Future[Decision]


BatchRunner = Callable[["Router", list[Query]], Awaitable[list[Decision]]]


class Coalescer:
    """Gathers concurrent single queries into batches for ``run_batch``.

    At most ``slots`` batches run at once. A batch is cut as soon as a slot is free; when other
    batches are still running (the service is busy) it first waits up to ``max_wait_s`` for
    ``max_batch`` queries to arrive. Queries whose caller has gone (cancelled, deadline passed)
    are dropped before they reach the encoder. Each caller gets its own decision; a batch that
    fails is retried query by query so one caller's error never becomes another's.
    """

    def __init__(
        self, run_batch: BatchRunner, *, max_batch: int, max_wait_s: float, slots: int
    ) -> None:
        self._run_batch = run_batch
        self._max_batch = max_batch
        self._max_wait_s = max_wait_s
        self._slots = asyncio.Semaphore(slots)
        self._queue: deque[_Pending] = deque()
        self._arrived = asyncio.Event()
        self._filled = asyncio.Event()
        self._running: set[asyncio.Task[None]] = set()
        self._in_flight = 0  # batches being encoded (cut by the loop or run inline)
        self._loop_task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._loop_task is None:
            self._loop_task = asyncio.get_running_loop().create_task(self._cut_batches())

    async def close(self) -> None:
        """Stop cutting batches; waits for running batches; pending callers get NotReady."""
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
            self._loop_task = None
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
        while self._queue:
            pending = self._queue.popleft()
            if not pending.future.done():
                pending.future.set_exception(NotReady("the router is shutting down"))

    @property
    def queued(self) -> int:
        """Queries waiting for a batch (not yet handed to the encoder)."""
        return len(self._queue)

    async def submit(self, router: Router, query: Query) -> Decision:
        """Route ``query`` with ``router`` as part of the next batch."""
        future: asyncio.Future[Decision] = asyncio.get_running_loop().create_future()
        if not self._queue and self._in_flight == 0 and not self._slots.locked():
            # Idle service: there is no batch to join, so run now in this task instead of
            # waking the batch cutter (saves two event-loop hops on the latency path).
            await self._slots.acquire()  # a slot is free: this does not suspend
            await self._execute([_Pending(router, query, future)])
            return future.result()
        self._queue.append(_Pending(router, query, future))
        self._arrived.set()
        if len(self._queue) >= self._max_batch:
            self._filled.set()
        return await future

    async def _cut_batches(self) -> None:
        while True:
            await self._arrived.wait()
            self._arrived.clear()
            while self._queue:
                await self._slots.acquire()
                if self._in_flight and self._max_wait_s > 0 and len(self._queue) < self._max_batch:
                    self._filled.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._filled.wait(), self._max_wait_s)
                batch: list[_Pending] = []
                while self._queue and len(batch) < self._max_batch:
                    pending = self._queue.popleft()
                    if not pending.future.done():
                        batch.append(pending)
                if not batch:
                    self._slots.release()
                    continue
                task = asyncio.get_running_loop().create_task(self._execute(batch))
                self._running.add(task)
                task.add_done_callback(self._running.discard)

    async def _execute(self, batch: list[_Pending]) -> None:
        self._in_flight += 1
        try:
            # A reload may land between calls: group by the router each call started with.
            groups: dict[int, list[_Pending]] = {}
            for pending in batch:
                groups.setdefault(id(pending.router), []).append(pending)
            for group in groups.values():
                await self._execute_group(group)
        except Exception as exc:  # a bug below must not leave callers waiting forever
            log.error("batch failed", error=str(exc), error_type=type(exc).__name__)
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(exc)
        finally:
            self._in_flight -= 1
            self._slots.release()

    async def _execute_group(self, group: list[_Pending]) -> None:
        router = group[0].router
        try:
            decisions = await self._run_batch(router, [p.query for p in group])
        except Exception as exc:
            if len(group) == 1:
                if not group[0].future.done():
                    group[0].future.set_exception(exc)
                return
            for pending in group:
                await self._execute_group([pending])
            return
        for pending, decision in zip(group, decisions, strict=True):
            if not pending.future.done():
                pending.future.set_result(decision)


# ---- live state ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReloadResult:
    ok: bool
    changed: bool
    error: str
    info: IndexInfo | None
    previous_version: str


class RouterHandle:
    """The serving state of one router server: current Router, reloads, watch, health."""

    def __init__(
        self,
        settings: Settings,
        index_path: Path,
        *,
        encoder: Encoder | None,
        encoder_path: Path | None = None,
        metrics: RouterMetrics,
        health_servicer: health.aio.HealthServicer,
        executor: concurrent.futures.ThreadPoolExecutor,
    ) -> None:
        self.settings = settings
        self.index_path = index_path
        self.metrics = metrics
        self.health = health_servicer
        self._encoder = encoder
        self._encoder_path = encoder_path
        self._executor = executor
        self._router: Router | None = None
        self._lock = asyncio.Lock()
        self._watch_task: asyncio.Task[None] | None = None
        self._failed_current: Path | None = None
        srv = settings.router_server
        self.coalescer = Coalescer(
            self.run_batch, max_batch=srv.batch_max, max_wait_s=srv.batch_wait_ms / 1000.0,
            slots=srv.workers,
        )

    @property
    def router(self) -> Router | None:
        """The Router serving now (None until loaded)."""
        return self._router

    def current(self) -> Router:
        """The Router serving now; raises NotReady (UNAVAILABLE) before the first load."""
        router = self._router
        if router is None:
            raise NotReady(
                "no index loaded yet: the router is still starting (health is NOT_SERVING); "
                "retry after health reports SERVING"
            )
        return router

    async def _in_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def run_batch(self, router: Router, queries: list[Query]) -> list[Decision]:
        """Route ``queries`` as one encoder batch on the worker threads; records metrics."""
        decisions, timings = await self._in_thread(router.route_batch_timed, queries)
        m = self.metrics
        m.batch_size.observe(len(queries))
        m.encode_seconds.observe(timings.encode_s)
        m.search_seconds.observe(timings.search_s)
        m.decide_seconds.observe(timings.decide_s)
        for decision in decisions:
            m.decisions.labels(route=decision.route, target=decision.target).inc()
            if decision.fallback:
                m.fallbacks.labels(route=decision.route).inc()
        return list(decisions)

    def _build_router(self, path: Path) -> Router:
        from semroute.index import ExemplarIndex
        from semroute.router import Router

        if self._encoder is None:
            router = Router.load(path, self.settings, encoder_path=self._encoder_path)
            self._encoder = router.encoder
            return router
        index = ExemplarIndex.load(path, expect_fingerprint=self._encoder.fingerprint)
        return Router(self._encoder, index, self.settings)  # type: ignore[arg-type]

    def _with_index(self, router: Router, path: Path) -> Router:
        from semroute.index import ExemplarIndex

        index = ExemplarIndex.load(path, expect_fingerprint=router.encoder.fingerprint)
        return router.with_index(index)

    async def load(self) -> IndexInfo:
        """Load the encoder and the index, then report SERVING. Raises SemrouteError on failure
        (health stays NOT_SERVING). Starts the ``DIR/current`` watch if configured."""
        async with self._lock:
            router = await self._in_thread(self._build_router, self.index_path)
            self._swap(router)
        hits = getattr(self._encoder, "hits", None)
        if hits is not None:
            self.metrics.watch_cache(
                lambda: int(getattr(self._encoder, "hits", 0)),
                lambda: int(getattr(self._encoder, "misses", 0)),
            )
        await set_serving(self.health, [SERVICE_NAME], True)
        self.metrics.ready.set(1)
        info: IndexInfo = router.info
        log.info("index loaded", version=info.version, exemplars=info.exemplars, path=info.path)
        self.start_watch()
        return info

    def _swap(self, router: Router) -> None:
        self._router = router
        info = router.info
        self.metrics.set_index(info.version, info.exemplars)

    async def reload(self, path: Path | None = None) -> ReloadResult:
        """Load ``path`` (default: the served root, following ``current``), check it, swap it in.

        Never raises for a bad index: the result says why and the old index keeps serving.
        """
        target = path or self.index_path
        async with self._lock:
            old = self._router
            previous = old.info.version if old is not None else ""
            try:
                if old is None:
                    new = await self._in_thread(self._build_router, target)
                else:
                    new = await self._in_thread(self._with_index, old, target)
            except SemrouteError as exc:
                self.metrics.reloads.labels(result="error").inc()
                self.metrics.reload_failed.set(1)
                log.error("reload failed; previous index keeps serving", path=str(target),
                          error=str(exc), error_type=type(exc).__name__, serving=previous)
                return ReloadResult(False, False, f"{type(exc).__name__}: {exc}",
                                    old.info if old is not None else None, previous)
            self.metrics.reload_failed.set(0)
            changed = old is None or new.info.version != previous or new.info.path != old.info.path
            if changed:
                self._swap(new)
            self.metrics.reloads.labels(result="ok" if changed else "unchanged").inc()
        if old is None:
            await set_serving(self.health, [SERVICE_NAME], True)
            self.metrics.ready.set(1)
        log.info("index reloaded" if changed else "index unchanged", version=new.info.version,
                 previous=previous, path=new.info.path)
        return ReloadResult(True, changed, "", new.info, previous)

    def start_watch(self) -> None:
        """Poll ``DIR/current`` every ``router_server.watch_interval_s`` (0: no watch)."""
        interval = self.settings.router_server.watch_interval_s
        if interval > 0 and self._watch_task is None:
            self._watch_task = asyncio.get_running_loop().create_task(self._watch(interval))

    async def _watch(self, interval: float) -> None:
        link = self.index_path / "current"
        while True:
            await asyncio.sleep(interval)
            router = self._router
            if router is None or not link.exists():
                continue
            target = link.resolve()
            if target == router.index.path.resolve() or target == self._failed_current:
                continue
            log.info("index current changed", current=str(target))
            result = await self.reload()
            # Retry a failed version only when `current` moves again.
            self._failed_current = None if result.ok else target

    async def close(self) -> None:
        """Stop the watch and the coalescer and release the worker threads."""
        if self._watch_task is not None:
            self._watch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch_task
            self._watch_task = None
        await self.coalescer.close()
        self.metrics.ready.set(0)
        await asyncio.to_thread(self._executor.shutdown, True)


# ---- servicer -----------------------------------------------------------------------------------


# Trailing-metadata key carrying the error class name, so clients can raise the same type.
ERROR_TYPE_KEY = "semroute-error"


async def _abort(context: grpc.aio.ServicerContext, exc: SemrouteError) -> NoReturn:
    trailing = [(ERROR_TYPE_KEY, type(exc).__name__)]
    rid = get_request_id()
    if rid:
        trailing.append((REQUEST_ID_HEADER, rid))
    await context.abort(
        getattr(grpc.StatusCode, grpc_status_name(exc)), str(exc), trailing_metadata=tuple(trailing)
    )
    raise AssertionError("unreachable")  # context.abort always raises


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
            router.validate(query)
            decision = await self._handle.coalescer.submit(router, query)
        except SemrouteError as exc:
            await _abort(context, exc)
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
                    router.validate(query)
                except InvalidRequest as exc:
                    raise _prefixed(exc, f"requests[{i}].") from exc
            decisions = await self._handle.run_batch(router, queries) if queries else []
        except SemrouteError as exc:
            await _abort(context, exc)
        annotate_call(queries=len(decisions))
        return pb.RouteBatchResponse(responses=[convert.decision_to_proto(d) for d in decisions])

    async def GetIndexInfo(
        self, request: pb.GetIndexInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetIndexInfoResponse:
        try:
            info = self._handle.current().info
        except SemrouteError as exc:
            await _abort(context, exc)
        return pb.GetIndexInfoResponse(index=convert.info_to_proto(info))

    async def ReloadIndex(
        self, request: pb.ReloadIndexRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReloadIndexResponse:
        result = await self._handle.reload(Path(request.path) if request.path else None)
        reply = pb.ReloadIndexResponse(
            ok=result.ok, changed=result.changed, error=result.error,
            previous_version=result.previous_version,
        )
        if result.info is not None:
            reply.index.CopyFrom(convert.info_to_proto(result.info))
        return reply


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


async def serve_router(
    settings: Settings,
    index_path: Path,
    *,
    encoder_path: Path | None = None,
    stop: asyncio.Event | None = None,
    on_ready: Callable[[int, int | None], None] | None = None,
) -> None:
    """Run a router server until SIGTERM/SIGINT (or ``stop``): start listening (health
    NOT_SERVING), load the index (SERVING), serve, then drain gracefully.

    ``on_ready(grpc_port, metrics_port)`` is called once the index is loaded. Raises
    SemrouteError if the first load fails (the server is stopped first).
    """
    from semroute.grpc.server_common import serve_until_signalled
    from semroute.metrics import serve_metrics

    srv = settings.router_server
    metrics = RouterMetrics()
    server, port, handle = await create_router_server(
        settings, index_path, encoder_path=encoder_path, metrics=metrics
    )
    metrics_server = None
    try:
        if srv.metrics_port:
            try:
                metrics_server = serve_metrics(metrics.registry, srv.metrics_port, srv.host)
            except OSError as exc:
                raise SemrouteError(
                    f"cannot serve metrics on {srv.host}:{srv.metrics_port}: {exc.strerror} "
                    "(router_server.metrics_port / --metrics-port; 0 disables)"
                ) from exc
        await server.start()
        log.info("listening", address=f"{srv.host}:{port}",
                 metrics=metrics_server.port if metrics_server else None)
        try:
            await handle.load()
        except SemrouteError:
            await server.stop(0)
            raise
        if on_ready is not None:
            on_ready(port, metrics_server.port if metrics_server else None)
        await serve_until_signalled(
            server, grace_s=srv.grace_s, health_servicer=handle.health, stop=stop
        )
    finally:
        await handle.close()
        if metrics_server is not None:
            metrics_server.close()
