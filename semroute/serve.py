"""Process wiring: what runs in a router process and in a dispatcher process.

This is the only module where a router client meets the dispatcher: the dispatcher
(``semroute.dispatch``) knows a router only as the ``RouterLike`` Protocol; here it gets a gRPC
``RouterClient``. Each ``serve_*`` runs until SIGTERM/SIGINT (or ``stop``), then drains.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from pathlib import Path

import structlog
from prometheus_client import CollectorRegistry

from semroute.auth import TokenSet, read_tokens_file
from semroute.config import Settings
from semroute.dispatch.backend_config import load_backends
from semroute.dispatch.breaker import CircuitBreaker
from semroute.dispatch.dispatcher import Dispatcher
from semroute.dispatch.ledger import build_ledger
from semroute.dispatch.metrics import DispatchMetrics
from semroute.dispatch.pool import BackendPool
from semroute.dispatch.router_guard import GuardedRouter
from semroute.dispatch.rules import RuleEngine
from semroute.dispatch.validate import ChatLimits
from semroute.errors import ConfigError, SemrouteError
from semroute.grpc.dispatcher_service import SERVICE_NAME as DISPATCHER_SERVICE
from semroute.grpc.dispatcher_service import DispatcherServer, build_dispatcher_server
from semroute.grpc.metrics_merge import MergedCollector
from semroute.grpc.router_client import RouterClient
from semroute.grpc.router_service import create_router_server
from semroute.grpc.router_workers import WorkerLink, WorkerSet
from semroute.grpc.server import serve_until_signalled, set_serving, wait_for_signal
from semroute.http.app import HttpDoorHandle, start_http_door
from semroute.logs import configure_logging, get_logger
from semroute.loop.decision_log import DecisionLog
from semroute.loop.sink import LogSink
from semroute.loop.store import open_store
from semroute.metrics import MetricsServer, RouterMetrics, serve_metrics
from semroute.types import RouterLike

log = get_logger(__name__)


async def serve_router(
    settings: Settings,
    index_path: Path,
    *,
    encoder_path: Path | None = None,
    stop: asyncio.Event | None = None,
    on_ready: Callable[[int, int | None], None] | None = None,
    link: WorkerLink | None = None,
) -> None:
    """Run a router server until SIGTERM/SIGINT (or ``stop``): start listening (health
    NOT_SERVING), load the index (SERVING), serve, then drain gracefully.

    With ``router_server.processes`` > 1 this process supervises that many worker processes
    on one port instead (``serve_router_workers``). ``link``: this process is one of them.
    ``on_ready(grpc_port, metrics_port)`` is called once the index is loaded. Raises
    SemrouteError if the first load fails (the server is stopped first). numpy's BLAS runs on
    one thread in a router process (``limit_blas_threads``).
    """
    srv = settings.router_server
    limit_blas_threads()
    if link is None and srv.processes > 1:
        await serve_router_workers(settings, index_path, encoder_path=encoder_path, stop=stop,
                                   on_ready=on_ready)
        return
    metrics = RouterMetrics()
    server, port, handle = await create_router_server(
        settings, index_path, encoder_path=encoder_path, metrics=metrics,
        port=link.port if link is not None else None, reuse_port=link is not None,
    )
    if link is not None:
        handle.on_version, handle.peers = link.version_changed, link
        stop = stop or asyncio.Event()
    metrics_server = None
    control: asyncio.Task[None] | None = None  # a worker's link to its supervisor
    try:
        if link is not None and link.metrics:  # private: the supervisor merges the workers'
            metrics_server = serve_metrics(metrics.registry, 0, "127.0.0.1")
        elif link is None and srv.metrics_port:
            metrics_server = _metrics_endpoint(metrics.registry, srv.host, srv.metrics_port)
        await server.start()
        log.info("listening", address=f"{srv.host}:{port}",
                 metrics=metrics_server.port if metrics_server else None)
        try:
            await handle.load()
            if srv.candidate is not None and srv.candidate_mode != "off":
                try:
                    await handle.set_candidate(srv.candidate_mode, srv.candidate,
                                               srv.candidate_share)
                except SemrouteError as exc:
                    raise ConfigError(
                        f"router_server.candidate (--candidate) {srv.candidate}: {exc}"
                    ) from exc
        except SemrouteError as exc:
            if link is not None:
                await link.failed(f"{type(exc).__name__}: {exc}")
            await server.stop(0)
            raise
        if on_ready is not None:
            on_ready(port, metrics_server.port if metrics_server else None)
        if link is not None and stop is not None:
            link.send("ready", version=handle.current().info.version,
                      metrics_port=metrics_server.port if metrics_server else 0)
            control = asyncio.create_task(link.serve(handle, stop))
        await serve_until_signalled(
            server, grace_s=srv.grace_s, health_servicer=handle.health, stop=stop
        )
    finally:
        if control is not None:
            control.cancel()
        await handle.close()
        if metrics_server is not None:
            metrics_server.close()


def limit_blas_threads(threads: int = 1) -> bool:
    """Run numpy's BLAS on ``threads`` threads in this process; False if numpy has none that
    threadpoolctl can set. The router's only BLAS work is small products (the index's
    projection of a batch of queries), which a second BLAS thread barely speeds up, while that
    thread spin-waits for more work long after each one: on 2 cores it took about a third of
    the server's CPU under load and a core from the encoder (scripts/profile_route.py
    --threads). The server's parallelism is its worker threads and the encoder's. faiss's own
    BLAS (an OpenMP build) is left as it is."""
    import numpy  # noqa: F401 - threadpoolctl sees only libraries already loaded
    from threadpoolctl import ThreadpoolController

    found = False
    for lib in ThreadpoolController().lib_controllers:
        if lib.user_api == "blas" and "numpy" in lib.filepath:
            lib.set_num_threads(threads)
            found = True
    return found


def _metrics_endpoint(registry: CollectorRegistry, host: str, port: int) -> MetricsServer:
    try:
        return serve_metrics(registry, port, host)
    except OSError as exc:
        raise SemrouteError(
            f"cannot serve metrics on {host}:{port}: {exc.strerror} "
            "(router_server.metrics_port / --metrics-port; 0 disables)"
        ) from exc


async def serve_router_workers(
    settings: Settings,
    index_path: Path,
    *,
    encoder_path: Path | None = None,
    stop: asyncio.Event | None = None,
    on_ready: Callable[[int, int | None], None] | None = None,
) -> None:
    """Run ``router_server.processes`` router processes on one port until SIGTERM/SIGINT (or
    ``stop``), then drain them all (``semroute.grpc.router_workers``). ``on_ready(grpc_port,
    metrics_port)`` once every worker serves; the metrics port merges all workers. Raises
    SemrouteError when a worker cannot start (the others are stopped first)."""
    srv = settings.router_server
    fleet = WorkerSet(settings, index_path, processes=srv.processes, encoder_path=encoder_path,
                      command=_worker_command)
    metrics_server = None
    try:
        if srv.metrics_port:
            registry = CollectorRegistry()
            registry.register(MergedCollector(fleet.metrics_ports))
            metrics_server = _metrics_endpoint(registry, srv.host, srv.metrics_port)
        port = await fleet.start()
        log.info("listening", address=f"{srv.host}:{port}", processes=srv.processes,
                 metrics=metrics_server.port if metrics_server else None)
        if on_ready is not None:
            on_ready(port, metrics_server.port if metrics_server else None)
        watch = asyncio.create_task(fleet.watch())
        try:
            await wait_for_signal(stop)
        finally:
            watch.cancel()
        log.info("shutting down", grace_s=srv.grace_s, processes=srv.processes)
    finally:
        await fleet.stop(srv.grace_s)
        if metrics_server is not None:
            metrics_server.close()
    log.info("stopped")


def _worker_command(fd: int) -> list[str]:
    return [sys.executable, "-c", f"from semroute.serve import run_router_worker; "
            f"run_router_worker({fd})"]


def run_router_worker(fd: int) -> None:
    """Entry point of one router worker process (``WorkerSet`` starts it with its control
    socket as file descriptor ``fd``). Exits with status 1 when the index cannot be loaded."""
    try:
        asyncio.run(_router_worker(fd))
    except SemrouteError as exc:
        print(f"semroute router worker: {exc}", file=sys.stderr)
        sys.exit(1)


async def _router_worker(fd: int) -> None:
    link = await WorkerLink.connect(fd)
    configure_logging(link.settings.log)
    structlog.contextvars.bind_contextvars(worker=link.worker)
    try:
        await serve_router(link.settings, link.index_path, encoder_path=link.encoder_path,
                           link=link)
    finally:
        await link.close()


async def build_dispatcher(
    settings: Settings, *, metrics: DispatchMetrics | None = None
) -> Dispatcher:
    """The dispatcher a server runs: backends from ``dispatcher.backends_file``, rules from
    ``dispatcher.rules_file`` (PII detection alone when unset), a RouterClient connected to
    ``dispatcher.router``. Raises ConfigError for bad files or a rule naming an unknown target."""
    ds = settings.dispatcher
    configs = load_backends(Path(ds.backends_file))
    rules = RuleEngine.load(Path(ds.rules_file)) if ds.rules_file else RuleEngine.default()
    missing = sorted(rules.targets() - set(configs))
    if missing:
        raise ConfigError(
            f"{ds.rules_file}: rules name target(s) not in {ds.backends_file}: {', '.join(missing)}"
        )
    pool = BackendPool(
        configs, breaker_failures=ds.breaker_failures, breaker_cooldown_s=ds.breaker_cooldown_s
    )
    for name, reason in pool.skipped.items():
        log.warning("backend_skipped", target=name, reason=reason)
    token = ds.router_token
    if ds.router_token_file is not None:
        token = read_tokens_file(ds.router_token_file, "dispatcher.router_token_file")[0]
    unknown = sorted(set(ds.fallback_targets) - set(configs))
    if unknown:
        raise ConfigError(
            f"dispatcher.fallback_targets names target(s) not in {ds.backends_file}: "
            f"{', '.join(unknown)}"
        )
    metrics = metrics if metrics is not None else DispatchMetrics()
    tokens = TokenSet.from_settings(settings.auth)
    # Cache, budgets, rate limits, cost accounting; Redis when state.url names one.
    ledger = build_ledger(
        settings, configs, metrics, tokens.tenant_names() if tokens.enabled else None
    )
    client = RouterClient(
        ds.router, token=token, tls_ca=ds.router_tls_ca, timeout=ds.router_timeout_s,
        lb_policy=ds.router_lb_policy,
    )
    # The router is not a single point of failure: retry once, breaker, then static fallback.
    router: RouterLike = GuardedRouter(
        client,
        breaker=CircuitBreaker(ds.router_breaker_failures, ds.router_breaker_cooldown_s),
        retry_backoff_s=ds.router_retry_backoff_s,
    )
    return Dispatcher(
        router, pool, ds, rules, metrics=metrics, owns_router=True,
        limits=ChatLimits.from_settings(settings.limits), sink=open_decision_sink(settings),
        ledger=ledger,
    )


def open_decision_sink(settings: Settings) -> LogSink | None:
    """The decision log the settings name (``loop.decision_log``; None when ''), as the
    dispatcher's sink. Raises ConfigError naming the log when it cannot be opened."""
    url = settings.loop.decision_log
    if not url:
        return None
    decision_log = DecisionLog(
        open_store(url), max_queue=settings.loop.queue,
        retention_days=settings.loop.retention_days,
    )
    log.info("decision_log_open", store=decision_log.store.where,
             text=settings.log.log_query_text)
    return LogSink(decision_log, keep_text=settings.log.log_query_text)


async def serve_dispatcher(
    settings: Settings,
    *,
    stop: asyncio.Event | None = None,
    on_ready: Callable[[int, int, int], None] | None = None,
) -> None:
    """Run the dispatcher until SIGTERM/SIGINT (or ``stop``, an asyncio.Event, is set).

    ``on_ready(grpc_port, metrics_port, http_port)`` is called once everything listens (0 for
    what is off). Raises ConfigError/SemrouteError for bad files or ports in use."""
    ds = settings.dispatcher
    dispatcher = await build_dispatcher(settings, metrics=DispatchMetrics())
    metrics_server = None
    door = None
    built = None
    try:
        built = await build_dispatcher_server(settings, dispatcher)
        if ds.metrics_port:
            try:
                metrics_server = serve_metrics(
                    dispatcher.metrics.registry, ds.metrics_port, ds.host
                )
            except OSError as exc:
                raise SemrouteError(
                    f"cannot serve metrics on {ds.host}:{ds.metrics_port}: {exc.strerror} "
                    "(dispatcher.metrics_port / --metrics-port; 0 disables)"
                ) from exc
        await built.server.start()
        # The OpenAI-compatible door shares this process's dispatcher and event loop.
        if ds.http_port:
            door = await start_http_door(dispatcher, settings, ds.http_port, grace_s=ds.grace_s)
        log.info(
            "dispatcher serving",
            address=f"{ds.host}:{built.port}",
            router=ds.router,
            targets=dispatcher.target_names(),
            skipped=sorted(dispatcher.backends.skipped),
            metrics_port=metrics_server.port if metrics_server else 0,
            http_port=door.port if door is not None else 0,
        )
        print(f"dispatcher listening on {ds.host}:{built.port}", flush=True)
        if on_ready is not None:
            on_ready(
                built.port,
                metrics_server.port if metrics_server else 0,
                door.port if door is not None else 0,
            )
        await wait_for_signal(stop)
        await drain(dispatcher, built, door, ds.grace_s)
    finally:
        if door is not None:
            await door.stop(0)
        if built is not None:
            await built.server.stop(0)  # no-op after a graceful stop; else stops at once
        if metrics_server is not None:
            metrics_server.close()
        await dispatcher.aclose()


async def drain(
    dispatcher: Dispatcher,
    built: DispatcherServer,
    door: HttpDoorHandle | None,
    grace_s: float,
) -> None:
    """Shut the dispatcher down within ``grace_s`` (plus well under a second):

    1. health NOT_SERVING on both doors (gRPC health, ``/healthz`` 503) and new chats refused
       (ShuttingDown: 503 / UNAVAILABLE, nothing sent, safe to retry elsewhere);
    2. both doors stop accepting connections together;
    3. chats in flight get until ``grace_s`` to finish; those still running are then cut with
       an error the client can see (gRPC ABORTED, an SSE error event), never a bare reset.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace_s
    log.info("draining", grace_s=grace_s, active=dispatcher.active_chats)
    dispatcher.begin_drain()
    if door is not None:
        door.begin_drain()
    await set_serving(built.health, [DISPATCHER_SERVICE], False)
    # grpc cancels what is left at its own grace with UNAVAILABLE (which clients retry: text
    # would be duplicated): give it a margin so our ABORTED lands first.
    grpc_stop = asyncio.create_task(built.server.stop(grace_s + 0.5))
    door_stop = (
        asyncio.create_task(door.stop(grace_s + 0.5)) if door is not None else None
    )
    while dispatcher.active_chats and loop.time() < deadline:
        await asyncio.sleep(0.05)
    # Cut what is left; a chat caught between two chunks is cut when it resumes.
    cut_until = loop.time() + 0.5
    while dispatcher.active_chats and loop.time() < cut_until:
        dispatcher.cut_streams()
        await asyncio.sleep(0.02)
    if door_stop is not None:
        await door_stop
    await grpc_stop
    log.info("stopped", left=dispatcher.active_chats)
